"""``hpc_gan pull`` (and ``launch/pull.py``): the command line of :mod:`hpc_gan.launch.pull`."""

from __future__ import annotations

import argparse

from hpc_gan.io import check_output_path
from hpc_gan.launch.pull import pull, sample_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="run directory, or [user@]host:path of one on a cluster")
    parser.add_argument("--dest", required=True, help="local directory for the generator file and config")
    parser.add_argument("--tag", help="checkpoint tag, e.g. step-00020000 (default: the newest complete one)")
    parser.add_argument("--overwrite", action="store_true", help="replace different files already in --dest")
    parser.add_argument("--remote-python", default="python",
                        help="command running Python with hpc_gan on the remote host (default: python)")
    parser.add_argument("--via", choices=("auto", "rsync", "scp"), default="auto",
                        help="remote copy tool (auto: rsync when installed here, else scp)")


def run(args: argparse.Namespace) -> int:
    check_output_path(args.dest, "--dest")  # before any remote work
    pulled = pull(args.source, args.dest, args.tag, overwrite=args.overwrite, remote_python=args.remote_python,
                  via=args.via)
    made = "consolidated and " if pulled.consolidated else ""
    how = "copied, sha256 verified" if pulled.copied else "already there, identical"
    print(f"{pulled.variant} {pulled.tag}: {made}{how}: {pulled.generator}")
    print(f"config: {pulled.config}")
    print(f"sample: {sample_command(pulled)}")
    return 0
