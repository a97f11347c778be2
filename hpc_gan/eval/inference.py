"""Sliding-window (tiled) inference of a patch-trained segmenter over whole volumes.

The downstream U-Net is trained on patches (128 x 128 x 64 in the paper) and tested on real
volumes of any size. :func:`sliding_window_predict` cuts a volume into overlapping tiles of the
training patch shape, prepares each tile exactly as a training patch was prepared (min-max to
[-1, 1] by the tile's own range, :func:`hpc_gan.data.patches.minmax_normalise`), runs the model on
batches of tiles and averages the overlapping predictions back into one probability map.

Tiling along an axis of size ``n`` with patch ``p`` and ``stride = max(1, floor(p * (1 - overlap)))``:
tiles start at ``0, stride, 2 stride, ...`` and one last tile sits flush with the end
(``n - p``), so every voxel is covered. An axis shorter than its patch gets a single tile and is
padded at the end; the padded voxels never reach the output.

Padding: normalisation uses only the voxels inside the volume, so a tile that overhangs the
volume is normalised like the unpadded region alone; the overhang is then filled with the
normalised background value -1 (with ``normalise=False``: the raw value 0, i.e. zero padding).

Example:
    >>> net = UNet3d(channels=(8, 16, 32, 64)).eval()
    >>> prob = sliding_window_predict(net, np.random.rand(200, 180, 70), (64, 64, 32))
    >>> prob.shape, prob.dtype                               # doctest: +SKIP
    ((200, 180, 70), dtype('float32'))
    >>> predict_mask(prob).dtype                             # doctest: +SKIP
    dtype('bool')
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from numbers import Real

import numpy as np
import torch
from torch import nn

from hpc_gan.data.patches import minmax_normalise
from hpc_gan.models.gan import _check_positive_int, _is_int

__all__ = ["WEIGHTINGS", "predict_mask", "sliding_window_predict", "tile_starts"]

#: How overlapping tile predictions are averaged. "uniform": every voxel of a tile counts the
#: same. "gaussian": a separable Gaussian centred on the tile (sigma = patch / 8, as MONAI's
#: ``sliding_window_inference(mode="gaussian")``), which down-weights tile borders where a
#: convolutional network sees zero padding instead of context.
WEIGHTINGS: tuple[str, ...] = ("uniform", "gaussian")

_Slices = tuple[slice, slice, slice]


def tile_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of the tiles along one axis.

    Args:
        size: length of the axis, >= 1.
        patch: tile length, >= 1.
        overlap: fraction of the tile shared with the next one, in [0, 1).

    Returns:
        Sorted start indices; ``[0]`` when ``size <= patch``, otherwise
        ``0, stride, 2 stride, ...`` plus ``size - patch`` so the last tile ends flush with the
        axis. E.g. ``tile_starts(10, 4, 0.5) == [0, 2, 4, 6]``, ``tile_starts(9, 4, 0.0) ==
        [0, 4, 5]``.
    """
    if size <= patch:
        return [0]
    stride = max(1, math.floor(patch * (1.0 - overlap)))
    starts = list(range(0, size - patch, stride))
    return starts + [size - patch]


def sliding_window_predict(
    model: nn.Module,
    volume: np.ndarray | torch.Tensor,
    patch_shape: Sequence[int] = (128, 128, 64),
    overlap: float = 0.5,
    batch_size: int = 2,
    device: str | torch.device = "cpu",
    normalise: bool = True,
    weighting: str = "uniform",
) -> np.ndarray:
    """Probability map of a whole volume from a model trained on patches.

    The model is run in eval mode under ``torch.no_grad`` and restored to its previous mode
    afterwards. It must already live on ``device``; tiles are moved there batch by batch.

    Args:
        model: maps (B, 1, *patch_shape) float32 to (B, 1, *patch_shape) probabilities, e.g.
            :class:`hpc_gan.models.unet.UNet3d`.
        volume: (X, Y, Z) intensities, e.g. a (512, 512, 120) TOF-MRA volume; any real dtype.
        patch_shape: tile shape (the training patch shape), e.g. (128, 128, 64).
        overlap: fraction each tile shares with its neighbour along every axis, in [0, 1);
            0.5 gives stride (64, 64, 32) for the default patch.
        batch_size: tiles per forward pass.
        device: where the tiles are sent.
        normalise: min-max every tile to [-1, 1] by its own range, as the training patches were
            (:func:`hpc_gan.data.patches.minmax_normalise`); ``False`` feeds raw intensities.
        weighting: one of :data:`WEIGHTINGS`; how overlapping predictions are averaged.

    Returns:
        (X, Y, Z) float32 probabilities, the (weighted) mean of every tile covering each voxel.

    Raises:
        ValueError: if ``volume`` is not 3D or an argument is invalid (the message names it), or
            if the model's output is not (B, 1, *patch_shape).
    """
    array = _as_volume(volume)
    patch = _check_patch_shape(patch_shape)
    overlap = _check_overlap(overlap)
    batch_size = _check_positive_int("batch_size", batch_size)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")

    weights = _tile_weights(patch, weighting)  # (*patch,)
    total = np.zeros(array.shape, dtype=np.float64)  # weighted sum of predictions
    norm = np.zeros(array.shape, dtype=np.float64)  # sum of weights
    regions = list(_tile_regions(array.shape, patch, overlap))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for first in range(0, len(regions), batch_size):
                batch = regions[first : first + batch_size]
                tiles = np.stack([_tile(array, region, patch, normalise) for region in batch])
                x = torch.from_numpy(tiles[:, None]).to(device)  # (B, 1, *patch)
                pred = _run(model, x, patch)  # (B, *patch)
                for region, tile_pred in zip(batch, pred):
                    valid = tuple(slice(0, s.stop - s.start) for s in region)
                    total[region] += weights[valid] * tile_pred[valid]
                    norm[region] += weights[valid]
    finally:
        model.train(was_training)
    assert norm.min() > 0, "tiling left a voxel uncovered"
    return (total / norm).astype(np.float32)


def predict_mask(prob: np.ndarray | torch.Tensor, threshold: float = 0.5) -> np.ndarray:
    """Binary mask of a probability map: ``prob > threshold``.

    Args:
        prob: probabilities of any shape, e.g. (X, Y, Z) from :func:`sliding_window_predict`.
        threshold: decision threshold in [0, 1].

    Returns:
        bool array of the same shape.

    Raises:
        ValueError: if ``threshold`` is not a number in [0, 1].
    """
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if isinstance(prob, torch.Tensor):
        prob = prob.detach().cpu().numpy()
    return np.asarray(prob) > threshold


# --------------------------------------------------------------------------- helpers


def _as_volume(volume: object) -> np.ndarray:
    if isinstance(volume, torch.Tensor):
        volume = volume.detach().cpu().numpy()
    if not isinstance(volume, np.ndarray) or volume.ndim != 3 or volume.size == 0:
        shape = getattr(volume, "shape", type(volume).__name__)
        raise ValueError(f"volume must be a non-empty 3D (X, Y, Z) array, got {shape}")
    return volume


def _check_patch_shape(patch_shape: object) -> tuple[int, int, int]:
    if (
        isinstance(patch_shape, (str, bytes))
        or not isinstance(patch_shape, Sequence)
        or len(patch_shape) != 3
        or not all(_is_int(s) and s > 0 for s in patch_shape)
    ):
        raise ValueError(f"patch_shape must be 3 positive ints, got {patch_shape!r}")
    return tuple(int(s) for s in patch_shape)  # type: ignore[return-value]


def _check_overlap(overlap: object) -> float:
    if isinstance(overlap, bool) or not isinstance(overlap, Real) or not 0 <= overlap < 1:
        raise ValueError(f"overlap must be a number in [0, 1), got {overlap!r}")
    return float(overlap)


def _tile_regions(
    shape: tuple[int, ...], patch: tuple[int, int, int], overlap: float
) -> Iterator[_Slices]:
    """The part of the volume under each tile (shorter than the patch on a padded axis)."""
    starts = [tile_starts(n, p, overlap) for n, p in zip(shape, patch)]
    for corner in itertools.product(*starts):
        yield tuple(slice(c, min(c + p, n)) for c, p, n in zip(corner, patch, shape))  # type: ignore[misc]


def _tile(array: np.ndarray, region: _Slices, patch: tuple[int, int, int], normalise: bool):
    """One (*patch) float32 model input: the region, normalised, padded at the end."""
    inside = array[region]
    if normalise:
        inside, fill = minmax_normalise(inside), -1.0
    else:
        inside, fill = inside.astype(np.float32), 0.0
    tile = np.full(patch, fill, dtype=np.float32)
    tile[tuple(slice(0, s) for s in inside.shape)] = inside
    return tile


def _run(model: nn.Module, x: torch.Tensor, patch: tuple[int, int, int]) -> np.ndarray:
    out = model(x)
    expected = (x.shape[0], 1, *patch)
    if tuple(out.shape) != expected:
        raise ValueError(
            f"model output must have shape {expected} (one probability channel), "
            f"got {tuple(out.shape)}"
        )
    return out[:, 0].float().cpu().numpy()  # (B, *patch)


def _tile_weights(patch: tuple[int, int, int], weighting: str) -> np.ndarray:
    if weighting == "uniform":
        return np.ones(patch, dtype=np.float64)
    axes = []
    for p in patch:
        centre, sigma = (p - 1) / 2, p / 8
        axes.append(np.exp(-0.5 * ((np.arange(p) - centre) / sigma) ** 2))
    weights = np.einsum("i,j,k->ijk", *axes)
    # Keep border weights away from 0 so a voxel seen only by tile borders is still defined.
    return np.maximum(weights / weights.max(), 1e-3)
