"""Differential privacy for the critic (paper appendix B): accounting and DP-SGD training.

``accounting`` (epsilon, sigma for a target epsilon) needs only Opacus' accountant;
``dp_critic`` holds the DP-SGD critic step (Opacus imported lazily). The memorisation audit of
every evaluation report is an evaluation metric: :mod:`hpc_gan.eval.memorisation`. The dp
variant's trainer that drives them lives with the other trainer in :mod:`hpc_gan.train.dp_trainer` (privacy/ imports nothing from
train/). docs/PRIVACY.md explains the whole route.
"""

from hpc_gan.privacy.accounting import default_delta, epsilon, noise_for_epsilon

__all__ = ["default_delta", "epsilon", "noise_for_epsilon"]
