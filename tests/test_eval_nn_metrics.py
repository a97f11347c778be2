"""k-NN precision/recall (Kynkäänniemi 2019) and density/coverage (Naeem 2020) on Gaussians."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpc_gan.eval.nn_metrics import density_coverage, precision_recall, precision_recall_density_coverage

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def gaussians():
    rng = np.random.default_rng(0)
    return rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))


def test_same_distribution_scores_near_one(gaussians):
    real, fake = gaussians
    k = 5
    scores = precision_recall_density_coverage(real, fake, k=k)
    assert scores["precision"] > 0.9 and scores["recall"] > 0.9 and scores["coverage"] > 0.9
    assert 0.8 < scores["density"] < 1.2
    # Naeem et al.: for identical distributions E[coverage] = 1 - 2^-k as N grows
    assert scores["coverage"] == pytest.approx(1 - 2.0**-k, abs=0.02)


def test_identical_sets_exact_values(gaussians):
    real = gaussians[0][:300]
    scores = precision_recall_density_coverage(real, torch.from_numpy(real), k=3)
    # each real ball holds its centre and its 3 nearest neighbours: density = (k + 1) / k
    assert scores == pytest.approx({"precision": 1.0, "recall": 1.0, "density": 4 / 3, "coverage": 1.0})


def test_far_shifted_fake_scores_zero(gaussians):
    real, fake = (x[:500] for x in gaussians)
    assert precision_recall(real, fake + 50.0) == {"precision": 0.0, "recall": 0.0}
    assert density_coverage(real, fake + 50.0) == {"density": 0.0, "coverage": 0.0}


def test_mode_collapse_is_precise_but_not_diverse(gaussians):
    real, fake = (x[:500] for x in gaussians)
    scores = precision_recall_density_coverage(real, 0.2 * fake)  # a narrow cloud at the real mode
    assert scores["precision"] > 0.95 and scores["recall"] < 0.1
    # default k = 5: coverage 0.27 here against 1 - 2^-5 ≈ 0.97 for a matching distribution
    assert scores["coverage"] < 0.3 and scores["density"] > 1.0


def test_chunked_equals_unchunked():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(50, 4)), rng.normal(0.3, 1.0, size=(37, 4))
    fake[:5] = real[:5]  # duplicates put points exactly on ball boundaries
    assert (precision_recall_density_coverage(real, fake, k=3, chunk_size=7)
            == precision_recall_density_coverage(real, fake, k=3, chunk_size=10**6))


def test_too_few_samples_and_bad_arguments():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="fake has 5 samples; k-NN radii with k=5 need at least 6"):
        precision_recall(rng.normal(size=(10, 2)), rng.normal(size=(5, 2)))  # default k = 5
    with pytest.raises(ValueError, match="differ in D: 2 and 3"):
        density_coverage(rng.normal(size=(10, 2)), rng.normal(size=(10, 3)))
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        precision_recall(rng.normal(size=(10, 2)), rng.normal(size=(10, 2)), k=0)
