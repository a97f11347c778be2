"""Privacy accounting reproduces the paper's appendix B epsilons (Opacus RDP)."""

import math

import pytest

pytest.importorskip("opacus")

from hpc_gan.privacy.accounting import default_delta, epsilon, noise_for_epsilon

N = 2350
RATE = 4 / N
STEPS = 5870 * 100  # critic optimiser steps per epoch x 100 epochs, as in the paper

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "sigma, expected",
    # Paper: ~69 / 1.13e3 / 1.16e6. Measured here (opacus 1.6): 69.125 / 1133.02 / 1.15902e6.
    [(0.5, 69.0), (0.3, 1.13e3), (0.1, 1.16e6)],
)
def test_paper_epsilons(sigma, expected):
    eps = epsilon(sigma, RATE, STEPS, default_delta(N))
    assert eps == pytest.approx(expected, rel=0.02)


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
    delta = default_delta(N)
    assert epsilon(0.5, RATE, 0, delta) == 0.0
    a, b = epsilon(0.5, RATE, 100, delta), epsilon(0.5, RATE, 1000, delta)
    assert 0 < a < b
    assert epsilon(1.0, RATE, 1000, delta) < b
    assert math.isinf(epsilon(0.0, RATE, 10, delta))


def test_noise_for_epsilon_round_trips():
    delta = default_delta(N)
    for target in (10.0, 69.0):
        sigma = noise_for_epsilon(target, RATE, 20_000, delta)
        eps = epsilon(sigma, RATE, 20_000, delta)
        assert eps <= target
        assert eps == pytest.approx(target, rel=0.05)


@pytest.mark.parametrize(
    "args, name",
    [((-1, RATE, 10, 0.1), "noise_multiplier"), ((1, 0, 10, 0.1), "sample_rate"),
     ((1, RATE, -1, 0.1), "steps"), ((1, RATE, 10, 0.0), "delta")],
)
def test_bad_values_are_named(args, name):
    with pytest.raises(ValueError, match=name):
        epsilon(*args)
    with pytest.raises(ValueError, match="patches"):
        default_delta(0)
