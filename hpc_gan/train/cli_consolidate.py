"""``hpc_gan consolidate RUN_DIR [--tag TAG | --best]``: one fp32 generator file from a run's ZeRO shards."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (holding checkpoints/)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--tag", help="checkpoint tag, e.g. step-00000300 (default: the newest complete one)")
    which.add_argument("--best", action="store_true",
                       help="the checkpoint with the lowest FID of the evaluations during training (checkpoints/best)")
    parser.add_argument("--out", help="output file (default RUN_DIR/consolidated/generator-TAG.pt)")


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from hpc_gan.io import check_output_path
    from hpc_gan.train.consolidate import consolidate, load_generator

    if args.out:
        check_output_path(args.out, "--out", kind="file")  # a directory, under a file, not writable: one line
    path = consolidate(args.run_dir, args.tag, args.out, best=args.best)
    _, meta = load_generator(path)
    ema = meta["ema"]
    extra = f" (raw weights and their EMA, decay {ema['decay']:g})" if ema else ""
    if args.best:
        from hpc_gan.train.evaluation import best_fid

        fid = best_fid(Path(args.run_dir) / "checkpoints")
        extra += f", the best checkpoint (FID {fid:.4g} during training)" if fid is not None else ", the best checkpoint"
    print(f"consolidated {meta['variant']} generator at step {meta['step']}{extra}: {path}")
    return 0
