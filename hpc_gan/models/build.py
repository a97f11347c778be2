"""Networks from the run configuration (the only place that reads ``ModelConfig`` for them)."""

from __future__ import annotations

from hpc_gan.config import ModelConfig
from hpc_gan.models.gan import Critic, Generator


def build_generator(model: ModelConfig) -> Generator:
    """The generator of a config, e.g. (B, 128) -> (B, 2, 128, 128, 64) for the paper's variants."""
    return Generator(latent_dim=model.latent_dim, ngf=model.ngf, patch_shape=model.patch_shape, out_channels=2)


def build_critic(model: ModelConfig) -> Critic:
    """The critic of a config, (B, 2, *patch_shape) -> (B,)."""
    return Critic(ndf=model.ndf, patch_shape=model.patch_shape, in_channels=2, norm=model.critic_norm)
