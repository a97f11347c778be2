"""Differential privacy for the critic (paper appendix B): accounting, DP-SGD training, audit.

``accounting`` (epsilon, sigma for a target epsilon) needs only Opacus' accountant;
``dp_critic`` (the DP-SGD critic step, Opacus imported lazily) and ``dp_trainer`` (the dp
variant's trainer, picked by ``python -m hpc_gan.train``) train; ``audit`` is the memorisation
audit of every evaluation report. docs/PRIVACY.md explains the whole route.
"""

from hpc_gan.privacy.accounting import default_delta, epsilon, noise_for_epsilon

__all__ = ["default_delta", "epsilon", "noise_for_epsilon"]
