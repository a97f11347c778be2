"""The ``hpc_gan`` command: one subcommand per job, one error line and a non-zero exit on bad input.

Each subcommand's argument parsing lives in a ``cli_<name>.py`` beside the library module it
drives (``hpc_gan/launch/cli_submit.py`` beside ``submit.py``) and exposes
``add_arguments(parser)`` and ``run(args) -> int``; library modules parse no arguments. This module
only dispatches and turns :class:`HpcGanError` into one line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from hpc_gan.errors import HpcGanError, print_error

# name -> (module, help). Command modules keep heavy imports (torch, deepspeed) inside run().
COMMANDS = {
    "config": ("hpc_gan.cli_config", "print a resolved run configuration or explain every key"),
    "make-phantoms": ("hpc_gan.data.cli_phantoms", "write seeded phantom TOF-MRA volumes as NIfTI"),
    "pack": ("hpc_gan.data.cli_pack", "pack NIfTI volumes into sharded HDF5 patches"),
    "inspect": ("hpc_gan.data.cli_inspect", "summarise a packed dataset and verify its shards"),
    "submit": ("hpc_gan.launch.cli_submit", "submit training jobs (one SLURM array task per variant, or local)"),
    "evaluate": ("hpc_gan.eval.cli_evaluate", "FID, PRD, precision/recall and label realism of generated patches"),
    "compare": ("hpc_gan.eval.cli_compare", "several evaluation reports in one table and one PRD plot"),
    "tstr": ("hpc_gan.eval.cli_tstr", "train a 3D U-Net per source (real / synthetic / both), test on real: DSC, bAVD"),
    "consolidate": ("hpc_gan.train.cli_consolidate", "gather a checkpoint's ZeRO shards into one generator file"),
    "checkpoints": ("hpc_gan.train.cli_checkpoints", "a run's checkpoints: tags, steps, world size, sizes, integrity"),
    "status": ("hpc_gan.launch.cli_status", "one row per variant: job state, step, losses, ETA, checkpoint, error"),
    "pull": ("hpc_gan.launch.cli_pull", "copy a run's consolidated generator here, consolidating it first if needed"),
    "sample": ("hpc_gan.cli_sample", "generate patches from a consolidated generator"),
    "plan": ("hpc_gan.train.cli_plan", "per-rank memory estimate and the largest batch that fits"),
    "weights": ("hpc_gan.models.cli_weights", "fetch pinned MedicalNet weights into the Hugging Face cache, or list them"),
}
EXIT_USER_ERROR = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2) instead of the usage text."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(commands: dict = COMMANDS) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="hpc_gan", description="3D TOF-MRA GANs on SLURM clusters")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    for name, (module, text) in commands.items():
        command = sub.add_parser(name, help=text, description=text)
        command.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(command)
    return parser


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, run, and map user errors to one line on stderr and exit status 2."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: return its status to in-process callers too
        return int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except HpcGanError as exc:
        if args.debug:
            raise
        print_error(f"error: {exc}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # a distributed command (evaluate, tstr) whose peer died: name it, not gloo
        if args.debug or "torch.distributed" not in sys.modules:
            raise
        from hpc_gan.peers import lost_peer_message

        message = lost_peer_message(exc)
        if message is None:
            raise
        print_error(f"error: {message}")
        return EXIT_USER_ERROR


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
