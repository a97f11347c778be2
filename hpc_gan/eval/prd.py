"""Precision and recall for distributions (PRD), Sajjadi et al., NeurIPS 2018.

"Assessing Generative Models via Precision and Recall" defines, for a distribution Q of the
model and P of the data over a common finite support (here: k-means clusters of features),
the PRD curve {(α(λ), β(λ)) : λ ∈ (0, ∞)} with

    α(λ) = Σ_ω min(λ·P(ω), Q(ω))        (precision)
    β(λ) = α(λ) / λ                      (recall)

Precision asks how much of the generated distribution Q lies where the data P has mass;
recall asks how much of P the model covers. The argument order therefore matters: the
evaluated (generated) distribution comes first, the reference (real) one second. The code
released with the GAN paper this toolkit reproduces passed them the other way round, which
swaps precision and recall (and F_8 with F_1/8); :func:`prd_generated_vs_real` names its
arguments so that cannot happen.

Example (512-d MedicalNet features of 2350 generated and 2350 real ``(1, 128, 128, 64)``
patches; 8-d and 500 each here to keep it short):

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> generated, real = rng.normal(size=(500, 8)), rng.normal(size=(500, 8))
    >>> precision, recall = prd_generated_vs_real(generated, real, preset="paper")
    >>> precision.shape, recall.shape
    ((1001,), (1001,))
    >>> f8, f1_8 = prd_to_max_f_beta_pair(precision, recall)
    >>> bool(f8 > 0.9 and f1_8 > 0.9)
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from hpc_gan.eval.fid import feature_matrix

# preset name -> (num_clusters, num_angles, num_runs)
PRESETS: dict[str, tuple[int, int, int]] = {
    "reference": (20, 1001, 10),  # Sajjadi et al.'s defaults
    "paper": (10, 1001, 10),      # Subramaniam et al. 2022
}
KMEANS_INITS = 10  # k-means initialisations per run, best kept (Sajjadi et al.'s n_init=10)


def compute_prd(eval_dist: Any, ref_dist: Any, num_angles: int = 1001,
                epsilon: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """PRD curve of two histograms over the same bins.

    Slopes λ = tan(θ) for ``num_angles`` angles θ evenly spaced in [ε, π/2 − ε] (the middle
    angle is π/4, λ = 1); precision(λ) = Σ_i min(λ·ref_i, eval_i), recall(λ) = precision(λ)/λ,
    both clipped to [0, 1].

    Args:
        eval_dist: ``(K,)`` histogram of the evaluated (generated) samples, summing to 1.
        ref_dist: ``(K,)`` histogram of the reference (real) samples, summing to 1.
        num_angles: number of points on the curve (≥ 2).
        epsilon: distance of the extreme angles from 0 and π/2 (0 < ε < π/4).

    Returns:
        ``(precision, recall)``, two ``(num_angles,)`` float64 arrays ordered by increasing λ
        (precision rises, recall falls).

    Raises:
        ValueError: shapes differ or are not 1-D, a histogram has negative or non-finite entries
            or does not sum to 1 (within 1e-6), or ``num_angles``/``epsilon`` are out of range.

    Example:
        >>> p, r = compute_prd([0.5, 0.5, 0.0], [0.25, 0.25, 0.5], num_angles=3)
        >>> round(float(p[1]), 12), round(float(r[1]), 12)   # at λ = tan(π/4) = 1: Σ min(ref, eval)
        (0.5, 0.5)
    """
    eval_dist = _histogram(eval_dist, "eval_dist")
    ref_dist = _histogram(ref_dist, "ref_dist")
    if eval_dist.shape != ref_dist.shape:
        raise ValueError(f"eval_dist and ref_dist need the same bins, got shapes {eval_dist.shape} and {ref_dist.shape}")
    if num_angles < 2:
        raise ValueError(f"num_angles must be >= 2, got {num_angles}")
    if not 0 < epsilon < np.pi / 4:
        raise ValueError(f"epsilon must be in (0, pi/4), got {epsilon}")
    slopes = np.tan(np.linspace(epsilon, np.pi / 2 - epsilon, num_angles))       # (A,)
    precision = np.minimum(slopes[:, None] * ref_dist[None, :], eval_dist[None, :]).sum(axis=1)  # (A,)
    recall = precision / slopes
    return np.clip(precision, 0.0, 1.0), np.clip(recall, 0.0, 1.0)


def _histogram(values: Any, name: str) -> np.ndarray:
    hist = np.asarray(values, dtype=np.float64)
    if hist.ndim != 1 or hist.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D histogram, got shape {hist.shape}")
    if not np.isfinite(hist).all() or (hist < 0).any():
        raise ValueError(f"{name} must hold finite, non-negative probabilities")
    if abs(hist.sum() - 1.0) > 1e-6:
        raise ValueError(f"{name} must sum to 1 (within 1e-06), sums to {float(hist.sum())!r}")  # exact: 1.0000011 is not "1"
    return hist


def kmeans(data: np.ndarray, num_clusters: int, seed: int = 0,
           n_init: int = KMEANS_INITS) -> tuple[np.ndarray, np.ndarray]:
    """k-means clustering, the best (lowest inertia) of ``n_init`` k-means++ initialisations.

    scikit-learn's full-batch :class:`sklearn.cluster.KMeans` (Lloyd). Sajjadi et al.'s reference
    code runs ``MiniBatchKMeans(n_clusters, n_init=10)``, a speed-up for the 20 000+ Inception
    embeddings of 2D image benchmarks; the sets here are a few thousand 512-d vectors, for which
    full-batch Lloyd costs well under a second per clustering on two cores and has no mini-batch
    sampling noise, so the same best-of-10 search finds the same or a lower-inertia clustering.

    Args:
        data: ``(N, D)`` float64 points, ``N >= num_clusters``.
        num_clusters: ``K``.
        seed: ``random_state`` of the initialisations (deterministic for a given seed).
        n_init: initialisations tried; the best is kept (the reference uses 10).

    Returns:
        ``(centres, labels)``: ``(K, D)`` float64 and ``(N,)`` int64 in ``[0, K)``.

    Raises:
        ValueError: fewer points than clusters, ``num_clusters < 1`` or ``n_init < 1``.
    """
    from sklearn.cluster import KMeans

    if num_clusters < 1 or len(data) < num_clusters:
        raise ValueError(f"k-means needs 1 <= num_clusters <= N, got num_clusters={num_clusters}, N={len(data)}")
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    model = KMeans(n_clusters=num_clusters, n_init=n_init, random_state=seed).fit(data)
    return model.cluster_centers_.astype(np.float64), model.labels_.astype(np.int64)


def compute_prd_from_embedding(eval_data: Any, ref_data: Any, num_clusters: int = 20, num_angles: int = 1001,
                               num_runs: int = 10, enforce_balance: bool = True,
                               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """PRD curve of two feature sets, averaged over several k-means clusterings.

    Each run clusters the union of both sets into ``num_clusters`` clusters (:func:`kmeans`: the
    best of 10 k-means++ initialisations, ``random_state = seed + run``), histograms each set over the clusters and calls :func:`compute_prd`;
    precision and recall are averaged over the runs.

    Convention: ``eval_data`` are the GENERATED features, ``ref_data`` the REAL ones. Swapping
    them swaps precision and recall (the defect of the original GAN paper's code).

    Args:
        eval_data: ``(N, D)`` generated features (array or tensor).
        ref_data: ``(M, D)`` real features.
        num_clusters: k-means clusters (the histogram bins).
        num_angles: points on the curve.
        num_runs: clusterings to average over.
        enforce_balance: require ``N == M`` (unbalanced sets bias the histograms' clusters).
        seed: base seed; run ``r`` uses ``seed + r``.

    Returns:
        ``(precision, recall)``, two ``(num_angles,)`` float64 arrays.

    Raises:
        ValueError: ``N != M`` with ``enforce_balance``, fewer samples than clusters in either
            set, different ``D``, or ``num_runs < 1``.
    """
    eval_data = feature_matrix(eval_data, "eval_data (generated)")
    ref_data = feature_matrix(ref_data, "ref_data (real)")
    n, m = len(eval_data), len(ref_data)
    if enforce_balance and n != m:
        raise ValueError(f"PRD needs balanced sets: got {n} generated and {m} real; "
                         "pass the same number or enforce_balance=False")
    if min(n, m) < num_clusters:
        raise ValueError(f"too few samples for PRD: {min(n, m)} < num_clusters={num_clusters}")
    if eval_data.shape[1] != ref_data.shape[1]:
        raise ValueError(f"generated and real features differ in D: {eval_data.shape[1]} and {ref_data.shape[1]}")
    if num_runs < 1:
        raise ValueError(f"num_runs must be >= 1, got {num_runs}")
    union = np.concatenate([eval_data, ref_data])                   # (N + M, D)
    precisions, recalls = [], []
    for run in range(num_runs):
        _, labels = kmeans(union, num_clusters, seed=seed + run)
        eval_hist = np.bincount(labels[:n], minlength=num_clusters) / n
        ref_hist = np.bincount(labels[n:], minlength=num_clusters) / m
        precision, recall = compute_prd(eval_hist, ref_hist, num_angles=num_angles)
        precisions.append(precision)
        recalls.append(recall)
    return np.mean(precisions, axis=0), np.mean(recalls, axis=0)


def prd_generated_vs_real(generated: Any, real: Any, preset: str = "reference", seed: int = 0,
                          enforce_balance: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """PRD of generated against real features, with the arguments named so they cannot be swapped.

    Args:
        generated: ``(N, D)`` features of generated patches (the evaluated distribution).
        real: ``(N, D)`` features of real patches (the reference distribution).
        preset: ``"reference"`` — Sajjadi et al.'s 20 clusters, 1001 angles, 10 runs — or
            ``"paper"`` — Subramaniam et al.'s 10 clusters, 1001 angles, 10 runs.
        seed: base k-means seed.
        enforce_balance: see :func:`compute_prd_from_embedding`.

    Returns:
        ``(precision, recall)``, two ``(1001,)`` float64 arrays.

    Raises:
        ValueError: unknown preset, or any error of :func:`compute_prd_from_embedding`.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown PRD preset {preset!r}; choose one of {', '.join(PRESETS)}")
    num_clusters, num_angles, num_runs = PRESETS[preset]
    return compute_prd_from_embedding(generated, real, num_clusters=num_clusters, num_angles=num_angles,
                                      num_runs=num_runs, enforce_balance=enforce_balance, seed=seed)


def _curve(precision: Any, recall: Any) -> tuple[np.ndarray, np.ndarray]:
    precision, recall = np.asarray(precision, dtype=np.float64), np.asarray(recall, dtype=np.float64)
    if precision.ndim != 1 or precision.shape != recall.shape or precision.size == 0:
        raise ValueError(f"precision and recall must be 1-D arrays of one length, got {precision.shape} and {recall.shape}")
    return precision, recall


def _f_beta(precision: np.ndarray, recall: np.ndarray, beta: float) -> np.ndarray:
    numerator = (1 + beta**2) * precision * recall
    denominator = beta**2 * precision + recall
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def prd_to_max_f_beta_pair(precision: Any, recall: Any, beta: float = 8) -> tuple[float, float]:
    """Sajjadi et al.'s summary of a PRD curve: (max F_β, max F_1/β).

    F_β = (1 + β²)·p·r / (β²·p + r), taken as 0 where p = r = 0. With β = 8, F_8 weights
    recall (does the model cover the data?) and F_1/8 weights precision (are samples realistic?).

    Args:
        precision: ``(A,)`` precision along the curve.
        recall: ``(A,)`` recall along the curve.
        beta: β > 0.

    Returns:
        ``(F_β, F_1/β)``, each the maximum over the curve, in [0, 1].

    Raises:
        ValueError: shapes differ, or ``beta <= 0``.

    Example:
        >>> f8, f1_8 = prd_to_max_f_beta_pair([0.0, 1.0], [1.0, 0.5])   # both from (p, r) = (1, .5)
        >>> round(f8, 4), round(f1_8, 4)
        (0.5039, 0.9848)
    """
    precision, recall = _curve(precision, recall)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return float(_f_beta(precision, recall, beta).max()), float(_f_beta(precision, recall, 1.0 / beta).max())


def prd_auc(precision: Any, recall: Any) -> float:
    """Area under the PRD curve: ∫ precision d(recall), trapezoid rule after sorting by recall.

    Not one of Sajjadi et al.'s summaries (they report F_8 and F_1/8); one number for tables,
    1 for identical distributions and 0 for disjoint ones. The curve spans recall only from
    its smallest to its largest value (≈ [tan ε, 1] for identical sets), so no area is added
    outside it.

    Args:
        precision: ``(A,)`` precision along the curve.
        recall: ``(A,)`` recall along the curve.

    Returns:
        The area, in [0, 1].

    Raises:
        ValueError: shapes differ.
    """
    precision, recall = _curve(precision, recall)
    # By rising recall; ties are the curve's vertical parts, which it runs down (falling
    # precision). Rounding first keeps last-bit noise in recall = precision/λ from reordering them.
    recall = np.round(recall, 12)
    order = np.lexsort((-precision, recall))
    return float(np.trapezoid(precision[order], recall[order]))


def plot_prd(curves: Mapping[str, tuple[Any, Any]], path: str | Path, title: str | None = None) -> Path:
    """All PRD curves in one plot (recall on x, precision on y, both [0, 1]), written as a PNG.

    Uses Matplotlib's object API with the Agg canvas (no pyplot state, no display).

    Args:
        curves: legend label → ``(precision, recall)``, e.g. ``{"c-SN-MP": prd_generated_vs_real(g, r)}``.
        path: PNG to write (parents created).
        title: optional title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no curves, or a curve's arrays differ in shape.
    """
    from hpc_gan.plots import new_figure, save_png

    if not curves:
        raise ValueError("plot_prd needs at least one curve")
    fig = new_figure((5, 5), dpi=150)
    ax = fig.add_subplot()
    for label, (precision, recall) in curves.items():
        precision, recall = _curve(precision, recall)
        ax.plot(recall, precision, label=label, linewidth=1.5)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="Recall", ylabel="Precision", aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    if title:
        ax.set_title(title)
    return save_png(fig, path, bbox_inches="tight")
