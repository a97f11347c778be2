"""Distributed feature extraction for FID/PRD, and a cache of real-data statistics.

Every rank embeds a disjoint share of the dataset (:class:`hpc_gan.data.dataset.RankShare` with
``shuffle=False, even=False``: rank r reads indices r, r + W, r + 2W, ...; together the ranks read
every index exactly once). Each patch's MedicalNet background noise comes from a generator
seeded by (seed, global index), so a patch's feature vector is the same whatever the world size,
the batch size or the rank that computed it. :func:`gather_features` then assembles the full
(N, D) matrix in index order on every rank.

Example (one process; under torchrun each rank passes its rank and world size):
    >>> model, identity = build_extractor("medicalnet_resnet10")
    >>> feats, idx = extract_features(dataset, model, rank=0, world_size=1)   # (N, 512), (N,)
    >>> full = gather_features(feats, idx, world_size=1)                      # (N, 512) float64
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hpc_gan.data.dataset import RankShare
from hpc_gan.io import savez_atomic
from hpc_gan.models.resnet3d import medicalnet_normalise

__all__ = ["RealStatsCache", "extract_features", "gather_features", "noise_generator"]

log = logging.getLogger(__name__)


def noise_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator for the background noise of one patch.

    Args:
        seed: the evaluation's seed.
        index: the patch's global index in its dataset.

    Returns:
        A ``torch.Generator`` seeded from ``numpy.random.SeedSequence([seed, index])`` (63 bits),
        so neighbouring (seed, index) pairs get unrelated streams.
    """
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


def extract_features(dataset: Dataset, extractor: nn.Module, rank: int = 0, world_size: int = 1,
                     batch_size: int = 4, channel: int = 0, seed: int = 0, device: str | torch.device = "cpu",
                     value_range: tuple[float, float] = (-1.0, 1.0),
                     num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Embed this rank's share of ``dataset`` with ``extractor``.

    Each item (C, X, Y, Z) contributes its channel ``channel`` as a (1, X, Y, Z) volume, which is
    normalised by :func:`~hpc_gan.models.resnet3d.medicalnet_normalise` with
    :func:`noise_generator` ``(seed, index)`` and embedded under ``torch.no_grad``.

    Args:
        dataset: map-style dataset of length N whose items are (C, X, Y, Z) tensors or arrays,
            e.g. :class:`~hpc_gan.data.dataset.ShardedPatchDataset` ((2, 128, 128, 64)).
        extractor: maps (B, 1, X, Y, Z) to (B, D), e.g. from
            :func:`~hpc_gan.models.resnet3d.build_extractor`; moved to ``device`` in place.
        rank, world_size: this rank and the number of ranks sharing the work.
        batch_size: patches per forward pass; does not change the features beyond float
            rounding of the convolutions.
        channel: 0 = image (the paper's evaluation), 1 = vessel label.
        seed: seed of the background noise.
        device: where the extractor runs; the noise is always drawn on the CPU.
        value_range: (low, high) the channel is scaled to: (-1, 1) for images and generated
            labels; (0, 1) for the {0, 1} labels that ``ShardedPatchDataset`` returns.
        num_workers: DataLoader workers reading the items.

    Returns:
        ``(features, indices)``: float64 (N_rank, D) and int64 (N_rank,), in increasing index
        order; N_rank is about N / world_size (0 when N < world_size for the last ranks).

    Raises:
        ValueError: ``batch_size`` < 1, ``rank`` outside [0, world_size), an item that is not
            (C, X, Y, Z), or ``channel`` outside [0, C).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    indices = RankShare(len(dataset), rank, world_size, shuffle=False, even=False).indices(0).astype(np.int64)
    extractor.to(device)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices.tolist(), num_workers=num_workers,
                        drop_last=False)
    chunks, start = [], 0
    with torch.no_grad():
        for batch in loader:
            batch = torch.as_tensor(batch)
            batch_indices = indices[start:start + len(batch)]
            start += len(batch)
            volumes = _normalised_channel(batch, batch_indices, channel, seed, value_range)  # (B, 1, X, Y, Z)
            chunks.append(extractor(volumes.to(device)).double().cpu().numpy())              # (B, D)
    if chunks:
        return np.concatenate(chunks), indices
    return np.empty((0, getattr(extractor, "feature_dim", 0)), np.float64), indices


def _normalised_channel(batch: torch.Tensor, indices: np.ndarray, channel: int, seed: int,
                        value_range: tuple[float, float]) -> torch.Tensor:
    if batch.dim() != 5:
        raise ValueError(f"dataset items must be (C, X, Y, Z); a batch of them came out as {tuple(batch.shape)}")
    if not 0 <= channel < batch.shape[1]:
        raise ValueError(f"channel {channel} is not in [0, {batch.shape[1]}) for items of shape "
                         f"{tuple(batch.shape[1:])}; use 0 for the image, 1 for the label")
    image = batch[:, channel:channel + 1].float()  # (B, 1, X, Y, Z)
    # One generator per patch, seeded by its global index: independent of batch and world size.
    return torch.cat([medicalnet_normalise(image[j:j + 1], noise_generator(seed, int(i)), value_range)
                      for j, i in enumerate(indices)])


def gather_features(features: np.ndarray, indices: np.ndarray, world_size: int) -> np.ndarray:
    """Every rank's features, in global index order, on every rank (a collective call).

    Works on gloo (CPU tensors) and NCCL (tensors on the current CUDA device): counts are
    all-gathered first, then features and indices padded to the largest share.

    Args:
        features: this rank's float (N_rank, D) from :func:`extract_features`.
        indices: this rank's (N_rank,) global indices.
        world_size: the number of ranks; with 1, or without an initialised process group, only
            this rank's rows are sorted by index.

    Returns:
        float64 (N, D), row i the feature of the i-th smallest gathered index (index order; for a
        full dataset row i is patch i).

    Raises:
        ValueError: ``features`` and ``indices`` disagree in length, ``world_size`` differs from
            the process group's, or an index was computed by two ranks.
    """
    features = np.asarray(features, np.float64)
    indices = np.asarray(indices, np.int64)
    if features.ndim != 2 or len(features) != len(indices):
        raise ValueError(f"features must be (N_rank, D) with one row per index; got {features.shape} "
                         f"for {len(indices)} indices")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size > 1 and distributed:
        if torch.distributed.get_world_size() != world_size:
            raise ValueError(f"world_size={world_size} but the process group has "
                             f"{torch.distributed.get_world_size()} ranks")
        features, indices = _all_gather_rows(features, indices, world_size)
    order = np.argsort(indices, kind="stable")
    if len(order) > 1 and np.any(np.diff(indices[order]) == 0):
        raise ValueError("an index appears on more than one rank; every rank must use the same dataset "
                         "length and world size")
    return features[order]


def _all_gather_rows(features: np.ndarray, indices: np.ndarray, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    shape = torch.tensor([len(indices), features.shape[1]], dtype=torch.int64, device=device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    counts = [int(s[0]) for s in shapes]
    dims = {int(s[1]) for s, n in zip(shapes, counts) if n}
    if len(dims) > 1:
        raise ValueError(f"ranks computed features of different lengths {sorted(dims)}; use one extractor")
    width, rows = (dims.pop() if dims else features.shape[1]), max(counts)
    padded_f = torch.zeros(rows, width, dtype=torch.float64, device=device)
    padded_i = torch.full((rows,), -1, dtype=torch.int64, device=device)
    padded_f[:len(indices)] = torch.from_numpy(features).to(device)
    padded_i[:len(indices)] = torch.from_numpy(indices).to(device)
    all_f = [torch.empty_like(padded_f) for _ in range(world_size)]
    all_i = [torch.empty_like(padded_i) for _ in range(world_size)]
    dist.all_gather(all_f, padded_f)
    dist.all_gather(all_i, padded_i)
    features = torch.cat([f[:n] for f, n in zip(all_f, counts)]).cpu().numpy()  # (N, D)
    indices = torch.cat([i[:n] for i, n in zip(all_i, counts)]).cpu().numpy()   # (N,)
    return features, indices


# --------------------------------------------------------------------------- real-data statistics cache

_SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


class RealStatsCache:
    """FID statistics of real data on disk, so each (data, extractor) pair is embedded once.

    An entry is one ``root/<key>.npz`` of plain numpy arrays, typically ``count`` (), ``sum``
    (D,) and ``outer_sum`` (D, D) in float64. The key covers everything the statistics depend
    on: the manifest's digest (the data and its packing), the extractor's SHA-256 (architecture
    and weights), the split and the channel; changing any of them gives another file.

    Args:
        root: cache directory; created on the first :meth:`put`.

    Example:
        >>> cache = RealStatsCache("runs/cache/fid")
        >>> key = RealStatsCache.key(dataset.manifest.digest, identity["sha256"], "test", 0)
        >>> cache.get(key) is None
        True
        >>> cache.put(key, {"count": np.array(96.0), "sum": s, "outer_sum": ss})   # s (512,), ss (512, 512)
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @staticmethod
    def key(manifest_digest: str, extractor_sha256: str, split: str, channel: int) -> str:
        """The entry name for one combination, e.g. ``"test-c0-3f1a…"`` (48 hex digits).

        Args:
            manifest_digest: ``Manifest.digest`` (SHA-256 of ``manifest.json``).
            extractor_sha256: ``identity["sha256"]`` from ``build_extractor``.
            split: ``"train"``, ``"val"`` or ``"test"``.
            channel: 0 = image, 1 = label.

        Raises:
            ValueError: ``split`` holds characters other than letters, digits, ``.``, ``_``, ``-``.
        """
        if not _SAFE.match(split):
            raise ValueError(f"split {split!r} must be letters, digits, '.', '_' or '-'")
        parts = json.dumps([str(manifest_digest), str(extractor_sha256), split, int(channel)])
        return f"{split}-c{int(channel)}-{hashlib.sha256(parts.encode()).hexdigest()[:48]}"

    def path(self, key: str) -> Path:
        """``root/<key>.npz``.

        Raises:
            ValueError: ``key`` could leave ``root`` (anything but letters, digits, ``.``, ``_``, ``-``).
        """
        if not _SAFE.match(key) or key.startswith("."):
            raise ValueError(f"cache key {key!r} must be letters, digits, '.', '_' or '-'; use RealStatsCache.key()")
        return self.root / f"{key}.npz"

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays stored under ``key``, or ``None`` when absent or unreadable (a damaged file
        is logged and treated as a miss, so the caller recomputes and overwrites it)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return {name: data[name] for name in data.files}
        except Exception as exc:  # zipfile, ValueError, OSError, ... for a damaged file
            log.warning("ignoring unreadable FID statistics cache entry %s: %s", path, exc)
            return None

    def put(self, key: str, arrays: Mapping[str, np.ndarray]) -> Path:
        """Store ``arrays`` under ``key`` atomically (temporary file, fsync, rename).

        Args:
            key: from :meth:`key`.
            arrays: name -> array, e.g. ``{"count": (), "sum": (D,), "outer_sum": (D, D)}``.

        Returns:
            The written path.
        """
        return savez_atomic(self.path(key), arrays)
