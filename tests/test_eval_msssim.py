"""3D SSIM / MS-SSIM and the pairwise diversity score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpc_gan.eval.msssim import mean_pairwise_ms_ssim, ms_ssim3d, sample_pairs, ssim3d, usable_scales


def noise(n: int, seed: int, shape=(32, 32, 16)) -> torch.Tensor:
    """(n, 1, X, Y, Z) independent uniform noise over the whole range [-1, 1]."""
    return torch.rand(n, 1, *shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def smooth_noise(n: int, seed: int, shape=(32, 32, 16)) -> torch.Tensor:
    """Spatially correlated noise, so that a shifted copy keeps some structure."""
    return F.avg_pool3d(noise(n, seed, shape), 3, 1, 1)


def test_identical_is_one_and_noise_near_zero():
    x, y = noise(4, 0), noise(4, 1)
    torch.testing.assert_close(ms_ssim3d(x, x), torch.ones(4, dtype=torch.float64))
    ssim, cs = ssim3d(x, x)
    torch.testing.assert_close(ssim, torch.ones(4))
    torch.testing.assert_close(cs, torch.ones(4))
    assert ms_ssim3d(x, y).max() < 0.1


def test_symmetric_and_shift_in_between():
    x, y = smooth_noise(3, 0), smooth_noise(3, 1)
    torch.testing.assert_close(ms_ssim3d(x, y), ms_ssim3d(y, x))
    shifted = ms_ssim3d(x, torch.roll(x, 1, dims=2))
    assert (shifted > 0.3).all() and (shifted < 0.99).all()
    assert (ms_ssim3d(x, torch.roll(x, 3, dims=2)) < shifted).all()


def test_scales_fit_the_patch():
    assert usable_scales((32, 32, 16)) == 2 and usable_scales((128, 128, 64)) == 4
    x = smooth_noise(1, 0, (16, 16, 16))
    assert ms_ssim3d(x, x).item() == pytest.approx(1.0)  # one scale only, weights renormalised
    with pytest.raises(ValueError, match="smaller than"):
        ms_ssim3d(x[..., :4], x[..., :4])


def test_pairs_are_distinct_and_seeded():
    pairs = sample_pairs(50, 100, seed=3)
    assert pairs.shape == (100, 2) and (pairs[:, 0] < pairs[:, 1]).all()
    assert len({tuple(p) for p in pairs.tolist()}) == 100
    assert np.array_equal(pairs, sample_pairs(50, 100, seed=3))
    assert not np.array_equal(pairs, sample_pairs(50, 100, seed=4))
    assert len(sample_pairs(4, 100)) == 6  # all pairs when there are fewer
    with pytest.raises(ValueError, match="at least 2"):
        sample_pairs(1)


def test_mean_pairwise():
    diverse = noise(6, 0)
    collapsed = diverse[:1].repeat(6, 1, 1, 1, 1) + 0.05 * noise(6, 1)  # mode collapse
    low = mean_pairwise_ms_ssim(diverse, pairs=10, seed=0)
    assert low == pytest.approx(mean_pairwise_ms_ssim(diverse, pairs=10, seed=0, batch=3), abs=1e-6)
    assert low < 0.1 < 0.9 < mean_pairwise_ms_ssim(collapsed, pairs=10)
