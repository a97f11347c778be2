"""``make demo``: the main job end to end on the embedded default, on this machine's CPU.

Phantom TOF-MRA volumes -> sharded HDF5 patches (smoke-profile patch size) -> summary.
Everything goes to ``demo_out/`` and is replaced on every run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from hpc_gan.config import load_config, save_config
from hpc_gan.data import pack as packing
from hpc_gan.data.cli_pack import summary
from hpc_gan.data.dataset import ShardedPatchDataset
from hpc_gan.data.patches import SamplingPlan
from hpc_gan.data.phantom import write_phantom_dataset
from hpc_gan.errors import HpcGanError

log = logging.getLogger("hpc_gan.demo")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="output directory (replaced)")
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    cfg = load_config("sn_mp", profile="smoke", overrides=[f"data.root={out / 'shards'}", f"output_root={out / 'runs'}",
                                                              "name=demo"])
    started = time.perf_counter()
    log.info("1/2 phantoms: %d subjects of 96x96x48 voxels at 0.5x0.5x0.8 mm", args.subjects)
    ids = write_phantom_dataset(out / "phantoms", args.subjects, seed=0, workers=args.workers, overwrite=True)
    log.info("2/2 packing %s patches into shards", "x".join(map(str, cfg.model.patch_shape)))
    subjects = packing.match_subjects(out / "phantoms/images", out / "phantoms/labels", out / "phantoms/masks")
    splits = packing.assign_splits(ids, (0.75, 0.125, 0.125), seed=0)
    manifest = packing.pack(subjects, splits, cfg.data.root, SamplingPlan(cfg.model.patch_shape, (3, 3, 2), 32, 0),
                            workers=args.workers, overwrite=True, progress=False)
    dataset = ShardedPatchDataset(cfg.data.root, "train", verify="full")
    save_config(cfg, cfg.run_dir / "config.yaml")
    print(summary(manifest))
    print(f"first training patch: {tuple(dataset[0].shape)} float tensor, image in "
          f"[{float(dataset[0][0].min()):.2f}, {float(dataset[0][0].max()):.2f}]")
    print(f"phantom MIP picture: {out / 'phantoms' / f'mip_{ids[0]}.png'}")
    print(f"resolved run config: {cfg.run_dir / 'config.yaml'}")
    print(f"demo finished in {time.perf_counter() - started:.1f} s")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        run(parse_args(argv))
    except HpcGanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
