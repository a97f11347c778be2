"""``hpc_gan make-phantoms``: the default dataset, since real TOF-MRA scans cannot be shipped."""

from __future__ import annotations

import argparse

from hpc_gan.cli_types import non_negative_int, positive_int, shape3, spacing3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (images/, labels/, masks/ are made in it)")
    parser.add_argument("--subjects", type=positive_int, default=10, help="number of subjects (default 10)")
    parser.add_argument("--shape", type=shape3, default=(96, 96, 48), help="volume size X,Y,Z (paper: 312,384,127)")
    parser.add_argument("--spacing", type=spacing3, default=(0.5, 0.5, 0.8), help="voxel size in mm")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--workers", type=positive_int, default=1, help="processes")
    parser.add_argument("--overwrite", action="store_true", help="replace existing phantoms in --out")


def run(args: argparse.Namespace) -> int:
    from hpc_gan.data.phantom import write_phantom_dataset
    from hpc_gan.errors import DataError, HpcGanError

    try:
        ids = write_phantom_dataset(args.out, args.subjects, shape=args.shape, spacing=args.spacing,
                                    seed=args.seed, workers=args.workers, overwrite=args.overwrite)
    except HpcGanError:
        raise
    except ValueError as exc:
        raise DataError(str(exc)) from None
    print(f"wrote {len(ids)} phantom subjects of shape {args.shape} to {args.out} (MIP: {args.out}/mip_{ids[0]}.png)")
    return 0
