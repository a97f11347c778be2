"""Patch sampling as in the paper: a regular grid plus patches centred on random vessel voxels.

On a 312x384x127 volume with 128x128x64 patches the paper takes a 3x3x2 grid (18 patches) and
32 vessel-centred patches per subject. Patches that reach past the volume are zero-padded.
Image patches are min-max scaled to [-1, 1] per patch; the label is copied exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpc_gan.errors import DataError

Shape3 = tuple[int, int, int]


@dataclass(frozen=True)
class SamplingPlan:
    """How patches are drawn from each subject (recorded in the manifest)."""

    patch_shape: Shape3 = (128, 128, 64)
    grid: Shape3 = (3, 3, 2)
    vessel_patches: int = 32
    seed: int = 0

    def to_dict(self) -> dict:
        return {"patch_shape": list(self.patch_shape), "grid": list(self.grid),
                "vessel_patches": self.vessel_patches, "seed": self.seed, "padding": "zero"}


def grid_origins(volume_shape: Shape3, patch_shape: Shape3, grid: Shape3) -> np.ndarray:
    """Corners of an evenly spaced grid of patches that together span the volume.

    Args:
        volume_shape: e.g. (312, 384, 127).
        patch_shape: e.g. (128, 128, 64).
        grid: patches per axis, e.g. (3, 3, 2).

    Returns:
        (prod(grid), 3) int array of patch corners, first and last flush with the volume edges.

    Raises:
        DataError: the volume is smaller than the patch along an axis.
    """
    _check_fits(volume_shape, patch_shape)
    axes = []
    for size, patch, count in zip(volume_shape, patch_shape, grid):
        axes.append(np.round(np.linspace(0, size - patch, count)).astype(np.int64) if count > 1
                    else np.array([(size - patch) // 2], dtype=np.int64))
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


def vessel_origins(label: np.ndarray, patch_shape: Shape3, count: int, rng: np.random.Generator,
                   subject: str = "") -> np.ndarray:
    """Corners of ``count`` patches centred on vessel voxels drawn uniformly at random.

    Returns:
        (count, 3) int array; corners may be negative or reach past the volume (zero padding).

    Raises:
        DataError: the label has no vessel voxel, so vessel-centred sampling is impossible.
    """
    if count == 0:
        return np.zeros((0, 3), dtype=np.int64)
    vessels = np.flatnonzero(label)
    if vessels.size == 0:
        raise DataError(f"subject '{subject}' has an empty label: no vessel voxel to centre patches on; "
                        "check the label file or use --vessel-patches 0")
    picks = rng.choice(vessels, size=count, replace=vessels.size < count)
    centres = np.stack(np.unravel_index(picks, label.shape), axis=1)
    return centres - np.asarray(patch_shape, dtype=np.int64) // 2


def plan_origins(label: np.ndarray, plan: SamplingPlan, subject_index: int, subject: str = "") -> np.ndarray:
    """All patch corners of one subject: the grid, then the vessel-centred ones (deterministic)."""
    _check_fits(label.shape, plan.patch_shape, subject)
    rng = np.random.default_rng(np.random.SeedSequence([plan.seed, subject_index]))
    grid = grid_origins(label.shape, plan.patch_shape, plan.grid) if np.prod(plan.grid) else np.zeros((0, 3), np.int64)
    return np.concatenate([grid, vessel_origins(label, plan.patch_shape, plan.vessel_patches, rng, subject)])


def extract(volume: np.ndarray, origin: np.ndarray, patch_shape: Shape3) -> np.ndarray:
    """Copy a patch starting at ``origin``; voxels outside the volume are 0.

    Example:
        >>> extract(np.ones((10, 10, 10)), np.array([-2, 0, 8]), (4, 4, 4)).sum()
        16.0
    """
    out = np.zeros(patch_shape, dtype=volume.dtype)
    src, dst = [], []
    for start, size, length in zip(origin, patch_shape, volume.shape):
        lo, hi = max(start, 0), min(start + size, length)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - start, lo - start + max(hi - lo, 0)))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def minmax_normalise(patch: np.ndarray) -> np.ndarray:
    """Scale a patch to [-1, 1] by its own minimum and maximum; a constant patch becomes -1."""
    patch = patch.astype(np.float32)
    lo, hi = float(patch.min()), float(patch.max())
    if hi <= lo:
        return np.full_like(patch, -1.0)
    return (2.0 * (patch - lo) / (hi - lo) - 1.0).astype(np.float32)


def _check_fits(volume_shape, patch_shape, subject: str = "") -> None:
    if any(v < p for v, p in zip(volume_shape, patch_shape)):
        who = f"subject '{subject}': " if subject else ""
        raise DataError(f"{who}volume {tuple(volume_shape)} is smaller than the patch {tuple(patch_shape)}; "
                        "use a smaller --patch-shape")
