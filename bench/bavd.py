#!/usr/bin/env python
"""bAVD (default: k-d tree; and distance transforms) against brute-force nearest neighbours, one TOF-MRA-sized pair (JSON).

The pair is a random-tube vessel label of 312x384x127 voxels (0.5 x 0.5 x 0.8 mm, the size of the
paper's TOF-MRA volumes) and a perturbed copy: every tube moved by up to one voxel per axis, some
radii changed, some tubes dropped (misses) and isolated voxels added (false positives).

* ``bavd`` (``hpc_gan.eval.segmentation``) is timed on the full pair, in mm, with its default
  method (``auto``: a k-d tree of boundary voxels for sparse labels; target < 0.5 s) and with
  ``method="distance_transform"`` (two Euclidean distance transforms over all voxels).
* The brute force measures every pairwise distance, in chunks, from a random subsample of
  ``--samples`` voxels of each set to all voxels of the other set; its time is extrapolated
  linearly to all voxels of both sets (the cost per query voxel is the same for every voxel).
* Agreement: the subsampled distances against the distance-transform values at the same voxels
  (they must agree to rounding), and the bAVD estimated from the subsample against the exact one.
* A plain k-d tree (``scipy.spatial.cKDTree``) over all voxels of both sets computes the exact
  bAVD as an independent check of both methods.

    python bench/bavd.py                 # 312x384x127, ~30 s on 2 cores
    python bench/bavd.py --quick         # smoke run, 96x96x48, ~2 s
    python bench/bavd.py --samples 5000 --out bavd.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy
from scipy import ndimage
from scipy.spatial import cKDTree

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hpc_gan.cli_types import shape3  # noqa: E402
from hpc_gan.eval.segmentation import bavd, bavd_method  # noqa: E402

from _report import emit  # noqa: E402

SPACING = (0.5, 0.5, 0.8)
TARGET_SECONDS = 0.5
CHUNK = 16   # query voxels per brute-force block: (16, N, 3) float64 stays near 30 MB for N = 80k


def log(message: str) -> None:
    print(f"[bench/bavd] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", type=shape3, default=(312, 384, 127), help="volume size X,Y,Z")
    p.add_argument("--tubes", type=int, default=60, help="random tubes in the label")
    p.add_argument("--samples", type=int, default=2000, help="brute-force query voxels of each set")
    p.add_argument("--repeats", type=int, default=2, help="timed bavd calls (the median is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 96,96,48, 12 tubes, 300 samples, 1 repeat")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.tubes, args.samples, args.repeats = (96, 96, 48), 12, 300, 1
    return args


# --------------------------------------------------------------------------- data


def _ball(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    grid = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1].reshape(3, -1).T      # (K, 3)
    return grid[(grid**2).sum(1) <= radius**2]


def random_tubes(rng: np.random.Generator, shape, n: int) -> list[tuple[np.ndarray, float]]:
    """``n`` smooth random walks (centre points, (M, 3) int) with a radius in voxels each."""
    tubes = []
    for _ in range(n):
        steps = int(rng.integers(100, 400))
        direction = rng.normal(size=3)
        heading = np.cumsum(rng.normal(scale=0.15, size=(steps, 3)), axis=0) + direction / np.linalg.norm(direction)
        heading /= np.linalg.norm(heading, axis=1, keepdims=True)
        path = rng.uniform(0, shape) + np.cumsum(heading, axis=0)
        tubes.append((np.round(path).astype(int), float(rng.choice([0.8, 1.2, 1.8, 2.5]))))
    return tubes


def render(shape, tubes) -> np.ndarray:
    """Stamps a ball at every centre point; points outside the volume are clipped away."""
    mask = np.zeros(shape, bool)
    for centres, radius in tubes:
        points = (centres[:, None, :] + _ball(radius)[None]).reshape(-1, 3)
        inside = ((points >= 0) & (points < np.asarray(shape))).all(1)
        mask[tuple(points[inside].T)] = True
    return mask


def perturbed(rng: np.random.Generator, shape, tubes) -> np.ndarray:
    """A plausible prediction: tubes moved by <= 1 voxel, radii changed, 10% dropped, speckles."""
    kept = []
    for centres, radius in tubes:
        if rng.random() < 0.1:
            continue
        shift = rng.integers(-1, 2, size=3)
        kept.append((centres + shift, max(0.8, radius + float(rng.choice([-0.5, 0.0, 0.5])))))
    mask = render(shape, kept)
    speckles = rng.integers(0, shape, size=(max(50, mask.sum() // 500), 3))
    mask[tuple(speckles.T)] = True
    return mask


# --------------------------------------------------------------------------- brute force


def brute_force_distances(queries: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Distance from each query point (Q, 3) to its nearest target point (N, 3), all pairs."""
    out = np.empty(len(queries))
    for start in range(0, len(queries), CHUNK):
        diff = queries[start:start + CHUNK, None, :] - targets[None]        # (C, N, 3)
        out[start:start + CHUNK] = np.sqrt(np.einsum("cnk,cnk->cn", diff, diff).min(axis=1))
    return out


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def kdtree_bavd(g: np.ndarray, s: np.ndarray) -> float:
    return (cKDTree(s).query(g)[0].sum() + cKDTree(g).query(s)[0].sum()) / (2 * len(g))


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    log(f"rendering {args.tubes} tubes in {args.shape} and a perturbed copy")
    tubes = random_tubes(rng, args.shape, args.tubes)
    truth = render(args.shape, tubes)
    pred = perturbed(rng, args.shape, tubes)
    spacing = np.asarray(SPACING)
    g, s = np.argwhere(truth) * spacing, np.argwhere(pred) * spacing      # voxel centres in mm
    log(f"|G| = {len(g)}, |S| = {len(s)}; timing bavd x {args.repeats}")

    times, dt_times = [], []
    for _ in range(args.repeats):
        value, seconds = timed(bavd, pred, truth, SPACING)
        times.append(seconds)
        dt_value, seconds = timed(bavd, pred, truth, SPACING, "distance_transform")
        dt_times.append(seconds)
    bavd_s, dt_s = float(np.median(times)), float(np.median(dt_times))

    n_g, n_s = min(args.samples, len(g)), min(args.samples, len(s))
    idx_g, idx_s = rng.choice(len(g), n_g, replace=False), rng.choice(len(s), n_s, replace=False)
    log(f"brute force on {n_g} + {n_s} sampled voxels")
    d_gs, t_gs = timed(brute_force_distances, g[idx_g], s)
    d_sg, t_sg = timed(brute_force_distances, s[idx_s], g)
    brute_full_s = t_gs * len(g) / n_g + t_sg * len(s) / n_s

    # The same terms read off the distance transforms that bavd uses.
    to_pred = ndimage.distance_transform_edt(~pred, sampling=SPACING)
    to_truth = ndimage.distance_transform_edt(~truth, sampling=SPACING)
    edt_gs = to_pred[tuple(np.argwhere(truth)[idx_g].T)]
    edt_sg = to_truth[tuple(np.argwhere(pred)[idx_s].T)]
    estimate = (len(g) * d_gs.mean() + len(s) * d_sg.mean()) / (2 * len(g))

    log("exact bAVD with a k-d tree")
    kd_value, kd_s = timed(kdtree_bavd, g, s)
    result = {
        "bavd_mm": value,
        "method": bavd_method(pred, truth),
        "bavd_seconds": bavd_s,
        "bavd_seconds_all": times,
        "target_seconds": TARGET_SECONDS,
        "meets_target": bavd_s < TARGET_SECONDS,
        "distance_transform": {"bavd_mm": dt_value, "seconds": dt_s, "seconds_all": dt_times,
                               "abs_diff_vs_bavd": abs(dt_value - value)},
        "brute_force_sampled_seconds": t_gs + t_sg,
        "brute_force_extrapolated_seconds": brute_full_s,
        "speedup_extrapolated": brute_full_s / bavd_s,
        "agreement": {
            "max_abs_diff_sampled_terms_mm": float(max(np.abs(d_gs - edt_gs).max(), np.abs(d_sg - edt_sg).max())),
            "bavd_estimated_from_samples_mm": float(estimate),
            "relative_diff_estimate_vs_exact": float(abs(estimate - value) / value),
        },
        "kdtree": {"bavd_mm": float(kd_value), "seconds": kd_s, "abs_diff_vs_bavd": float(abs(kd_value - value))},
        "settings": {"shape": list(args.shape), "spacing_mm": list(SPACING), "tubes": args.tubes,
                     "truth_voxels": int(len(g)), "pred_voxels": int(len(s)), "vessel_fraction": float(truth.mean()),
                     "dice": float(2 * (pred & truth).sum() / (len(g) + len(s))),
                     "samples_truth": int(n_g), "samples_pred": int(n_s), "seed": args.seed},
        "environment": {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                        "python": platform.python_version(), "numpy": np.__version__,
                        "scipy": scipy.__version__, "cpus": len(os.sched_getaffinity(0))},
    }
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
