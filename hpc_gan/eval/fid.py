"""Fréchet Inception Distance on 3D features, correct across ranks.

Two pieces, kept apart so each is tested alone (MONAI's metric lifecycle):

* :func:`frechet_distance` — one pure function of two Gaussians' means and covariances.
* :class:`FIDStatistics` — accumulates the sufficient statistics of a feature set (count, Σx,
  Σxxᵀ in float64) batch by batch, sums them across ranks with one ``all_reduce``, and turns
  them into a mean and an unbiased covariance. Real-data statistics are cached to ``.npz``.

Example (each rank extracts features of its share of the patches, e.g. 512-d MedicalNet
features of ``(B, 1, 128, 128, 64)`` image patches; 8-d here to keep it short):

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> real, fake = FIDStatistics(), FIDStatistics()
    >>> for _ in range(3):
    ...     real.update(rng.normal(size=(200, 8)))        # (B, D) per batch
    ...     fake.update(rng.normal(1.0, 1.0, size=(200, 8)))
    >>> _ = real.all_reduce(), fake.all_reduce()          # no-ops without torch.distributed
    >>> abs(real.fid(fake) - 8.0) < 0.5                   # ‖Δμ‖² = 8, equal covariances
    True

The one-pass covariance Σxxᵀ/n − μμᵀ cancels badly when |μ| ≫ σ; in float64 this costs
nothing for network features (|μ|/σ of order 1–100) but would for raw intensities.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


# A covariance's eigenvalue this far below 0 (relative to its largest) is no rounding error: the
# matrix is not a covariance. One-pass covariances of network features round at ~1e-12.
NEGATIVE_TOLERANCE = 1e-6
STATE_VERSION = 1


def feature_matrix(features: Any, name: str = "features") -> np.ndarray:
    """Check and convert a feature set to a float64 NumPy matrix (shared by the eval metrics).

    Args:
        features: ``(N, D)`` array-like or ``torch.Tensor`` (any device, any float dtype).
        name: what to call it in error messages (e.g. ``"real"``).

    Returns:
        ``(N, D)`` float64 array (a copy only where a conversion requires one).

    Raises:
        ValueError: not two-dimensional, ``D == 0`` or a value is NaN or infinite.
    """
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"{name} must be a (N, D) matrix of feature vectors with D > 0, got shape {array.shape}")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=1).sum())
        raise ValueError(f"{name} holds NaN or infinite values in {bad} of {len(array)} feature vectors")
    return array


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), exact for singular covariances.

    d² = ‖mu1 − mu2‖² + Tr(sigma1) + Tr(sigma2) − 2·Tr((sigma1·sigma2)^½)

    (Dowson & Landau, J. Multivariate Anal. 12, 1982; used as FID by Heusel et al., NeurIPS
    2017). The trace term is computed without a general matrix square root: with
    S = sigma1^½ (from ``eigh``, negative rounding eigenvalues set to 0), sigma1·sigma2 is similar
    to the symmetric PSD matrix S·sigma2·S, so Tr((sigma1·sigma2)^½) = Σ_i √λ_i(S·sigma2·S), again
    by ``eigh``. This holds for any PSD covariances, singular ones included (fewer samples than
    features, feature channels that are always zero): there is no diagonal offset, so the result
    does not depend on the features' scale. Eigenvalues below D·ε·λ_max (rounding noise, ε the
    float64 machine epsilon) count as 0. Cost: three D×D symmetric eigendecompositions.

    Args:
        mu1: ``(D,)`` mean of the first Gaussian (e.g. generated features).
        sigma1: ``(D, D)`` covariance of the first Gaussian.
        mu2: ``(D,)`` mean of the second Gaussian (e.g. real features).
        sigma2: ``(D, D)`` covariance of the second Gaussian.

    Returns:
        The squared Fréchet distance (FID when the features are a network's). Symmetric in the two
        Gaussians; 0 up to rounding (~1e-12·Tr sigma) for identical ones.

    Raises:
        ValueError: shapes disagree (message names them), a value is not finite, or a covariance
            has an eigenvalue below −1e-6·λ_max (it is then not positive semi-definite).

    Example:
        >>> import numpy as np
        >>> frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.ones(2), np.diag([4.0, 1.0]))
        4.0
        >>> frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2), np.diag([4.0, 0.0]))  # singular
        1.0
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    _check_gaussians(mu1, sigma1, mu2, sigma2)
    root1 = psd_sqrt(sigma1, "sigma1")
    _clip_rounding(np.linalg.eigvalsh((sigma2 + sigma2.T) / 2.0), "sigma2")  # its check only
    middle = root1 @ sigma2 @ root1                                      # (D, D), symmetric PSD
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_psd(middle))


def psd_sqrt(sigma: np.ndarray, name: str = "sigma") -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (``eigh``; rounding negatives -> 0).

    Args:
        sigma: ``(D, D)`` float64 symmetric PSD matrix (e.g. a covariance).
        name: what to call it in error messages.

    Returns:
        ``(D, D)`` float64 R with R = Rᵀ and R·R = sigma (to rounding).

    Raises:
        ValueError: an eigenvalue below −1e-6·λ_max: not positive semi-definite.
    """
    eigenvalues, vectors = np.linalg.eigh((sigma + sigma.T) / 2.0)
    return (vectors * np.sqrt(_clip_rounding(eigenvalues, name))) @ vectors.T


def _trace_sqrt_psd(matrix: np.ndarray) -> float:
    """Tr(matrix^½) = Σ √λ_i for a symmetric PSD matrix."""
    eigenvalues = np.linalg.eigvalsh((matrix + matrix.T) / 2.0)
    return float(np.sqrt(_clip_rounding(eigenvalues, "sigma1^½·sigma2·sigma1^½")).sum())


def _clip_rounding(eigenvalues: np.ndarray, name: str) -> np.ndarray:
    """Eigenvalues (ascending) with rounding noise (|λ| <= D·ε·λ_max) set to 0; raises on real negatives."""
    largest = max(float(np.abs(eigenvalues).max()), np.finfo(np.float64).tiny)
    if eigenvalues[0] < -NEGATIVE_TOLERANCE * largest:
        raise ValueError(f"{name} is not positive semi-definite (eigenvalue {float(eigenvalues[0])!r} against a "
                         f"largest of {largest!r}, tolerance {NEGATIVE_TOLERANCE!r} of it): pass covariance matrices")
    noise = len(eigenvalues) * np.finfo(np.float64).eps * largest
    return np.where(eigenvalues > noise, eigenvalues, 0.0)


def _check_gaussians(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> None:
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of one length D, got shapes {mu1.shape} and {mu2.shape}")
    d = len(mu1)
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (d, d):
            raise ValueError(f"{name} must be ({d}, {d}) to match the means, got shape {sigma.shape}")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"{name} holds NaN or infinite values")


class FIDStatistics:
    """Sufficient statistics of one feature set: count, Σx ``(D,)`` and Σxxᵀ ``(D, D)`` in float64.

    Lifecycle: :meth:`update` per batch on every rank, :meth:`all_reduce` once at the end (sums
    across ranks; a no-op without an initialised process group), then :meth:`mean_cov` or
    :meth:`fid`; :meth:`reset` to reuse. Statistics that have been all-reduced refuse a second
    reduction or further updates (either would count some rank's features twice); that mark is
    saved with them, so cached real statistics loaded on every rank are not summed again.

    Args:
        num_features: ``D``, if known; otherwise taken from the first :meth:`update`. Pass it when
            a rank may see no data, or :meth:`all_reduce` learns it from the other ranks.

    Example:
        >>> stats = FIDStatistics(num_features=512)
        >>> stats.update(torch.randn(4, 512))                # (B, D) features of 4 patches
        >>> stats.count, stats.sum.shape, stats.sum_outer.shape
        (4, (512,), (512, 512))
    """

    def __init__(self, num_features: int | None = None) -> None:
        if num_features is not None and num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self._num_features = num_features
        self.reset()

    # ---- lifecycle ----------------------------------------------------------------------

    def reset(self) -> None:
        """Forget all features (keeps ``num_features`` if it was given or seen)."""
        self.count = 0
        d = self._num_features
        self.sum = None if d is None else np.zeros(d)
        self.sum_outer = None if d is None else np.zeros((d, d))
        self.reduced = False

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        """Add a batch of feature vectors.

        Args:
            features: ``(N, D)`` array or tensor (any float dtype or device; accumulated in
                float64 on the CPU). ``N == 0`` is allowed.

        Raises:
            ValueError: not ``(N, D)``, ``D`` differs from earlier batches, a value is not finite,
                or the statistics were already all-reduced.
        """
        if self.reduced:
            raise ValueError("these FIDStatistics were already all-reduced; call reset() before updating again")
        x = feature_matrix(features)
        if self._num_features is None:
            self._num_features = x.shape[1]
            self.reset()
        if x.shape[1] != self._num_features:
            raise ValueError(f"features have D={x.shape[1]} but earlier batches had D={self._num_features}")
        self.count += len(x)
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x

    def all_reduce(self) -> FIDStatistics:
        """Sum count, Σx and Σxxᵀ over all ranks of the default process group, in place.

        One float64 ``all_reduce`` (gloo; NCCL tensors go to the current CUDA device). A no-op
        (apart from marking the statistics reduced) when ``torch.distributed`` is not initialised.
        Must be called on every rank.

        Returns:
            ``self``.

        Raises:
            ValueError: already reduced, no rank has seen a feature and none was given
                ``num_features``, or ranks disagree on ``D`` (raised on every rank alike).
        """
        if self.reduced:
            raise ValueError("these FIDStatistics were already all-reduced; a second reduction would "
                             "count every rank's features again")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self._all_reduce()
        self.reduced = True
        return self

    def _all_reduce(self) -> None:
        dist = torch.distributed
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        # Ranks that saw no batch may not know D: agree on it first (max D and max −D = −min D).
        d = self._num_features
        dims = torch.tensor([d or 0, -(d or np.iinfo(np.int32).max)], dtype=torch.float64, device=device)
        dist.all_reduce(dims, op=dist.ReduceOp.MAX)
        largest, smallest = int(dims[0]), -int(dims[1])
        if largest == 0:
            raise ValueError("no rank has FID features and none knows D: pass num_features to FIDStatistics")
        if largest != smallest:
            raise ValueError(f"ranks disagree on the feature dimension: D from {smallest} to {largest}")
        if self._num_features is None:
            self._num_features = largest
            self.reset()
        flat = np.concatenate([[float(self.count)], self.sum, self.sum_outer.ravel()])
        packed = torch.from_numpy(flat).to(device)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        flat = packed.cpu().numpy()
        d = largest
        self.count = int(round(flat[0]))  # exact: counts stay far below 2**53
        self.sum = flat[1:1 + d].copy()
        self.sum_outer = flat[1 + d:].reshape(d, d).copy()

    # ---- results ------------------------------------------------------------------------

    @property
    def num_features(self) -> int | None:
        """``D``, or None before the first update when it was not given."""
        return self._num_features

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (divisor N − 1, symmetrised), float64.

        Raises:
            ValueError: fewer than 2 feature vectors.
        """
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        n = self.count
        mu = self.sum / n
        sigma = (self.sum_outer - n * np.outer(mu, mu)) / (n - 1)
        return mu, (sigma + sigma.T) / 2.0

    def fid(self, other: FIDStatistics) -> float:
        """:func:`frechet_distance` between these statistics and ``other``'s (exact also when N <= D)."""
        return frechet_distance(*self.mean_cov(), *other.mean_cov())

    # ---- persistence --------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """The statistics as NumPy arrays: ``count``, ``sum`` ``(D,)``, ``sum_outer`` ``(D, D)``,
        ``reduced`` and ``version``.

        Raises:
            ValueError: no feature dimension yet (nothing to save).
        """
        if self._num_features is None:
            raise ValueError("empty FIDStatistics with unknown D: update() or pass num_features before saving")
        return {"version": np.array(STATE_VERSION), "count": np.array(self.count, dtype=np.int64),
                "sum": self.sum.copy(), "sum_outer": self.sum_outer.copy(), "reduced": np.array(self.reduced)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> FIDStatistics:
        """Statistics from :meth:`state_dict`'s output.

        Raises:
            ValueError: a key is missing, the version is unknown or the shapes disagree.
        """
        missing = sorted({"version", "count", "sum", "sum_outer", "reduced"} - set(state))
        if missing:
            raise ValueError(f"FID statistics lack {', '.join(missing)}")
        if int(state["version"]) != STATE_VERSION:
            raise ValueError(f"FID statistics have version {int(state['version'])}, this code reads {STATE_VERSION}")
        total = np.asarray(state["sum"], dtype=np.float64)
        outer = np.asarray(state["sum_outer"], dtype=np.float64)
        d = total.shape[0] if total.ndim == 1 else -1
        if d < 1 or outer.shape != (d, d):
            raise ValueError(f"FID statistics have sum {total.shape} and sum_outer {outer.shape}: expected (D,) and (D, D)")
        stats = cls(num_features=d)
        stats.count = int(state["count"])
        stats.sum, stats.sum_outer = total.copy(), outer.copy()
        stats.reduced = bool(state["reduced"])
        return stats

    def save(self, path: str | Path) -> Path:
        """Write :meth:`state_dict` to ``path`` (``.npz``, uncompressed; parents created).

        Returns:
            The path written (NumPy appends ``.npz`` when missing).
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **self.state_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> FIDStatistics:
        """Statistics saved by :meth:`save`.

        Raises:
            ValueError: the file is not such statistics (message names the file).
            FileNotFoundError: no file at ``path``.
        """
        with np.load(Path(path), allow_pickle=False) as data:
            try:
                return cls.from_state_dict({key: data[key] for key in data.files})
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None


def fid_from_features(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """FID between two in-memory feature sets (single process).

    Args:
        a: ``(N, D)`` features, e.g. of generated patches.
        b: ``(M, D)`` features, e.g. of real patches.

    Returns:
        The Fréchet distance of the two sets' Gaussians.

    Raises:
        ValueError: fewer than 2 vectors in a set, or their ``D`` differ.
    """
    first, second = FIDStatistics(), FIDStatistics()
    first.update(a)
    second.update(b)
    return first.fid(second)
