"""Generator and critic networks (plain ``nn.Module`` objects, unaware of DeepSpeed)."""

from hpc_gan.models.gan import (
    CRITIC_NORMS,
    INIT_STD,
    Critic,
    Generator,
    count_parameters,
    init_weights,
    set_trainable,
    spectral_norm_buffers,
)

__all__ = [
    "CRITIC_NORMS",
    "INIT_STD",
    "Critic",
    "Generator",
    "count_parameters",
    "init_weights",
    "set_trainable",
    "spectral_norm_buffers",
]

from hpc_gan.models.build import build_critic, build_generator  # noqa: E402

__all__ += ["build_critic", "build_generator"]
