"""DP-SGD on the critic, the paper's appendix B recipe: wrapping and the two steps.

The critic is the only network that reads real patches, so only its optimiser steps spend
privacy; the generator learns from the critic's (already private) parameters and is
post-processing. The recipe (DESIGN.md, hpc_gan/configs/variants/dp.yaml):

* GroupNorm critic (Opacus computes per-sample gradients for neither BatchNorm nor spectral norm);
* no gradient penalty (Opacus' hooks miss its second-order term): WGAN weight clipping to
  ``+-train.weight_clip`` (0.01) after every critic step instead;
* ``train.n_critic`` (5) critic steps per generator step, Adam (0, 0.9), lr 1e-4 for both;
* per-sample clipping to ``privacy.max_grad_norm`` and Gaussian noise ``sigma * max_grad_norm``
  on the summed clipped gradients, Poisson sampling at rate ``batch_size / n``.

Loss and per-sample gradients: one critic forward on ``cat([real, fake])`` with the per-sample
loss ``+D(fake_i)`` / ``-D(real_i)`` and ``loss_reduction="sum"``, so each sample's gradient is
clipped on its own. Fakes are clipped too (harmless: they carry no private data). The summed,
noised gradient is not divided by the batch size; Adam is invariant to that constant scale.

Several processes (Opacus' DPDDP route): every rank holds the whole critic (broadcast from rank
0 at the start), clips its own samples' gradients, the clipped sums are all-reduced and rank 0
alone adds the noise (``DistributedDPOptimizer``) — one noisy step on the union of the ranks'
Poisson samples, the same privacy as one process at the same global sampling rate.
:class:`~hpc_gan.train.dp_trainer.DPTrainer` runs the whole recipe; this module holds its steps.

Example:
    >>> critic = Critic(ndf=32, patch_shape=(32, 32, 16), norm="group")
    >>> opt = torch.optim.Adam(critic.parameters(), lr=1e-4, betas=(0.0, 0.9))
    >>> private = make_private_critic(critic, opt, sample_rate=0.25, noise_multiplier=0.5, max_grad_norm=1.0)
    >>> private.epsilon(delta=1e-3)
    0.0
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hpc_gan.errors import ConfigError
from hpc_gan.models.gan import Critic  # noqa: F401  (doctest)
from hpc_gan.privacy.accounting import epsilon
from hpc_gan.models import set_trainable

__all__ = ["PrivateCritic", "make_private_critic", "dp_critic_step", "generator_step", "clip_weights"]


@dataclass
class PrivateCritic:
    """A critic wrapped by Opacus, with its DP optimiser and the DP-SGD parameters in force.

    Attributes:
        module: the ``GradSampleModule`` around the critic (call it like the critic).
        optimizer: Opacus' ``DPOptimizer`` (clips per sample, adds noise in ``step()``), or
            ``DistributedDPOptimizer`` under several processes (noise on rank 0 only).
        noise_multiplier, max_grad_norm, sample_rate: sigma, C and the global Poisson rate q.
        steps: noisy optimiser steps taken so far (what the accountant charges).
    """

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int = 0

    @property
    def critic(self) -> torch.nn.Module:
        """The plain critic inside the Opacus (and DPDDP) wrappers: what checkpoints store."""
        inner = self.module._module
        return getattr(inner, "module", inner) if _is_dpddp(inner) else inner

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (RDP accountant; 0 before the first step)."""
        return epsilon(self.noise_multiplier, self.sample_rate, self.steps, delta)


def _is_dpddp(module: torch.nn.Module) -> bool:
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    return isinstance(module, DPDDP)


def make_private_critic(critic: torch.nn.Module, optimizer: torch.optim.Optimizer, sample_rate: float,
                        noise_multiplier: float, max_grad_norm: float, distributed: bool = False,
                        noise_generator: torch.Generator | None = None) -> PrivateCritic:
    """Wrap ``critic`` and its ``optimizer`` for DP-SGD with Opacus.

    Args:
        critic: a plain critic, e.g. ``Critic(ndf=32, patch_shape=(32, 32, 16), norm="group")``;
            no BatchNorm or spectral norm (Opacus cannot compute their per-sample gradients).
        optimizer: the critic's optimiser (the paper: Adam lr 1e-4, betas (0, 0.9)).
        sample_rate: the global Poisson sampling rate q (expected batch over all ranks / N), for the
            accountant.
        noise_multiplier: sigma (>= 0; 0 clips without noise and gives no privacy).
        max_grad_norm: per-sample clip norm C (> 0).
        distributed: several processes (torch.distributed initialised): DPDDP + noise on rank 0.
        noise_generator: seeded generator for the noise; ``None`` = Opacus' default.

    Returns:
        A :class:`PrivateCritic`.

    Raises:
        ConfigError: a layer Opacus cannot handle (the message lists them) or a bad value.
    """
    from opacus import GradSampleModule
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
    from opacus.validators import ModuleValidator

    if noise_multiplier < 0:
        raise ConfigError(f"privacy.noise_multiplier must be >= 0, got {noise_multiplier}")
    if not max_grad_norm > 0:
        raise ConfigError(f"privacy.max_grad_norm must be > 0, got {max_grad_norm}")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"the Poisson sampling rate must be in (0, 1], got {float(sample_rate)!r}: lower "
                          "train.batch_size or the number of ranks, or add training patches")
    errors = ModuleValidator.validate(critic, strict=False)
    if errors:
        raise ConfigError(
            "the critic has layers Opacus cannot train privately: "
            + "; ".join(str(e) for e in errors) + " — use model.critic_norm=group"
        )
    if distributed:
        critic = DPDDP(critic)  # broadcasts rank 0's weights
    module = GradSampleModule(critic, batch_first=True, loss_reduction="sum")
    optimizer_class = DistributedDPOptimizer if distributed else DPOptimizer
    dp_optimizer = optimizer_class(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                   expected_batch_size=None, loss_reduction="sum", generator=noise_generator)
    return PrivateCritic(module, dp_optimizer, float(noise_multiplier), float(max_grad_norm), float(sample_rate))


def clip_weights(module: torch.nn.Module, clip: float) -> None:
    """WGAN weight clipping: every parameter of ``module`` into ``[-clip, clip]`` (0 = off)."""
    if clip > 0:
        with torch.no_grad():
            for p in module.parameters():
                p.clamp_(-clip, clip)


def dp_critic_step(generator: torch.nn.Module, critic: PrivateCritic, real: torch.Tensor, z: torch.Tensor,
                   weight_clip: float) -> dict:
    """One DP-SGD step of the critic on this rank's real batch and as many fakes (at least one).

    Args:
        generator: the plain generator (not trained here; run without gradients).
        critic: from :func:`make_private_critic`.
        real: (b, 2, X, Y, Z) real patches in the model's range (b may be 0 under Poisson sampling).
        z: (max(b, 1), latent_dim) latents of the fakes.
        weight_clip: clip critic weights to +-this after the step (0 = off).

    Returns:
        This rank's critic scores as sums and counts, ``{"d_real", "n_real", "d_fake", "n_fake"}``
        (a Poisson batch may hold no real patch; the caller averages over steps and ranks).
    """
    device = z.device
    set_trainable(critic.module, True)
    with torch.no_grad():
        fake = generator(z)                                    # (b', 2, X, Y, Z)
    real = real.to(device)
    scores = critic.module(torch.cat([real, fake]))            # (b + b',)
    sign = torch.cat([-torch.ones(real.shape[0], device=device), torch.ones(fake.shape[0], device=device)])
    critic.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # Opacus' hooks on the first layer, whose input needs no gradient
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        (sign * scores).sum().backward()                       # per sample: -D(real_i), +D(fake_i)
    critic.optimizer.step()                                    # clip each, sum (over ranks), noise once
    critic.steps += 1
    clip_weights(critic.module, weight_clip)
    scores = scores.detach()
    return {"d_real": scores[: real.shape[0]].sum().item(), "n_real": real.shape[0],
            "d_fake": scores[real.shape[0]:].sum().item(), "n_fake": fake.shape[0]}


def generator_step(generator: torch.nn.Module, g_optimizer: torch.optim.Optimizer, critic: PrivateCritic,
                   z: torch.Tensor) -> torch.Tensor:
    """One plain (non-private) generator step: minimise ``-mean D(G(z))``; returns that loss.

    Under several processes the generator's gradients are averaged over ranks, so every rank
    keeps the same weights. The critic's parameters are frozen and Opacus' per-sample hooks
    disabled meanwhile (with frozen parameters alone, its backward hook still fires and finds no
    stored activations).
    """
    set_trainable(critic.module, False)
    critic.module.disable_hooks()
    try:
        loss = -critic.module(generator(z)).mean()
        g_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from opacus.distributed import average_gradients

            average_gradients(generator)
        g_optimizer.step()
    finally:
        critic.module.enable_hooks()
        set_trainable(critic.module, True)
    return loss.detach()
