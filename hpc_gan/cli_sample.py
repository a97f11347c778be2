"""``hpc_gan sample CONSOLIDATED --n N --out DIR``: generated patches (NIfTI or HDF5) + pictures."""

from __future__ import annotations

import argparse

from hpc_gan.cli_types import spacing3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("consolidated", help="generator file from `hpc_gan consolidate` (or `hpc_gan pull`)")
    parser.add_argument("--n", type=int, required=True, help="number of samples (>= 1)")
    parser.add_argument("--out", required=True, help="output directory (must be empty unless --overwrite)")
    parser.add_argument("--format", default="nifti", choices=("nifti", "hdf5"),
                        help="nifti: one image/label .nii.gz pair per sample (default); "
                             "hdf5: training-format shards + manifest.json")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed (SEED, i); default 0")
    parser.add_argument("--threshold", type=float,
                        help="label threshold on (x + 1) / 2 (default: the run's model.label_threshold, 0.5)")
    parser.add_argument("--batch", type=int, default=8, help="samples per forward pass (memory only; default 8)")
    parser.add_argument("--spacing", type=spacing3, default=(0.5, 0.5, 0.8),
                        help="voxel size in mm used only when the training manifest (config data.root) "
                             "cannot be read here; default 0.5,0.5,0.8")
    parser.add_argument("--variant", help="refuse a file of another variant")
    parser.add_argument("--raw", action="store_true",
                        help="use the trained weights, not their moving average (EMA), when the run kept one")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous sampling run in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from hpc_gan.sample import sample_to_disk

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    done = sample_to_disk(args.consolidated, args.n, args.out, args.format, args.seed, args.threshold, args.batch,
                          args.spacing, args.overwrite, device, args.variant, progress=not args.no_progress,
                          raw=args.raw)
    spacing = "x".join(f"{s:g}" for s in done["spacing"])
    weights = f"EMA weights, decay {done['ema_decay']:g}" if done["weights"] == "ema" else "raw weights"
    print(f"{done['n']} {done['variant']} samples (step {done['step']}, {weights}, seed {done['seed']}, "
          f"threshold {done['threshold']:g}, {spacing} mm from {done['spacing_source']['source']}) "
          f"as {done['format']} in {done['out']}")
    print(f"pictures: {done['montage']}  {done['mip']}")
    dp = done.get("privacy")
    print(f"privacy: DP-SGD critic, epsilon {dp['epsilon']:.4g} at delta {dp['delta']:.3g} (patch level; "
          "docs/PRIVACY.md)" if dp else "privacy: no formal guarantee (not trained with differential privacy)")
    return 0
