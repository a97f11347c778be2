"""Privacy accounting of DP-SGD on the critic (Rényi DP, through Opacus' RDP accountant).

The critic sees real patches only in its own optimiser steps, so the privacy cost of a run is
that of ``steps`` Poisson-subsampled Gaussian mechanisms with sampling rate
``batch_size / n_patches`` and noise multiplier ``sigma``. The generator is trained on the
critic's output only and is covered by post-processing.

The paper's appendix B (100 epochs of 2350 patches at batch 4, 5 critic steps per generator step,
so 5870 critic optimiser steps per epoch, delta = 1/2350) reports epsilon ~ 69 / 1.13e3 / 1.16e6
for sigma 0.5 / 0.3 / 0.1; :func:`epsilon` reproduces these (69.13 / 1133.0 / 1.159e6).

Example:
    >>> round(epsilon(0.5, 4 / 2350, 5870 * 100, default_delta(2350)), 1)
    69.1
"""

from __future__ import annotations

import warnings

__all__ = ["default_delta", "epsilon", "noise_for_epsilon"]


def _check(noise_multiplier: float | None, sample_rate: float, steps: int, delta: float) -> None:
    if noise_multiplier is not None and noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1] (batch size / dataset size), got {sample_rate}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), e.g. 1 / number of patches, got {delta}")


def default_delta(n: int) -> float:
    """The paper's delta: one over the number of training patches ``n``."""
    if n < 1:
        raise ValueError(f"number of training patches must be >= 1, got {n}")
    return 1.0 / n


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon spent by ``steps`` DP-SGD steps (Opacus RDP accountant).

    Args:
        noise_multiplier: sigma, the Gaussian noise std relative to the clip norm.
        sample_rate: Poisson sampling probability of each example, ``batch_size / n``.
        steps: number of noisy optimiser steps that touched real data.
        delta: target delta, usually :func:`default_delta`.

    Returns:
        Epsilon (``inf`` for ``noise_multiplier == 0`` and ``steps > 0``; 0 for ``steps == 0``).

    Raises:
        ValueError: a value out of range (the message names it).
    """
    _check(noise_multiplier, sample_rate, steps, delta)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return float("inf")
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with warnings.catch_warnings():
        # For tiny sigma the optimal Renyi order is the smallest one Opacus tries; the bound is
        # still valid (just not the tightest), and it is what the paper reports.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(accountant.get_epsilon(delta=delta))


def noise_for_epsilon(target_epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """The noise multiplier sigma that makes :func:`epsilon` at most ``target_epsilon``.

    Args:
        target_epsilon: the privacy budget, > 0.
        sample_rate, steps, delta: as in :func:`epsilon`.

    Returns:
        sigma with ``epsilon(sigma, sample_rate, steps, delta) <= target_epsilon`` (Opacus binary
        search, to within its tolerance of the target).

    Raises:
        ValueError: a value out of range.
    """
    _check(None, sample_rate, max(steps, 1), delta)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if steps == 0:
        return 0.0
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
            )
        )
