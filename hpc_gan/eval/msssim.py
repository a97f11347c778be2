"""3D multi-scale SSIM between generated samples: a diversity score (lower = more diverse).

SSIM follows Wang et al. (2004) with a separable Gaussian window (7 voxels, sigma 1.5) applied
as three 1-D ``conv3d`` passes without padding ("valid"), constants K1 = 0.01, K2 = 0.03.
MS-SSIM follows Wang, Simoncelli & Bovik (2003): contrast-structure at every scale, luminance
only at the coarsest, scales separated by 2x2x2 average pooling, combined with the weights
(0.0448, 0.2856, 0.3001, 0.2363, 0.1333).

3D patches are small, so fewer than five scales usually fit: a scale is used only while every
axis is still at least the window size, trailing scales are dropped and the remaining weights
renormalised to sum to 1. With the default 7-voxel window, 32x32x16 patches give 2 scales
(16 -> 8 voxels on z), 128x128x64 patches give 4. As in common implementations
(e.g. pytorch-msssim), negative per-scale values are clamped to 0 before the weighted product,
so two unrelated volumes score about 0 and identical ones exactly 1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
K1, K2 = 0.01, 0.03


def gaussian_window(win: int = 7, sigma: float = 1.5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``win`` taps, e.g. (7,)."""
    if win < 1 or win % 2 == 0:
        raise ValueError(f"window size must be an odd int >= 1, got {win}")
    x = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype)


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable valid Gaussian filtering of (N, C, X, Y, Z) -> (N, C, X-w+1, Y-w+1, Z-w+1)."""
    channels = x.shape[1]
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = window.numel()
        kernel = window.view(1, 1, *shape).repeat(channels, 1, 1, 1, 1)
        x = F.conv3d(x, kernel, groups=channels)
    return x


def _check_pair(x: torch.Tensor, y: torch.Tensor, win: int) -> None:
    if x.shape != y.shape or x.dim() != 5:
        raise ValueError(f"x and y must both be (N, C, X, Y, Z) of one shape, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[2:]) < win:
        raise ValueError(f"patch {tuple(x.shape[2:])} is smaller than the {win}-voxel SSIM window on some axis; "
                         "use a smaller win")


def ssim3d(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, win: int = 7,
           sigma: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Structural similarity of 3D volumes.

    Args:
        x, y: (N, C, X, Y, Z) float tensors of one shape, each axis >= ``win``; e.g. image
            channels (N, 1, 32, 32, 16) in [-1, 1].
        data_range: max - min of the value range (2 for [-1, 1]).
        win: Gaussian window size (odd).
        sigma: Gaussian standard deviation in voxels.

    Returns:
        (ssim, cs), each (N,): the mean SSIM map and the mean contrast-structure map over
        channels and voxels (cs is SSIM without its luminance term).

    Raises:
        ValueError: shapes differ, are not 5-D, or an axis is smaller than the window.
    """
    _check_pair(x, y, win)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    window = gaussian_window(win, sigma, dtype).to(x.device)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    var_x = _blur(x * x, window) - mu_x**2
    var_y = _blur(y * y, window) - mu_y**2
    cov = _blur(x * y, window) - mu_x * mu_y
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs_map
    return ssim_map.flatten(1).mean(1), cs_map.flatten(1).mean(1)


def usable_scales(shape: tuple[int, ...], levels: int = len(MS_SSIM_WEIGHTS), win: int = 7) -> int:
    """How many MS-SSIM scales fit a patch: scale s has axes shape // 2**s, all >= ``win``.

    Example:
        >>> usable_scales((32, 32, 16)), usable_scales((128, 128, 64))
        (2, 4)
    """
    scales = 0
    while scales < levels and min(s // 2**scales for s in shape) >= win:
        scales += 1
    return scales


def ms_ssim3d(x: torch.Tensor, y: torch.Tensor, weights: tuple[float, ...] = MS_SSIM_WEIGHTS,
              data_range: float = 2.0, win: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Multi-scale SSIM of 3D volumes (Wang et al. 2003) on as many scales as fit.

    Args:
        x, y: (N, C, X, Y, Z) float tensors of one shape, e.g. (N, 1, 32, 32, 16) in [-1, 1].
        weights: per-scale exponents, finest first; trailing ones are dropped when the patch is
            too small for them (see :func:`usable_scales`) and the rest renormalised.
        data_range, win, sigma: as for :func:`ssim3d`.

    Returns:
        (N,) tensor in [0, 1]; 1 for identical volumes.

    Raises:
        ValueError: shapes differ or the patch is smaller than one window.
    """
    _check_pair(x, y, win)
    scales = usable_scales(tuple(x.shape[2:]), len(weights), win)
    w = torch.tensor(weights[:scales], dtype=torch.float64)
    w = w / w.sum()
    result = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    for s in range(scales):
        if s:
            x, y = F.avg_pool3d(x, 2), F.avg_pool3d(y, 2)
        ssim, cs = ssim3d(x, y, data_range, win, sigma)
        value = ssim if s == scales - 1 else cs  # luminance only at the coarsest scale
        result = result * value.double().clamp_min(0) ** w[s]
    return result


def sample_pairs(n: int, pairs: int = 100, seed: int = 0) -> np.ndarray:
    """Distinct unordered pairs (i < j) of ``n`` samples, in a seeded random order.

    All ``n (n - 1) / 2`` pairs when there are at most ``pairs`` of them.

    Returns:
        (P, 2) int64 array, P = min(pairs, n (n - 1) / 2).

    Raises:
        ValueError: ``n`` < 2 or ``pairs`` < 1.
    """
    if n < 2:
        raise ValueError(f"pairwise MS-SSIM needs at least 2 samples, got {n}")
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    total = n * (n - 1) // 2
    rng = np.random.default_rng(seed)
    if total <= pairs:
        i, j = np.triu_indices(n, k=1)
        return np.stack([i, j], 1)[rng.permutation(total)].astype(np.int64)
    chosen: dict[tuple[int, int], None] = {}  # ordered set: the draw order is reproducible
    while len(chosen) < pairs:
        i, j = rng.choice(n, size=2, replace=False)
        chosen[(min(i, j), max(i, j))] = None
    return np.array(list(chosen), dtype=np.int64)


def mean_pairwise_ms_ssim(samples: torch.Tensor, pairs: int = 100, seed: int = 0, batch: int = 16,
                          data_range: float = 2.0) -> float:
    """Mean MS-SSIM over random distinct pairs of samples: a diversity score (lower = more diverse).

    Args:
        samples: (N, 1, X, Y, Z), e.g. the image channel of generated patches in [-1, 1].
        pairs: number of distinct pairs (all pairs if there are fewer).
        seed: chooses the pairs (see :func:`sample_pairs`).
        batch: pairs compared per call (memory only).
        data_range: as for :func:`ssim3d`.

    Returns:
        The mean, a float in [0, 1].

    Raises:
        ValueError: fewer than 2 samples, not 5-D, or patches smaller than the window.
    """
    if samples.dim() != 5:
        raise ValueError(f"samples must be (N, C, X, Y, Z), got shape {tuple(samples.shape)}")
    chosen = torch.from_numpy(sample_pairs(samples.shape[0], pairs, seed))
    values = [ms_ssim3d(samples[part[:, 0]], samples[part[:, 1]], data_range=data_range)
              for part in chosen.split(batch)]
    return float(torch.cat(values).mean())
