"""``hpc_gan pack``: NIfTI images + labels (+ brain masks) -> sharded HDF5 patches + manifest."""

from __future__ import annotations

import argparse

from hpc_gan.cli_types import fractions3, non_negative_int, positive_int, shape3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="directory of image .nii.gz files")
    parser.add_argument("--labels", required=True, help="directory of vessel labels (same subject ids)")
    parser.add_argument("--masks", help="optional directory of brain masks (same subject ids)")
    parser.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    parser.add_argument("--patch-shape", type=shape3, default=(128, 128, 64), help="patch size X,Y,Z (default 128,128,64)")
    parser.add_argument("--grid", type=shape3, default=(3, 3, 2), help="grid patches per axis (default 3,3,2)")
    parser.add_argument("--vessel-patches", type=non_negative_int, default=32, help="vessel-centred patches per subject (default 32)")
    parser.add_argument("--split", type=fractions3, default=(0.8, 0.1, 0.1), help="train,val,test fractions of subjects")
    parser.add_argument("--split-file", help="JSON {train: [ids], val: [...], test: [...]} instead of --split")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seeds the split and the vessel-centred patches")
    parser.add_argument("--compression", default="lzf", help="lzf (default), gzip, none or blosc")
    parser.add_argument("--patches-per-shard", type=positive_int, default=64)
    parser.add_argument("--workers", type=positive_int, default=1, help="processes writing shards in parallel")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from hpc_gan.data import pack as packing
    from hpc_gan.data.manifest import MANIFEST
    from hpc_gan.data.patches import SamplingPlan
    from hpc_gan.io import check_output_path

    check_output_path(args.out, "--out")  # before reading any volume
    subjects = packing.match_subjects(args.images, args.labels, args.masks)
    explicit = packing.read_split_file(args.split_file) if args.split_file else None
    splits = packing.assign_splits([s.id for s in subjects], args.split, args.seed, explicit)
    plan = SamplingPlan(tuple(args.patch_shape), tuple(args.grid), args.vessel_patches, args.seed)
    manifest = packing.pack(subjects, splits, args.out, plan, args.compression, args.patches_per_shard,
                            args.workers, args.overwrite, progress=not args.no_progress)
    print(summary(manifest))
    print(f"manifest: {args.out}/{MANIFEST}")
    return 0


def summary(manifest: dict) -> str:
    """A few lines a person reads after packing or when inspecting a dataset."""
    shape = "x".join(map(str, manifest["patch_shape"]))
    spacing = "x".join(f"{s:g}" for s in manifest["spacing"])
    orientation = f" ({manifest['orientation']})" if "orientation" in manifest else ""
    lines = [f"patches {shape} voxels at {spacing} mm{orientation}, compression {manifest['compression']}"]
    for split, entry in manifest["splits"].items():
        size = sum(s["bytes"] for s in entry["shards"])
        lines.append(f"  {split:5s}: {len(entry['subjects']):3d} subjects  {entry['n_patches']:6d} patches  "
                     f"{len(entry['shards']):4d} shards  {size / 2**20:9.1f} MiB")
    return "\n".join(lines)
