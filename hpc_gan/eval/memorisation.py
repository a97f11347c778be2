"""Memorisation audit: is any generated patch a near copy of a training patch?

For each generated patch, the Euclidean distance to its nearest training patch; for each held-out
real patch (never trained on), the same distance. A held-out patch is what "new but realistic"
looks like, so the ``percentile``-th percentile (1st by default) of the held-out distances is the
threshold: a generated patch closer to the training set than that is a near copy. A generator
that draws fresh samples from the data distribution puts about ``percentile`` % of its samples
below the threshold; one that memorises puts far more (up to 100 %).

Spaces:

* voxels: each patch flattened, image and label channels together (``channels=(0, 1)``: the
  image in [-1, 1] and the {0, 1} label as stored; a copied vessel tree counts as much as a
  copied image). ``channels=(0,)`` audits the image alone.
* features (optional): the extractor features the evaluator already has, e.g. MedicalNet's
  512-d vectors; closeness there is closeness "as the FID sees it".

Distances are float64 ``torch.cdist`` in its direct (non-matmul) mode, block by block: a pair's
distance has the same bits whatever the chunking and is exactly 0 for a duplicate. Memory is one
block of rows (``chunk`` × D float64 per set) plus a ``chunk`` × ``chunk`` distance block, so
datasets whose items are (C, X, Y, Z) patches can be streamed from disk; the reference (training)
set is read once per block of queries. Cost: M · N · D operations, e.g. 2350 × 2350 patches of
2 × 128 × 128 × 64 voxels is 1.2e13: use a GPU (``device``) and several ranks
(:func:`memorisation_audit_distributed`) for full-size audits.

Example (8 patches of (2, 16, 16, 8); the generator copied the training set):
    >>> train = np.random.default_rng(0).uniform(-1, 1, (8, 2, 16, 16, 8))
    >>> held = np.random.default_rng(1).uniform(-1, 1, (8, 2, 16, 16, 8))
    >>> audit = memorisation_audit(train[::-1].copy(), train, held)
    >>> audit["voxel"]["fraction_below_heldout_p1"], audit["voxel"]["near_copies"][0]["train_index"]
    (1.0, 7)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["closest_pairs_png", "memorisation_audit", "memorisation_audit_distributed", "nearest_distances"]

CHUNK = 1024          # rows per distance block for feature vectors (8 MiB blocks)
VOXEL_CHUNK = 16      # rows per block for whole patches: 16 × 2 × 128 × 128 × 64 float64 = 256 MiB


# --------------------------------------------------------------------------- rows of a set

class _Rows:
    """Float64 (n, D) row blocks of a set given as a matrix, a patch array or a patch dataset."""

    def __init__(self, source: Any, name: str, channels: Sequence[int] | None = None) -> None:
        self.source, self.name, self.channels = source, name, None if channels is None else list(channels)
        try:
            self.n = len(source)
        except TypeError:
            raise ValueError(f"{name} must be an array, a tensor or a dataset of patches, "
                             f"got {type(source).__name__}") from None

    def block(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        if isinstance(self.source, (np.ndarray, torch.Tensor)):
            rows = torch.as_tensor(self.source[start:stop])
        else:  # a map-style dataset: stack its (C, X, Y, Z) items
            rows = torch.stack([torch.as_tensor(self.source[i]) for i in range(start, stop)])
        if self.channels is not None:
            if rows.dim() < 3:
                raise ValueError(f"{self.name}: channels={self.channels} needs (N, C, X, Y, Z) patches, "
                                 f"got rows of shape {tuple(rows.shape[1:])}; pass channels=None for features")
            rows = rows[:, self.channels]
        rows = rows.reshape(len(rows), -1).to(device, torch.float64)  # (n, D)
        if not torch.isfinite(rows).all():
            raise ValueError(f"{self.name} holds NaN or infinite values in rows {start}..{stop - 1}")
        return rows


def _cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


# --------------------------------------------------------------------------- nearest neighbours

def nearest_distances(queries: Any, reference: Any, chunk: int = CHUNK, exclude_self: bool = False,
                      query_indices: Sequence[int] | None = None, channels: Sequence[int] | None = None,
                      device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query to its nearest reference row, in float64.

    Args:
        queries: ``(M, D)`` matrix, ``(M, C, X, Y, Z)`` patches (array or tensor) or a dataset of
            (C, X, Y, Z) items; every row is flattened.
        reference: ``(N, D)`` (or patches / a dataset) of the same flattened length D.
        chunk: rows of a block of either set (memory: ``chunk`` × D and ``chunk`` × ``chunk``).
        exclude_self: queries and reference are the same set: query i skips reference row i.
        query_indices: audit only these rows of ``queries`` (a rank's share), in this order.
        channels: keep these channels of (N, C, ...) patches before flattening; None keeps all.
        device: where the distances are computed.

    Returns:
        ``(distances, indices)``: float64 (M,) and int64 (M,), the nearest reference row per query
        (the lowest index among ties).

    Raises:
        ValueError: ``chunk`` < 1, an empty reference, D differs, NaN or infinite values.

    Example:
        >>> d, i = nearest_distances(np.eye(3), np.eye(3)[[2, 0]])
        >>> d.tolist(), i.tolist()
        ([0.0, 1.4142135623730951, 0.0], [1, 0, 0])
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    device = torch.device(device)
    q_rows, r_rows = _Rows(queries, "queries", channels), _Rows(reference, "reference", channels)
    if r_rows.n == 0 or (exclude_self and r_rows.n < 2):
        raise ValueError(f"the reference set has {r_rows.n} rows; nearest neighbours need at least "
                         f"{2 if exclude_self else 1}")
    wanted = np.arange(q_rows.n) if query_indices is None else np.asarray(query_indices, np.int64)
    distances, indices = np.empty(len(wanted)), np.empty(len(wanted), np.int64)
    for q0 in range(0, len(wanted), chunk):
        rows = wanted[q0:q0 + chunk]
        q = _gather(q_rows, rows, device)                                   # (m, D)
        best = torch.full((len(rows),), float("inf"), dtype=torch.float64, device=device)
        best_i = torch.zeros(len(rows), dtype=torch.int64, device=device)
        for r0 in range(0, r_rows.n, chunk):
            r = r_rows.block(r0, min(r0 + chunk, r_rows.n), device)        # (n, D)
            if r.shape[1] != q.shape[1]:
                raise ValueError(f"queries have D={q.shape[1]} values per row but the reference {r.shape[1]}; "
                                 "compare patches of one shape and the same channels")
            dist = _cdist(q, r)                                             # (m, n)
            if exclude_self:
                cols = torch.as_tensor(rows, device=device)[:, None] - r0
                inside = (cols >= 0) & (cols < len(r))
                dist[inside.nonzero(as_tuple=True)[0], cols[inside]] = float("inf")
            block_best, block_i = dist.min(dim=1)
            better = block_best < best                                      # strict: earlier index wins ties
            best = torch.where(better, block_best, best)
            best_i = torch.where(better, block_i + r0, best_i)
        distances[q0:q0 + len(rows)] = best.cpu().numpy()
        indices[q0:q0 + len(rows)] = best_i.cpu().numpy()
    return distances, indices


def _gather(rows: _Rows, wanted: np.ndarray, device: torch.device) -> torch.Tensor:
    """The rows ``wanted`` (any order) as one (m, D) block, reading contiguous runs together."""
    if len(wanted) and np.all(np.diff(wanted) == 1):
        return rows.block(int(wanted[0]), int(wanted[-1]) + 1, device)
    return torch.cat([rows.block(int(i), int(i) + 1, device) for i in wanted])


# --------------------------------------------------------------------------- the audit

def memorisation_audit(generated_vox: Any, train_vox: Any, heldout_vox: Any | None,
                       generated_feat: Any = None, train_feat: Any = None, heldout_feat: Any = None,
                       percentile: float = 1.0, top: int = 8, channels: Sequence[int] = (0, 1),
                       voxel_chunk: int = VOXEL_CHUNK, chunk: int = CHUNK,
                       device: str | torch.device = "cpu") -> dict:
    """Near copies of training patches among the generated ones, in voxel and feature space.

    Args:
        generated_vox: (M, C, X, Y, Z) generated patches (array, tensor or dataset of (C, X, Y, Z)
            items, e.g. ``ShardedPatchDataset`` or a ``Subset`` of one).
        train_vox: (N, C, X, Y, Z) training patches.
        heldout_vox: (H, C, X, Y, Z) real patches not trained on; None: distances only, no threshold.
        generated_feat, train_feat, heldout_feat: (M, D), (N, D), (H, D) features of the same
            patches in the same order; the feature space is audited when the first two are given.
        percentile: the held-out percentile (0–100) used as the threshold.
        top: how many near copies are listed (the closest); ``n_below`` counts them all.
        channels: the channels compared in voxel space; (0, 1) = image and label, (0,) = image.
        voxel_chunk, chunk: rows per distance block in voxel and feature space.
        device: where the distances are computed.

    Returns:
        ``{"percentile", "voxel": space, "feature": space or None}``, where ``space`` is
        ``{"n_generated", "n_train", "n_heldout", "threshold", "fraction_below_heldout_p1",
        "n_below", "near_copies": [{"generated_index", "train_index", "distance"}, ...],
        "median_generated_to_train", "median_heldout_to_train", "min_generated_to_train"}``
        (plus ``"channels"`` in voxel space). ``fraction_below_heldout_p1`` is the fraction of
        generated patches strictly closer to the training set than the threshold (the
        ``percentile``-th percentile, named after the default 1st); with no held-out set, it,
        the threshold and the held-out median are None and ``near_copies`` is empty.

    Raises:
        ValueError: ``percentile`` outside [0, 100], ``top`` < 0, sets that differ in shape,
            only one of ``generated_feat`` / ``train_feat``, NaN or infinite values.
    """
    return memorisation_audit_distributed(generated_vox, train_vox, heldout_vox, generated_feat, train_feat,
                                          heldout_feat, percentile=percentile, top=top, channels=channels,
                                          voxel_chunk=voxel_chunk, chunk=chunk, device=device, rank=0, world_size=1)


def memorisation_audit_distributed(generated_vox: Any, train_vox: Any, heldout_vox: Any | None,
                                   generated_feat: Any = None, train_feat: Any = None, heldout_feat: Any = None,
                                   percentile: float = 1.0, top: int = 8, channels: Sequence[int] = (0, 1),
                                   voxel_chunk: int = VOXEL_CHUNK, chunk: int = CHUNK,
                                   device: str | torch.device = "cpu", *, rank: int, world_size: int) -> dict:
    """:func:`memorisation_audit` with the queries shared by ``world_size`` ranks (a collective call).

    Rank r measures generated and held-out patches r, r + W, r + 2W, ... against the whole
    training set; the shares are all-gathered (``torch.distributed.all_gather_object``; without
    an initialised process group, or with one rank, nothing is gathered) and every rank returns
    the same report, identical to the single-process one.

    Args:
        rank, world_size: this rank and the number of ranks; every rank passes the same sets.
        Others: as :func:`memorisation_audit`.

    Returns:
        The report of :func:`memorisation_audit`, on every rank.

    Raises:
        ValueError: as :func:`memorisation_audit`; ``rank`` outside [0, world_size).
    """
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    if (generated_feat is None) != (train_feat is None):
        raise ValueError("give both generated_feat and train_feat to audit the feature space, or neither")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")

    def nearest(queries, reference, block, chans):
        if queries is None:
            return None
        share = np.arange(rank, len(queries), world_size)
        d, i = nearest_distances(queries, reference, block, query_indices=share, channels=chans, device=device)
        return _assemble(_all_gather_object((share, d, i), world_size), len(queries))

    chans = list(channels)
    report = {"percentile": float(percentile),
              "voxel": {"channels": chans, **_summarise(nearest(generated_vox, train_vox, voxel_chunk, chans),
                                                        nearest(heldout_vox, train_vox, voxel_chunk, chans),
                                                        len(train_vox), percentile, top)},
              "feature": None}
    if generated_feat is not None:
        report["feature"] = _summarise(nearest(generated_feat, train_feat, chunk, None),
                                       nearest(heldout_feat, train_feat, chunk, None),
                                       len(train_feat), percentile, top)
    return report


def _all_gather_object(obj: Any, world_size: int) -> list:
    """Every rank's ``obj`` in rank order; ``[obj]`` without a process group or with one rank."""
    dist = torch.distributed
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    if dist.get_world_size() != world_size:
        raise ValueError(f"world_size={world_size} but the process group has {dist.get_world_size()} ranks")
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _assemble(parts: list, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances (n,), indices (n,)) from the ranks' (rows, distances, indices) shares."""
    rows = np.concatenate([p[0] for p in parts]).astype(np.int64)
    assert np.array_equal(np.sort(rows), np.arange(n)), "the ranks' shares must cover every row once"
    distances, indices = np.empty(n), np.empty(n, np.int64)
    distances[rows] = np.concatenate([p[1] for p in parts])
    indices[rows] = np.concatenate([p[2] for p in parts])
    return distances, indices


def _summarise(generated: tuple[np.ndarray, np.ndarray], heldout: tuple[np.ndarray, np.ndarray] | None,
               n_train: int, percentile: float, top: int) -> dict:
    gen_d, gen_i = generated
    out = {"n_generated": len(gen_d), "n_train": n_train, "n_heldout": 0 if heldout is None else len(heldout[0]),
           "threshold": None, "fraction_below_heldout_p1": None, "n_below": None, "near_copies": [],
           "median_generated_to_train": _median(gen_d), "median_heldout_to_train": None,
           "min_generated_to_train": float(gen_d.min()) if len(gen_d) else None}
    if heldout is None or not len(heldout[0]) or not len(gen_d):
        return out
    threshold = float(np.percentile(heldout[0], percentile))
    below = np.flatnonzero(gen_d < threshold)
    below = below[np.argsort(gen_d[below], kind="stable")]                 # closest first
    out.update(threshold=threshold, fraction_below_heldout_p1=len(below) / len(gen_d), n_below=int(len(below)),
               median_heldout_to_train=_median(heldout[0]),
               near_copies=[{"generated_index": int(g), "train_index": int(gen_i[g]), "distance": float(gen_d[g])}
                            for g in below[:top]])
    return out


def _median(values: np.ndarray) -> float | None:
    return float(np.median(values)) if len(values) else None


# --------------------------------------------------------------------------- picture

def closest_pairs_png(generated: Any, train: Any, pairs: Sequence[dict], path: str | os.PathLike) -> Path:
    """Mid-axial image slices of generated patches beside their nearest training patches.

    Args:
        generated: (M, C, X, Y, Z) generated patches (array, tensor or dataset of (C, X, Y, Z)).
        train: (N, C, X, Y, Z) training patches.
        pairs: ``near_copies`` of a :func:`memorisation_audit` space, e.g.
            ``audit["voxel"]["near_copies"]``; one row per pair. None: a picture saying so.
        path: the PNG to write (atomically; its folder is created).

    Returns:
        ``path`` as a ``Path``.
    """
    from hpc_gan.plots import new_figure, save_png

    rows = max(len(pairs), 1)
    fig = new_figure((4.4, 2.2 * rows))
    axes = fig.subplots(rows, 2, squeeze=False)
    if not pairs:
        axes[0, 0].text(0.5, 0.5, "no generated patch closer to the training set\nthan the held-out threshold",
                        ha="center", va="center", fontsize=8, transform=axes[0, 0].transAxes)
    for row, pair in enumerate(pairs):
        for col, (source, key, what) in enumerate(((generated, "generated_index", "generated"),
                                                   (train, "train_index", "train"))):
            image = np.asarray(torch.as_tensor(source[pair[key]])[0], dtype=np.float32)   # (X, Y, Z)
            # transposed with origin lower: x across, y up, as seen from above (as hpc_gan.sample)
            axes[row, col].imshow(image[:, :, image.shape[2] // 2].T, origin="lower", cmap="gray",
                                  vmin=-1, vmax=1, interpolation="nearest")
            axes[row, col].set_title(f"{what} #{pair[key]}" + (f"  d={pair['distance']:.3g}" if col == 0 else ""),
                                     fontsize=7)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    return save_png(fig, path)
