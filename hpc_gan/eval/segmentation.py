"""Downstream segmentation scores: Dice (DSC) and balanced average Hausdorff distance (bAVD).

The downstream test of Subramaniam et al. (2022) trains a 3D U-Net on synthetic image-label
pairs and scores its predictions on real volumes. For one binary prediction S and ground truth G
(boolean (X, Y, Z) arrays of the same shape):

* ``DSC = 2 |S ∩ G| / (|S| + |G|)``.
* ``bAVD = (Σ_{g∈G} d(g, S) + Σ_{s∈S} d(s, G)) / (2 |G|)``, where ``d(p, A)`` is the Euclidean
  distance from the centre of voxel p to the nearest voxel centre of A. Both sums are divided by
  |G| (not |S|): that is what makes it "balanced", so a prediction is not rewarded for being
  small. With ``spacing=(1, 1, 1)`` the result is in voxels, with the real voxel size in mm.

Two exact methods compute the distances (both equal the all-pairs definition to rounding, 1e-9
in the tests); ``bavd(..., method="auto")`` picks one by a fixed rule:

* ``kdtree``: a voxel of G ∩ S is at distance 0. Any other voxel's nearest voxel of A lies on
  A's boundary (a voxel of A with a 6-neighbour outside A: from an interior voxel one step
  towards the query point is always nearer), so a ``scipy.spatial.cKDTree`` of the boundary
  voxel centres (in mm) answers the queries of the symmetric difference G Δ S. Cost grows with
  the vessel voxels, not the volume: 0.1 s for a 312×384×127 pair (docs/BENCHMARKS.md).
* ``distance_transform``: ``scipy.ndimage.distance_transform_edt(~A, sampling=spacing)`` gives
  every voxel's distance to A in one pass over the whole volume (O(voxels), seconds at that size).

Rule (``auto``): the k-d tree unless the voxels to query, |G Δ S|, exceed ``DENSE_FRACTION`` of
the volume, where the transforms' fixed per-voxel cost is the cheaper one (dense labels).

Edge cases (the values these functions return, and why):

=====================  =====  ======  ============================================================
case                   DSC    bAVD    reason
=====================  =====  ======  ============================================================
both empty             1.0    0.0     the prediction is exactly right
empty prediction       0.0    inf     no predicted voxel to measure the truth's distances to
empty truth            0.0    inf     |G| = 0 in the denominator; the prediction is all wrong
=====================  =====  ======  ============================================================

bAVD uses ``inf`` (never NaN) so that sorting and "lower is better" comparisons still work; the
mean over subjects that include such a case is ``inf`` too, which :func:`summary_table` shows as
``inf``. Box plots leave non-finite values out and say how many in the axis label.

Example:
    >>> pred = np.zeros((8, 8, 8), bool); truth = np.zeros((8, 8, 8), bool)
    >>> pred[1, 4, 4] = truth[4, 4, 4] = True
    >>> dice(pred, truth), bavd(pred, truth), bavd(pred, truth, spacing=(0.8, 0.5, 0.5))
    (0.0, 3.0, 2.4000000000000004)
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from hpc_gan.data.phantom import mip
from hpc_gan.plots import new_figure, save_png
from hpc_gan.errors import DataError
from hpc_gan.io import write_text_atomic

INTRACRANIAL = "intracranial_"
METRICS = ("dsc", "bavd_voxels", "bavd_mm")
SETTINGS = (("all", ""), ("intracranial", INTRACRANIAL))   # (name, key prefix)
BAVD_METHODS = ("auto", "kdtree", "distance_transform")
# |G Δ S| / voxels above which bavd's auto rule uses distance transforms: measured crossover of
# the two methods' times on random masks (|G Δ S| / voxels ≈ 0.18, docs/BENCHMARKS.md), rounded down.
DENSE_FRACTION = 0.15
SPACING_RTOL = 1e-4   # NIfTI headers store float32 spacings; a rounding difference is the same grid
# Overlay colours (RGB) of the error map, as in the paper's Fig. 7.
TP_COLOUR, FP_COLOUR, FN_COLOUR = (1.0, 0.0, 0.0), (0.0, 0.8, 0.0), (1.0, 0.9, 0.0)


# --------------------------------------------------------------------------- validation


def _as_mask(name: str, array) -> np.ndarray:
    """A bool (X, Y, Z) copy-free view where possible; 0/1 integers and floats are accepted."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise DataError(f"{name} must be a 3-D (X, Y, Z) mask, got shape {array.shape}")
    if array.dtype == bool:
        return array
    if not ((array == 0) | (array == 1)).all():
        raise DataError(f"{name} must hold only 0 and 1; binarise it first (e.g. threshold at 0.5)")
    return array.astype(bool)


def _check_spacing(name: str, spacing) -> tuple[float, float, float]:
    values = tuple(np.asarray(spacing, dtype=float).ravel()) if spacing is not None else ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise DataError(f"{name} must be 3 positive finite voxel sizes (mm), got {spacing!r}")
    return tuple(float(v) for v in values)


def _check_shapes(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = _as_mask("prediction", pred), _as_mask("truth", truth)
    if pred.shape != truth.shape:
        raise DataError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}; "
                        "resample the prediction onto the truth's grid")
    return pred, truth


def check_pair(pred, truth, pred_spacing, truth_spacing) -> tuple[np.ndarray, np.ndarray]:
    """Checks that a prediction and its ground truth lie on the same voxel grid.

    Args:
        pred, truth: (X, Y, Z) bool or 0/1 masks, e.g. (312, 384, 127).
        pred_spacing, truth_spacing: voxel sizes in mm, e.g. (0.5, 0.5, 0.8); equal within a
            relative tolerance of ``SPACING_RTOL`` (float32 header rounding).

    Returns:
        (pred, truth) as bool arrays.

    Raises:
        DataError: a mask is not 3-D or not binary, the shapes differ or the spacings differ.
    """
    pred, truth = _check_shapes(pred, truth)
    ps, ts = _check_spacing("prediction spacing", pred_spacing), _check_spacing("truth spacing", truth_spacing)
    if not np.allclose(ps, ts, rtol=SPACING_RTOL, atol=0.0):
        raise DataError(f"prediction spacing {ps} differs from truth spacing {ts} (mm); "
                        "resample the prediction onto the truth's grid")
    return pred, truth


# --------------------------------------------------------------------------- metrics


def dice(pred, truth) -> float:
    """Dice similarity coefficient ``2 |S ∩ G| / (|S| + |G|)``; 1.0 when both are empty.

    Args:
        pred, truth: (X, Y, Z) bool or 0/1 masks of the same shape, e.g. (64, 64, 32).

    Returns:
        DSC in [0, 1].

    Raises:
        DataError: a mask is not 3-D or not binary, or the shapes differ (both are named).
    """
    pred, truth = _check_shapes(pred, truth)
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(truth))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & truth)) / total


def bavd(pred, truth, spacing=(1.0, 1.0, 1.0), method: str = "auto") -> float:
    """Balanced average Hausdorff distance ``(Σ_G d(g, S) + Σ_S d(s, G)) / (2 |G|)``.

    Args:
        pred, truth: (X, Y, Z) bool or 0/1 masks of the same shape, e.g. (312, 384, 127).
        spacing: voxel size (sx, sy, sz); (1, 1, 1) measures in voxels, the real size in mm.
        method: ``kdtree``, ``distance_transform`` or ``auto`` (the rule in the module
            docstring); all give the exact value.

    Returns:
        bAVD >= 0; 0.0 when both are empty, ``inf`` when only one is (see the module docstring).

    Raises:
        DataError: bad masks, differing shapes, a bad spacing or an unknown method.
    """
    pred, truth = _check_shapes(pred, truth)
    spacing = _check_spacing("spacing", spacing)
    if method not in BAVD_METHODS:
        raise DataError(f"bAVD method {method!r} is unknown; choose one of {', '.join(BAVD_METHODS)}")
    n_truth, n_pred = int(np.count_nonzero(truth)), int(np.count_nonzero(pred))
    if n_truth == 0 and n_pred == 0:
        return 0.0
    if n_truth == 0 or n_pred == 0:
        return math.inf
    if method == "auto":
        method = bavd_method(pred, truth)
    if method == "kdtree":
        total = _sum_distances_kdtree(truth & ~pred, pred, spacing) + _sum_distances_kdtree(pred & ~truth, truth, spacing)
    else:
        to_pred = ndimage.distance_transform_edt(~pred, sampling=spacing)    # d(v, S) for every voxel v
        to_truth = ndimage.distance_transform_edt(~truth, sampling=spacing)  # d(v, G)
        total = float(to_pred[truth].sum()) + float(to_truth[pred].sum())
    return total / (2.0 * n_truth)


def bavd_method(pred: np.ndarray, truth: np.ndarray) -> str:
    """The exact method ``bavd(method="auto")`` uses for these (X, Y, Z) bool masks: ``kdtree``
    unless |G Δ S| exceeds ``DENSE_FRACTION`` of the voxels, then ``distance_transform``."""
    queries = int(np.count_nonzero(pred ^ truth))
    return "kdtree" if queries <= DENSE_FRACTION * pred.size else "distance_transform"


def _sum_distances_kdtree(queries: np.ndarray, target: np.ndarray, spacing) -> float:
    """Σ over the voxels of ``queries`` (bool, disjoint from ``target``) of the Euclidean distance
    (mm) from each voxel centre to the nearest voxel centre of ``target`` (bool, not empty)."""
    if not queries.any():
        return 0.0
    scale = np.asarray(spacing)
    # The nearest target voxel is a boundary voxel (module docstring): erosion with the
    # 6-neighbourhood keeps the interior; the volume's edge counts as inside (border_value=1).
    boundary = target & ~ndimage.binary_erosion(target, border_value=1)
    tree = cKDTree(np.argwhere(boundary) * scale)
    distances, _ = tree.query(np.argwhere(queries) * scale)
    return float(distances.sum())


def segmentation_scores(pred, truth, spacing, brain_mask=None) -> dict[str, float]:
    """DSC and bAVD (voxels and mm) of one subject, for all vessels and, with a mask, intracranial.

    Args:
        pred, truth: (X, Y, Z) bool or 0/1 masks of the same shape, e.g. (312, 384, 127).
        spacing: voxel size in mm, e.g. (0.5, 0.5, 0.8).
        brain_mask: optional (X, Y, Z) mask; it is applied to both prediction and truth, so
            vessels outside the brain (scalp, neck) count neither as hits nor as errors.

    Returns:
        ``{"dsc", "bavd_voxels", "bavd_mm"}``, plus the same keys prefixed ``intracranial_`` when
        ``brain_mask`` is given.

    Raises:
        DataError: bad masks, differing shapes (of the mask too) or a bad spacing.
    """
    pred, truth = _check_shapes(pred, truth)
    scores = _scores(pred, truth, spacing, "")
    if brain_mask is not None:
        brain = _as_mask("brain mask", brain_mask)
        if brain.shape != truth.shape:
            raise DataError(f"brain mask shape {brain.shape} differs from truth shape {truth.shape}")
        scores.update(_scores(pred & brain, truth & brain, spacing, INTRACRANIAL))
    return scores


def _scores(pred: np.ndarray, truth: np.ndarray, spacing, prefix: str) -> dict[str, float]:
    return {f"{prefix}dsc": dice(pred, truth),
            f"{prefix}bavd_voxels": bavd(pred, truth),
            f"{prefix}bavd_mm": bavd(pred, truth, spacing)}


# --------------------------------------------------------------------------- figures


def error_map_rgb(image, pred, truth, axis: int = 2) -> np.ndarray:
    """The error map as an RGB array: MIP of the image in grey with projected TP, FP and FN.

    A projected pixel takes the colour of the last class found along the ray in the order TP
    (red), FP (green), FN (yellow), so errors stay visible where they overlap correct voxels.

    Args:
        image: (X, Y, Z) intensities, e.g. (312, 384, 127).
        pred, truth: masks of the same shape.
        axis: projection axis (2: axial MIP, (312, 384, 127) -> (312, 384)).

    Returns:
        (P, Q, 3) float in [0, 1], P and Q the two remaining axes in order.

    Raises:
        DataError: shapes differ or ``axis`` is not 0, 1 or 2.
    """
    pred, truth = _check_shapes(pred, truth)
    image = np.asarray(image, dtype=np.float64)
    if image.shape != truth.shape:
        raise DataError(f"image shape {image.shape} differs from truth shape {truth.shape}")
    if axis not in (0, 1, 2):
        raise DataError(f"axis must be 0, 1 or 2, got {axis!r}")
    grey = mip(image, axis)
    lo, hi = float(grey.min()), float(grey.max())
    grey = (grey - lo) / (hi - lo) if hi > lo else np.zeros_like(grey)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for voxels, colour in ((pred & truth, TP_COLOUR), (pred & ~truth, FP_COLOUR), (~pred & truth, FN_COLOUR)):
        rgb[voxels.any(axis=axis)] = colour
    return rgb


def error_map_png(image, pred, truth, path, axis: int = 2, spacing=None) -> None:
    """Writes the error map of the paper's Fig. 7 (see :func:`error_map_rgb`) as a PNG.

    Args:
        image, pred, truth: (X, Y, Z) arrays of one shape, e.g. (312, 384, 127).
        path: the PNG file.
        axis: projection axis (2: axial).
        spacing: voxel size in mm; when given, pixels are drawn with their true aspect ratio.

    Raises:
        DataError: shapes differ, a bad axis or a bad spacing.
    """
    rgb = error_map_rgb(image, pred, truth, axis)           # (P, Q, 3)
    rows, cols = [a for a in range(3) if a != axis]
    aspect = 1.0
    if spacing is not None:
        spacing = _check_spacing("spacing", spacing)
        aspect = spacing[rows] / spacing[cols]              # drawn transposed: P runs along x
    fig = new_figure((7, 6))
    ax = fig.add_subplot()
    ax.imshow(np.transpose(rgb, (1, 0, 2)), origin="lower", aspect=aspect, interpolation="nearest")
    ax.set(xlabel=f"axis {rows}", ylabel=f"axis {cols}", xticks=[], yticks=[])
    handles = [_patch(c, n) for c, n in ((TP_COLOUR, "true positive"), (FP_COLOUR, "false positive"),
                                         (FN_COLOUR, "false negative"))]
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.7)
    fig.tight_layout()
    save_png(fig, path)


def _patch(colour, label):
    from matplotlib.patches import Patch

    return Patch(color=colour, label=label)


def box_plots_png(scores: dict[str, dict[str, list[float]]], path, bavd_key: str = "bavd_voxels") -> None:
    """Box plots of DSC and bAVD per training source and setting (the paper's Fig. 6).

    Args:
        scores: ``{source: {metric key: per-subject values}}``, e.g.
            ``{"real": {"dsc": [...], "bavd_voxels": [...], "intracranial_dsc": [...]}, "gp": ...}``;
            the intracranial column is drawn when any source has ``intracranial_`` keys.
        path: the PNG file.
        bavd_key: which bAVD to draw, ``"bavd_voxels"`` or ``"bavd_mm"``.

    Non-finite values (bAVD ``inf`` of an empty prediction) are left out of a box and counted in
    its axis label.

    Raises:
        DataError: ``scores`` is empty or ``bavd_key`` is not a bAVD key.
    """
    if not scores:
        raise DataError("scores is empty; pass {source: {metric: values}}")
    if bavd_key not in ("bavd_voxels", "bavd_mm"):
        raise DataError(f"bavd_key must be 'bavd_voxels' or 'bavd_mm', got {bavd_key!r}")
    settings = [s for s in SETTINGS
                if any(f"{s[1]}dsc" in per or f"{s[1]}{bavd_key}" in per for per in scores.values())]
    metrics = (("dsc", "DSC"), (bavd_key, f"bAVD ({'voxels' if bavd_key == 'bavd_voxels' else 'mm'})"))
    fig = new_figure((4.5 * len(settings), 7))
    axes = fig.subplots(2, len(settings), squeeze=False)
    sources = list(scores)
    for col, (setting, prefix) in enumerate(settings):
        for row, (key, title) in enumerate(metrics):
            data = [np.asarray(scores[s].get(prefix + key, []), dtype=float) for s in sources]
            finite = [d[np.isfinite(d)] for d in data]
            dropped = sum(len(d) - len(f) for d, f in zip(data, finite))
            ax = axes[row, col]
            ax.boxplot(finite, showmeans=True)
            ax.set_xticks(range(1, len(sources) + 1), sources)
            note = f" ({dropped} non-finite left out)" if dropped else ""
            ax.set(title=f"{title}, {setting}", ylabel=title + note)
    fig.tight_layout()
    save_png(fig, path)


# --------------------------------------------------------------------------- tables


def _mean_std(values: list[float], digits: int) -> str:
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return "–"
    mean = float(values.mean())
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    std = float(values.std(ddof=1)) if np.isfinite(values).all() else math.nan
    return f"{mean:.{digits}f} ({std:.{digits}f})"


def summary_table(rows: list[dict]) -> str:
    """Markdown table of mean (sample std) per training source and setting (the paper's Table 3).

    Args:
        rows: one dict per subject and source, e.g. ``{"source": "gp", "subject": "sub-001",
            "dsc": 0.81, "bavd_voxels": 0.9, "bavd_mm": 0.5, "intracranial_dsc": ...}``.
            Sources appear in the order first seen; intracranial columns when any row has them.

    Returns:
        The table, one line per source; DSC with 3 decimals, bAVD with 2. A single subject shows
        the value alone; a source with an infinite bAVD shows ``inf (nan)``.

    Raises:
        DataError: ``rows`` is empty or a row has no "source".
    """
    if not rows:
        raise DataError("rows is empty; pass one dict of scores per subject")
    if any("source" not in r for r in rows):
        raise DataError("every row needs a 'source' key (the training source, e.g. 'real' or 'gp')")
    settings = [s for s in SETTINGS if any(f"{s[1]}dsc" in r for r in rows)]
    columns = [(prefix + key, f"{name} {label}") for name, prefix in settings
               for key, label in (("dsc", "DSC"), ("bavd_voxels", "bAVD (voxels)"), ("bavd_mm", "bAVD (mm)"))]
    sources = list(dict.fromkeys(r["source"] for r in rows))
    lines = ["| source | n | " + " | ".join(label for _, label in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for source in sources:
        mine = [r for r in rows if r["source"] == source]
        cells = [_mean_std([r[key] for r in mine if key in r], 3 if key.endswith("dsc") else 2)
                 for key, _ in columns]
        lines.append(f"| {source} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path) -> None:
    """Writes the per-subject rows as CSV; columns are the union of keys in first-seen order.

    A key missing from a row (no brain mask for that subject) is an empty cell.
    """
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
