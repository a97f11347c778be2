"""Nearest-neighbour fidelity and diversity metrics of generated features.

* Improved precision and recall, Kynkäänniemi et al., NeurIPS 2019: each set's manifold is the
  union of balls around its points with radius the distance to the point's k-th nearest
  neighbour in the same set (itself excluded). Precision is the fraction of generated points
  inside the real manifold, recall the fraction of real points inside the generated one.
* Density and coverage, Naeem et al., ICML 2020, from the real balls only:
  density = (1 / (k·M)) Σ_j Σ_i 1[fake_j ∈ B(real_i)] (≈ 1 for matching distributions, above 1
  where generated samples crowd dense real regions), coverage = fraction of real balls that
  contain at least one generated point.

Balls are closed (distance ≤ radius), as in both papers' definitions. Distances are computed in
float64 with ``torch.cdist`` in its direct (non-matmul) mode, block by block (``chunk_size`` rows
and columns, 8 MiB per 1024 × 1024 block): a pair's distance is then the same bits whatever the
chunking and exactly 0 for duplicates, so boundary ties (e.g. a memorised training sample) are
always decided alike. Cost: three N × M distance matrices; about 8 s for 2350 + 2350 512-d
feature vectors on two CPU cores.

Example (512-d MedicalNet features of ``(1, 128, 128, 64)`` patches; 8-d here for brevity):

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> scores = precision_recall_density_coverage(rng.normal(size=(500, 8)), rng.normal(size=(500, 8)))
    >>> sorted(scores)
    ['coverage', 'density', 'precision', 'recall']
"""

from __future__ import annotations

from typing import Any

import torch

from hpc_gan.eval.fid import feature_matrix

CHUNK_SIZE = 1024
# Naeem et al. (2020) recommend k = 5 for density and coverage (Kynkäänniemi et al. 2019 used 3);
# one k for all four metrics keeps them one pass over the distances and their rows comparable.
DEFAULT_K = 5


def precision_recall_density_coverage(real: Any, fake: Any, k: int = DEFAULT_K,
                                      chunk_size: int = CHUNK_SIZE) -> dict[str, float]:
    """All four nearest-neighbour metrics from one pass over the real–generated distances.

    Args:
        real: ``(N, D)`` real features (array or tensor).
        fake: ``(M, D)`` generated features.
        k: the neighbour whose distance is a point's ball radius (k ≥ 1; default 5, Naeem et al.'s
            choice; Kynkäänniemi et al. used 3).
        chunk_size: rows and columns of one distance block.

    Returns:
        ``{"precision", "recall", "density", "coverage"}``, floats; density in [0, N/k], the
        others in [0, 1].

    Raises:
        ValueError: fewer than ``k + 1`` samples in a set, ``D`` differs, ``k < 1`` or
            ``chunk_size < 1``.
    """
    real_t, fake_t = _prepare(real, fake, k, chunk_size)
    real_radii = _knn_radii(real_t, k, chunk_size)                # (N,)
    fake_radii = _knn_radii(fake_t, k, chunk_size)                # (M,)
    n, m = len(real_t), len(fake_t)
    fake_in_real = torch.zeros(m, dtype=torch.bool)               # precision
    real_balls_per_fake = torch.zeros(m, dtype=torch.int64)       # density
    real_ball_covered = torch.zeros(n, dtype=torch.bool)          # coverage
    real_in_fake = torch.zeros(n, dtype=torch.bool)               # recall
    for f0 in range(0, m, chunk_size):
        f1 = min(f0 + chunk_size, m)
        for r0 in range(0, n, chunk_size):
            r1 = min(r0 + chunk_size, n)
            dist = _cdist(fake_t[f0:f1], real_t[r0:r1])           # (m_chunk, n_chunk)
            in_real_ball = dist <= real_radii[None, r0:r1]
            fake_in_real[f0:f1] |= in_real_ball.any(dim=1)
            real_balls_per_fake[f0:f1] += in_real_ball.sum(dim=1)
            real_ball_covered[r0:r1] |= in_real_ball.any(dim=0)
            real_in_fake[r0:r1] |= (dist <= fake_radii[f0:f1, None]).any(dim=0)
    return {
        "precision": fake_in_real.double().mean().item(),
        "recall": real_in_fake.double().mean().item(),
        "density": real_balls_per_fake.sum().item() / (k * m),
        "coverage": real_ball_covered.double().mean().item(),
    }


def precision_recall(real: Any, fake: Any, k: int = DEFAULT_K, chunk_size: int = CHUNK_SIZE) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Args:
        real: ``(N, D)`` real features.
        fake: ``(M, D)`` generated features.
        k: neighbour index of the ball radii.
        chunk_size: rows and columns of one distance block.

    Returns:
        ``{"precision": fraction of fake inside any real ball, "recall": fraction of real inside
        any fake ball}``.

    Raises:
        ValueError: as :func:`precision_recall_density_coverage`.

    Example:
        >>> import numpy as np
        >>> real = np.random.default_rng(0).normal(size=(200, 8))
        >>> precision_recall(real, real + 100.0)
        {'precision': 0.0, 'recall': 0.0}
    """
    scores = precision_recall_density_coverage(real, fake, k, chunk_size)
    return {"precision": scores["precision"], "recall": scores["recall"]}


def density_coverage(real: Any, fake: Any, k: int = DEFAULT_K, chunk_size: int = CHUNK_SIZE) -> dict[str, float]:
    """Density and coverage (Naeem et al. 2020), from the real points' k-NN balls.

    Args:
        real: ``(N, D)`` real features.
        fake: ``(M, D)`` generated features.
        k: neighbour index of the ball radii.
        chunk_size: rows and columns of one distance block.

    Returns:
        ``{"density": (1/(k·M)) Σ_j Σ_i 1[fake_j ∈ B(real_i)], "coverage": fraction of real balls
        holding a fake point}``.

    Raises:
        ValueError: as :func:`precision_recall_density_coverage`.
    """
    scores = precision_recall_density_coverage(real, fake, k, chunk_size)
    return {"density": scores["density"], "coverage": scores["coverage"]}


def _prepare(real: Any, fake: Any, k: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    real_np, fake_np = feature_matrix(real, "real"), feature_matrix(fake, "fake")
    for name, x in (("real", real_np), ("fake", fake_np)):
        if len(x) < k + 1:
            raise ValueError(f"{name} has {len(x)} samples; k-NN radii with k={k} need at least {k + 1}")
    if real_np.shape[1] != fake_np.shape[1]:
        raise ValueError(f"real and fake features differ in D: {real_np.shape[1]} and {fake_np.shape[1]}")
    return torch.from_numpy(real_np), torch.from_numpy(fake_np)


def _cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _knn_radii(x: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """(N,) distance of each point to its k-th nearest neighbour in ``x``, itself excluded.

    The point itself is the nearest at distance 0, so this is the (k+1)-th smallest distance
    (a duplicate of the point counts as a neighbour at distance 0).
    """
    n = len(x)
    radii = torch.empty(n, dtype=x.dtype)
    for r0 in range(0, n, chunk_size):
        rows = x[r0:r0 + chunk_size]
        nearest = torch.empty(len(rows), 0, dtype=x.dtype)      # running k+1 smallest per row
        for c0 in range(0, n, chunk_size):
            candidates = torch.cat([nearest, _cdist(rows, x[c0:c0 + chunk_size])], dim=1)
            nearest = torch.topk(candidates, min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii[r0:r0 + chunk_size] = nearest[:, k]
    return radii
