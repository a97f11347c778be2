"""``hpc_gan submit`` (and ``launch/submit.py``): the command line of :mod:`hpc_gan.launch.submit`.

    hpc_gan submit --variant c_sn_mp --nodes 4 --gpus-per-node 4 --time 1440
    hpc_gan submit --variant gp,sn,sn_mp,c_sn_mp --profile smoke --cluster local
"""

from __future__ import annotations

import argparse
import sys

from hpc_gan.cli_config import add_config_arguments
from hpc_gan.cli_types import positive_float, positive_int
from hpc_gan.launch.submit import (check_run_dirs, plan_runs, print_dry_run, resolve_cluster, submit,
                                   submit_evaluation, submit_tstr)
from hpc_gan.train.plan import DEFAULT_GPU_MEMORY_GB, fit_warnings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, variant_help="one variant, several comma-separated, or 'all'")
    parser.add_argument("--nodes", type=positive_int, help="nodes per job")
    parser.add_argument("--gpus-per-node", type=positive_int, help="GPUs per node (one rank per GPU)")
    parser.add_argument("--tasks-per-node", type=positive_int, help="ranks per node on CPU clusters")
    parser.add_argument("--time", type=positive_int, help="time limit per job in minutes (requeued when it expires)")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--mem", type=positive_int, help="memory per node in GB")
    parser.add_argument("--name", help="experiment name (default: the config's name)")
    parser.add_argument("--cluster", choices=("slurm", "local", "auto"), default="auto",
                        help="slurm, local (this machine, submitit's local executor), auto: slurm when sbatch exists")
    parser.add_argument("--resume", action="store_true", help="continue runs that already hold checkpoints")
    parser.add_argument("--overwrite", action="store_true", help="delete existing run directories first")
    parser.add_argument("--dry-run", action="store_true", help="print configs and the sbatch script, submit nothing")
    parser.add_argument("--wait", action="store_true", help="wait until every job has finished")
    parser.add_argument("--job", choices=("train", "evaluate", "tstr"), default="train",
                        help="train (default); evaluate: sample each trained run and evaluate the samples; "
                             "tstr: the downstream U-Net test of each trained run (plus real, see --tstr-real)")
    parser.add_argument("--images", help="--job tstr: NIfTI images of the real subjects")
    parser.add_argument("--labels", help="--job tstr: their vessel labels")
    parser.add_argument("--masks", help="--job tstr: their brain masks (intracranial setting)")
    parser.add_argument("--tstr-real", action="store_true", help="--job tstr: also a U-Net trained on real patches")
    parser.add_argument("--tstr-steps", type=positive_int, default=2000, help="--job tstr: maximum U-Net steps")
    parser.add_argument("--n-samples", type=positive_int, default=256, help="--job evaluate: samples per variant")
    parser.add_argument("--gpu-memory-gb", type=positive_float, default=DEFAULT_GPU_MEMORY_GB,
                        help="GiB per GPU for the memory estimate (train jobs warn when a run will not fit)")


def run(args: argparse.Namespace) -> int:
    cluster = resolve_cluster(args.cluster)
    runs = plan_runs(args, cluster)
    if args.dry_run:
        print_dry_run(runs, cluster)
        return 0
    if args.job == "evaluate":
        return submit_evaluation(runs, cluster, args.wait, args.n_samples)
    if args.job == "tstr":
        nifti = {"images": args.images, "labels": args.labels, "masks": args.masks}
        return submit_tstr(runs, cluster, nifti, args.tstr_steps, args.tstr_real, args.wait)
    for note in check_run_dirs(runs, args.resume, args.overwrite):
        print(note)
    for line in fit_warnings(runs, args.gpu_memory_gb):  # warn only: the estimate is an estimate
        print(line, file=sys.stderr)
    return submit(runs, cluster, args.wait, args.overwrite)
