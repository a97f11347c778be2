"""``hpc_gan checkpoints RUN_DIR``: a run's checkpoints with step, world size, size and integrity.

Integrity compares every file with the size and SHA-256 its ``state.json`` records (as resume
does before loading anything); ``--sizes-only`` skips the hashing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hpc_gan.errors import CheckpointError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (holding checkpoints/) or its checkpoints/ directory")
    parser.add_argument("--sizes-only", action="store_true", help="compare file sizes only (no SHA-256)")


def human_size(n: int) -> str:
    """Bytes as e.g. ``812B``, ``3.4KiB``, ``1.2GiB`` (one token, for column output)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TiB"


def run(args: argparse.Namespace) -> int:
    from hpc_gan.train import checkpoint as ckpt

    root = Path(args.run_dir)
    root = root if root.name == "checkpoints" else root / "checkpoints"
    if not root.is_dir():
        raise CheckpointError(f"'{root}' does not exist: give a run directory (holding checkpoints/)")
    rows = ckpt.inventory(root, deep=not args.sizes_only)
    print(f"{'tag':<14} {'step':>8} {'ranks':>5} {'files':>5} {'size':>9} {'pointers':<12} integrity")
    for row in rows:
        pointers = ",".join(name for name in ("latest", "best") if row[name]) or "-"
        ranks = "-" if row["world_size"] is None else str(row["world_size"])
        print(f"{row['tag']:<14} {row['step']:>8} {ranks:>5} {row['files']:>5} {human_size(row['bytes']):>9} "
              f"{pointers:<12} {row['integrity']}")
    if not rows:
        print(f"(no checkpoints in {root})")
    return 0
