"""``hpc_gan plan --variant V --nodes N --gpus-per-node G``: per-rank memory and the largest batch that fits."""

from __future__ import annotations

import argparse
import json
import sys

from hpc_gan.cli_config import add_config_arguments, load_from_args
from hpc_gan.cli_types import positive_float, positive_int
from hpc_gan.train.plan import DEFAULT_GPU_MEMORY_GB, format_plan, plan_memory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--nodes", type=positive_int, required=True, help="nodes per job")
    parser.add_argument("--gpus-per-node", type=positive_int, required=True, help="GPUs (ranks) per node")
    parser.add_argument("--gpu-memory-gb", type=positive_float, default=DEFAULT_GPU_MEMORY_GB,
                        help=f"memory of one GPU in GiB (default {DEFAULT_GPU_MEMORY_GB:g})")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    cfg = load_from_args(args)
    plan = plan_memory(cfg, args.nodes * args.gpus_per_node, args.gpu_memory_gb)
    if args.json:
        json.dump(plan.to_dict(), sys.stdout, indent=1)
        print()
    else:
        print(format_plan(plan))
    return 0
