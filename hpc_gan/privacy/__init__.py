"""Differential privacy for the critic (paper appendix B): accounting and DP-SGD training.

``accounting`` needs only Opacus' accountant; ``dp_critic`` imports Opacus' engine lazily.
"""

from hpc_gan.privacy.accounting import default_delta, epsilon, noise_for_epsilon

__all__ = ["default_delta", "epsilon", "noise_for_epsilon"]
