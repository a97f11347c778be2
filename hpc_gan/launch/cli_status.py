"""``hpc_gan status`` (and ``launch/status.py``): the command line of :mod:`hpc_gan.launch.status`."""

from __future__ import annotations

import argparse
import sys

from hpc_gan.cli_types import positive_int
from hpc_gan.launch.status import DEFAULT_WATCH_S, collect, show, watch
from hpc_gan.launch.submit import JOBS_FILE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help=f"experiment directory (holding {JOBS_FILE}) or one run directory")
    parser.add_argument("--watch", nargs="?", type=positive_int, const=DEFAULT_WATCH_S, metavar="SECONDS",
                        help=f"redraw every SECONDS (default {DEFAULT_WATCH_S}) until all jobs have finished")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")


def run(args: argparse.Namespace) -> int:
    if args.watch:
        return watch(args.target, args.watch, args.json)
    show(collect(args.target), args.json, sys.stdout)
    return 0
