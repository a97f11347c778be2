"""``hpc_gan tstr``: train a 3D U-Net per source, test on real volumes (see hpc_gan.eval.tstr)."""

from __future__ import annotations

import argparse
import os

from hpc_gan.cli_types import add_data_cache_arguments, data_cache_settings, non_negative_int, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--real", required=True, help="packed real data (train / val / test splits)")
    parser.add_argument("--images", required=True, help="NIfTI images of the real subjects (for the test split)")
    parser.add_argument("--labels", required=True, help="their vessel labels")
    parser.add_argument("--masks", help="their brain masks (enables the intracranial setting)")
    parser.add_argument("--source", action="append", required=True,
                        help="real | NAME=SAMPLE_DIR | NAME=GENERATOR.pt | NAME+real=... (repeatable)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=positive_int, default=2000, help="maximum training steps per source")
    parser.add_argument("--val-every", type=positive_int, default=100)
    parser.add_argument("--patience", type=positive_int, default=5, help="validation checks without improvement")
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--channels", type=positive_int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--seed", type=non_negative_int, default=0)
    add_data_cache_arguments(parser)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from hpc_gan import dist
    from hpc_gan.io import check_output_path

    check_output_path(args.out, "--out")  # before any training
    env = dist.join_process_group()
    from hpc_gan.eval.tstr import TstrConfig, run_tstr

    settings = TstrConfig(args.real, args.images, args.labels, args.source, args.out, masks=args.masks,
                          steps=args.steps, val_every=args.val_every, patience=args.patience, batch=args.batch,
                          lr=args.lr, channels=args.channels, seed=args.seed, data_cache=data_cache_settings(args))
    rows = run_tstr(settings, env.rank, env.world_size)
    if env.rank == 0:
        from hpc_gan.eval.segmentation import summary_table

        print(summary_table(rows))
        print(f"per-subject scores: {args.out}/scores.csv; plots: {args.out}/boxplots.png, {args.out}/error_map_*.png")
    return 0
