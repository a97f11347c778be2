"""PRD (Sajjadi et al. 2018): known answers on histograms and on clustered Gaussian features."""

from __future__ import annotations

import numpy as np
import pytest

from hpc_gan.eval.prd import (compute_prd, compute_prd_from_embedding, kmeans, plot_prd, prd_auc,
                              prd_generated_vs_real, prd_to_max_f_beta_pair)

pytestmark = pytest.mark.unit
D = 16


@pytest.fixture(scope="module")
def mixture():
    """10 well-separated Gaussian modes; real uses all, 'collapsed' only modes 0-4 (600 each)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, D)) * 10

    def sample(n, modes):
        return centres[rng.choice(modes, size=n)] + rng.normal(size=(n, D))

    return sample(600, np.arange(10)), sample(600, np.arange(5))


def test_compute_prd_exact_on_hand_made_histograms():
    eps = 1e-3
    p, r = compute_prd([0.5, 0.5, 0.0], [0.25, 0.25, 0.5], num_angles=3, epsilon=eps)
    slopes = np.tan([eps, np.pi / 4, np.pi / 2 - eps])
    # λ ≤ 2: α = 2·min(λ/4, 1/2) = λ/2 and β = 1/2 (the third real bin is never covered);
    # λ ≥ 2: α = 1 (all generated mass lies where real has mass) and β = 1/λ.
    np.testing.assert_allclose(p, [slopes[0] / 2, slopes[1] / 2, 1.0], rtol=1e-12)
    np.testing.assert_allclose(r, [0.5, 0.5, 1 / slopes[2]], rtol=1e-12)
    p, r = compute_prd([0.6, 0.4], [0.2, 0.8], num_angles=3)
    assert p[1] == pytest.approx(0.6, rel=1e-12) and r[1] == pytest.approx(0.6, rel=1e-12)  # min(.2,.6)+min(.8,.4)


def test_compute_prd_swapping_arguments_mirrors_the_curve():
    e, f = np.array([0.1, 0.2, 0.3, 0.4, 0.0]), np.array([0.3, 0.0, 0.3, 0.2, 0.2])
    p, r = compute_prd(e, f)
    p2, r2 = compute_prd(f, e)
    np.testing.assert_allclose(p2, r[::-1], atol=1e-12)  # λ ↦ 1/λ reverses the symmetric angle grid
    np.testing.assert_allclose(r2, p[::-1], atol=1e-12)
    assert p.shape == (1001,) and np.all(np.diff(p) >= -1e-15) and np.all(np.diff(r) <= 1e-15)


def test_compute_prd_rejects_bad_histograms():
    with pytest.raises(ValueError, match="same bins"):
        compute_prd([0.5, 0.5], [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="sum to 1"):
        compute_prd([0.5, 0.6], [0.5, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        compute_prd([1.5, -0.5], [0.5, 0.5])


def test_identical_sets_give_full_precision_and_recall():
    x = np.random.default_rng(1).normal(size=(300, D))
    p, r = compute_prd_from_embedding(x, x)
    middle = slice(490, 511)  # λ in [0.969, 1.032]; here precision = min(λ, 1), recall = min(1, 1/λ)
    assert np.all(p[middle] > 0.95) and np.all(r[middle] > 0.95)
    assert p[500] == pytest.approx(1.0) and r[500] == pytest.approx(1.0)
    f8, f1_8 = prd_to_max_f_beta_pair(p, r)
    assert f8 >= 0.95 and f1_8 >= 0.95
    assert prd_auc(p, r) == pytest.approx(1.0, abs=1e-6)


def test_samples_of_one_distribution_score_high():
    rng = np.random.default_rng(2)
    p, r = prd_generated_vs_real(rng.normal(size=(400, D)), rng.normal(size=(400, D)), preset="paper")
    assert min(prd_to_max_f_beta_pair(p, r)) > 0.9


def test_disjoint_sets_give_zero():
    rng = np.random.default_rng(3)
    p, r = compute_prd_from_embedding(rng.normal(size=(300, D)), rng.normal(30.0, 1.0, size=(300, D)))
    assert max(prd_to_max_f_beta_pair(p, r)) <= 0.05
    assert p.max() <= 0.05 and r.max() <= 0.05 and prd_auc(p, r) <= 0.05


def test_mode_collapse_is_high_precision_low_recall_and_order_matters(mixture):
    real, collapsed = mixture
    f8, f1_8 = prd_to_max_f_beta_pair(*prd_generated_vs_real(collapsed, real))
    assert f1_8 > 0.9 and f8 < 0.6 and f1_8 > f8  # realistic samples, half of the modes missing
    swapped_f8, swapped_f1_8 = prd_to_max_f_beta_pair(*compute_prd_from_embedding(real, collapsed))
    assert swapped_f8 == pytest.approx(f1_8, abs=0.05) and swapped_f1_8 == pytest.approx(f8, abs=0.05)


@pytest.fixture(scope="module")
def balanced_modes():
    """10 well-separated modes, exactly 60 real points in each; 'half' has 120 points in each of
    modes 0-4 and none in 5-9 (so with the modes as clusters the histograms are exact)."""
    rng = np.random.default_rng(11)
    centres = rng.normal(size=(10, D)) * 10

    def sample(counts):
        return np.concatenate([c + rng.normal(size=(k, D)) for c, k in zip(centres, counts)])

    return sample([60] * 10), sample([60] * 10), sample([120] * 5 + [0] * 5)


def test_known_answers_with_ten_clusters(balanced_modes):
    """With the modes recovered in every run (best of 10 initialisations): identical distributions
    give F_8 = F_1/8 = 1; covering half of the modes gives α(λ) = min(λ/2, 1), β = min(1/2, 1/λ),
    whose best points are (p, r) = (1, 1/2): F_8 = 65·0.5/64.5 = 0.5039, F_1/8 = 0.9848."""
    real, other_real, half = balanced_modes
    f8, f1_8 = prd_to_max_f_beta_pair(*compute_prd_from_embedding(other_real, real, num_clusters=10))
    assert f8 == pytest.approx(1.0, abs=1e-3) and f1_8 == pytest.approx(1.0, abs=1e-3)
    f8, f1_8 = prd_to_max_f_beta_pair(*compute_prd_from_embedding(half, real, num_clusters=10))
    assert f8 == pytest.approx(65 * 0.5 / 64.5, abs=2e-3)
    assert f1_8 == pytest.approx((1 + 1 / 64) * 0.5 / (1 / 64 + 0.5), abs=2e-3)


def test_kmeans_keeps_the_best_of_several_initialisations():
    rng = np.random.default_rng(6)
    centres = rng.normal(size=(10, D)) * 10
    data = np.concatenate([c + rng.normal(size=(30, D)) for c in centres])

    def inertia(n_init):
        found, labels = kmeans(data, 10, seed=0, n_init=n_init)
        return ((data - found[labels]) ** 2).sum()

    assert inertia(10) <= inertia(1) + 1e-9
    assert inertia(10) == pytest.approx(sum(((data[i * 30:(i + 1) * 30] - data[i * 30:(i + 1) * 30].mean(0)) ** 2).sum()
                                            for i in range(10)), rel=1e-9)   # the modes themselves


def test_prd_is_deterministic_for_a_seed(mixture):
    real, collapsed = mixture
    first = compute_prd_from_embedding(collapsed, real, num_runs=2, seed=5)
    again = compute_prd_from_embedding(collapsed, real, num_runs=2, seed=5)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])


def test_kmeans_finds_separated_blobs():
    rng = np.random.default_rng(4)
    data = np.concatenate([rng.normal(c, 0.1, size=(50, 2)) for c in (0.0, 10.0, 20.0)])
    centres, labels = kmeans(data, 3, seed=0)
    assert sorted(np.round(centres[:, 0])) == [0.0, 10.0, 20.0]
    assert all(len(set(labels[i * 50:(i + 1) * 50])) == 1 for i in range(3))


def test_balance_and_too_few_samples_errors():
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="balanced sets: got 30 generated and 40 real"):
        prd_generated_vs_real(rng.normal(size=(30, 4)), rng.normal(size=(40, 4)))
    p, _ = compute_prd_from_embedding(rng.normal(size=(30, 4)), rng.normal(size=(40, 4)), num_clusters=5,
                                      num_runs=1, enforce_balance=False)
    assert p.shape == (1001,)
    with pytest.raises(ValueError, match="too few samples for PRD: 15 < num_clusters=20"):
        compute_prd_from_embedding(rng.normal(size=(15, 4)), rng.normal(size=(15, 4)))
    with pytest.raises(ValueError, match="unknown PRD preset 'fast'"):
        prd_generated_vs_real(rng.normal(size=(30, 4)), rng.normal(size=(30, 4)), preset="fast")


def test_f_beta_and_auc_known_values():
    assert prd_to_max_f_beta_pair([0.5], [0.5]) == pytest.approx((0.5, 0.5))
    assert prd_to_max_f_beta_pair([0.0, 1.0], [0.0, 0.0]) == (0.0, 0.0)  # 0/0 guarded
    f8, f1_8 = prd_to_max_f_beta_pair([1.0], [0.5])
    assert f8 == pytest.approx(65 * 0.5 / (64 + 0.5)) and f1_8 == pytest.approx((1 + 1 / 64) * 0.5 / (1 / 64 + 0.5))
    assert prd_auc([1.0, 1.0, 0.0], [0.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert prd_auc([0.0, 1.0], [1.0, 0.0]) == pytest.approx(0.5)   # order of the input does not matter
    p, r = compute_prd([0.5, 0.5, 0.0], [0.25, 0.25, 0.5])
    assert prd_auc(p, r) == pytest.approx(0.5, abs=1e-5)            # precision 1 up to recall 1/2


def test_plot_writes_png(tmp_path, mixture):
    real, collapsed = mixture
    curves = {"collapsed": compute_prd_from_embedding(collapsed, real, num_runs=1),
              "identical": compute_prd_from_embedding(real, real, num_runs=1)}
    path = plot_prd(curves, tmp_path / "plots" / "prd.png", title="PRD")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(path).ndim == 3
    with pytest.raises(ValueError, match="at least one curve"):
        plot_prd({}, tmp_path / "empty.png")
