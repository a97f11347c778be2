"""Fréchet distance (pure function) and the FID statistics' lifecycle, cache and all_reduce."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from helpers import torchrun
from hpc_gan.eval.fid import FIDStatistics, fid_from_features, frechet_distance

MP_SCRIPT = Path(__file__).parent / "mp" / "fid_allreduce.py"


def random_gaussian(rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
    a = rng.normal(size=(d, d))
    return rng.normal(size=d), a @ a.T / d + 0.1 * np.eye(d)


def reference_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Independent route: Tr (σ1σ2)^½ = Σ √eig(σ1^½ σ2 σ1^½), a symmetric PSD matrix (eigh only)."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


@pytest.mark.unit
@pytest.mark.parametrize("d", [8, 64])
def test_frechet_distance_matches_direct_computation(d):
    rng = np.random.default_rng(d)
    (mu1, s1), (mu2, s2) = random_gaussian(rng, d), random_gaussian(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference_distance(mu1, s1, mu2, s2), rel=1e-8)


@pytest.mark.unit
def test_frechet_distance_identical_is_zero_and_symmetric():
    rng = np.random.default_rng(0)
    (mu1, s1), (mu2, s2) = random_gaussian(rng, 32), random_gaussian(rng, 32)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)


@pytest.mark.unit
def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3.0, size=16), rng.uniform(0.1, 3.0, size=16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def nuclear_norm_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Another independent route for PSD inputs of any rank: Tr (σ1σ2)^½ = ‖σ1^½ σ2^½‖_* (sum of
    singular values), with the roots from scipy's sqrtm of each covariance alone."""
    with warnings.catch_warnings():  # sqrtm warns on singular input, and is accurate for a PSD one
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root1, root2 = (np.real(scipy.linalg.sqrtm(s)) for s in (sigma1, sigma2))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.linalg.svd(root1 @ root2, compute_uv=False).sum())


def sample_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.unit
@pytest.mark.parametrize("scale", [1e-3, 1e-2, 1e-1, 1.0])
def test_well_conditioned_matches_scipy_sqrtm(scale):
    rng = np.random.default_rng(7)
    (mu1, s1), (mu2, s2) = random_gaussian(rng, 16), random_gaussian(rng, 16)
    mu1, s1, mu2, s2 = mu1 * scale, s1 * scale**2, mu2 * scale, s2 * scale**2
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    expected = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


@pytest.mark.unit
@pytest.mark.parametrize("scale", [1e-3, 1e-2, 1e-1, 1.0])
@pytest.mark.parametrize("n", [10, 32])
def test_fewer_samples_than_features_is_exact(scale, n):
    """N <= D (rank N-1 of 32): equal to ‖σ1^½σ2^½‖_*, and scale-free (no diagonal offset)."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(n, 32)) * scale, rng.normal(1.0, 1.5, size=(n, 32)) * scale
    (mu1, s1), (mu2, s2) = sample_moments(a), sample_moments(b)
    value = frechet_distance(mu1, s1, mu2, s2)
    assert value == pytest.approx(nuclear_norm_distance(mu1, s1, mu2, s2), rel=1e-7)
    unit = frechet_distance(mu1 / scale, s1 / scale**2, mu2 / scale, s2 / scale**2)
    assert value == pytest.approx(unit * scale**2, rel=1e-9)          # d² scales as scale²
    assert fid_from_features(a, b) == pytest.approx(value, rel=1e-9)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)  # identical singular: 0


@pytest.mark.unit
@pytest.mark.parametrize("scale", [1e-3, 1e-2, 1e-1, 1.0])
def test_always_zero_channels_are_exact(scale):
    """Dead feature channels: the distance is that of the live channels alone (well-conditioned,
    computed with sqrtm), whatever the features' scale."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(200, 12)) * scale, rng.normal(0.5, 2.0, size=(200, 12)) * scale
    expected = fid_from_features(a, b)
    (mu1, s1), (mu2, s2) = sample_moments(a), sample_moments(b)
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    assert expected == pytest.approx(float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean)), rel=1e-9)
    dead = np.zeros((200, 20))
    padded_a, padded_b = np.hstack([a, dead]), np.hstack([b, dead])
    assert fid_from_features(padded_a, padded_b) == pytest.approx(expected, rel=1e-9)
    (pm1, ps1), (pm2, ps2) = sample_moments(padded_a), sample_moments(padded_b)
    assert frechet_distance(pm1, ps1, pm2, ps2) == pytest.approx(nuclear_norm_distance(pm1, ps1, pm2, ps2), rel=1e-7)


@pytest.mark.unit
def test_frechet_distance_rejects_bad_input():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match=r"mu1 and mu2 .* shapes \(4,\) and \(3,\)"):
        frechet_distance(mu, sigma, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"sigma2 must be \(4, 4\)"):
        frechet_distance(mu, sigma, mu, np.eye(5))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, sigma, mu, np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="sigma2 is not positive semi-definite"):  # not a covariance
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), -np.eye(2))
    with pytest.raises(ValueError, match="sigma1 is not positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -0.5]), np.zeros(2), np.eye(2))


@pytest.mark.unit
def test_statistics_in_chunks_equal_all_at_once_and_numpy():
    data = np.random.default_rng(3).normal(2.0, 3.0, size=(257, 12))
    whole, chunked = FIDStatistics(), FIDStatistics(num_features=12)
    whole.update(data)
    for chunk in np.array_split(data, 5):
        chunked.update(torch.from_numpy(chunk))
    chunked.update(np.empty((0, 12)))
    assert chunked.count == whole.count == 257
    for x, y in zip(chunked.mean_cov(), whole.mean_cov()):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)
    mu, sigma = whole.mean_cov()
    np.testing.assert_allclose(mu, data.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(data, rowvar=False), rtol=1e-10, atol=1e-12)
    whole.reset()
    assert whole.count == 0 and whole.num_features == 12


@pytest.mark.unit
def test_statistics_lifecycle_errors():
    stats = FIDStatistics()
    stats.update(np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 2 feature vectors, got 1"):
        stats.mean_cov()
    with pytest.raises(ValueError, match="D=4 but earlier batches had D=3"):
        stats.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"\(N, D\) matrix"):
        stats.update(np.ones(3))
    stats.all_reduce()  # no process group: a no-op that marks the statistics reduced
    with pytest.raises(ValueError, match="already all-reduced"):
        stats.all_reduce()
    with pytest.raises(ValueError, match="already all-reduced"):
        stats.update(np.ones((2, 3)))
    stats.reset()
    stats.update(np.ones((2, 3)))


@pytest.mark.unit
def test_save_load_round_trip(tmp_path):
    stats = FIDStatistics()
    stats.update(np.random.default_rng(4).normal(size=(40, 6)))
    stats.all_reduce()
    path = stats.save(tmp_path / "cache" / "real_stats")
    assert path.name == "real_stats.npz" and path.exists()
    loaded = FIDStatistics.load(path)
    assert loaded.count == 40 and loaded.reduced
    for x, y in zip(loaded.mean_cov(), stats.mean_cov()):
        np.testing.assert_array_equal(x, y)
    np.savez(tmp_path / "bad.npz", sum=np.zeros(3))
    with pytest.raises(ValueError, match=r"bad.npz: FID statistics lack count, reduced, sum_outer, version"):
        FIDStatistics.load(tmp_path / "bad.npz")


@pytest.mark.multiprocess
def test_all_reduce_on_two_ranks_equals_one_process(tmp_path):
    spec = importlib.util.spec_from_file_location("fid_allreduce", MP_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    data = script.dataset()
    out = tmp_path / "reduced.npz"
    done = torchrun(str(MP_SCRIPT), str(out), timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    single, first = FIDStatistics(), FIDStatistics()
    single.update(data)
    first.update(data[:50])
    with np.load(out) as got:
        assert int(got["count"]) == len(data) and int(got["count0"]) == 50
        for key, expected in zip(("mu", "sigma", "mu0", "sigma0"), (*single.mean_cov(), *first.mean_cov())):
            np.testing.assert_allclose(got[key], expected, rtol=1e-12, atol=1e-12)
