"""One WGAN-GP iteration on two DeepSpeed engines: n_critic critic steps, then a generator step.

The recipe verified on DeepSpeed 0.19.8 (DESIGN.md):

* the penalty's critic forward goes through ``critic.module`` (calling the engine there fires
  DeepSpeed's backward hooks inside ``torch.autograd.grad``);
* the critic's parameters have ``requires_grad=False`` during the generator step (otherwise
  ZeRO-2 reduces them twice);
* under fp16 the penalty's input gradient is taken on the critic output scaled by the critic's
  own loss scale and unscaled before an fp32 norm (PyTorch AMP's gradient-penalty recipe).

Losses that are not finite are never back-propagated: all ranks agree on it (one all-reduce)
and skip the step together; fp16 overflows inside DeepSpeed are skipped by DeepSpeed itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from hpc_gan.models import set_trainable
from hpc_gan.train.penalty import gradient_penalty


@dataclass
class StepResult:
    """Scalars of one iteration (this rank's values; the logger averages them over ranks)."""

    loss_critic: float
    loss_generator: float
    wasserstein: float
    penalty: float
    finite: bool


def to_model_range(batch: torch.Tensor) -> torch.Tensor:
    """Real patches as the networks see them: the dataset gives the label channel in {0, 1}, the
    generator's tanh makes both channels [-1, 1], so real labels become {-1, 1}.

    Example:
        >>> to_model_range(torch.tensor([[[0.5]], [[1.0]]]).view(1, 2, 1, 1, 1))[0, :, 0, 0, 0]
        tensor([0.5000, 1.0000])
    """
    out = batch.clone()
    out[:, 1] = out[:, 1] * 2 - 1                          # (B, 2, X, Y, Z): channel 1 is the label
    return out


def loss_scale(engine) -> float:
    """The engine's current dynamic loss scale (1.0 when not training in fp16)."""
    if not engine.fp16_enabled():
        return 1.0
    optimizer = engine.optimizer
    for name in ("loss_scale", "cur_scale"):
        value = getattr(optimizer, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return float(optimizer.loss_scaler.cur_scale)


def all_finite(*values: torch.Tensor) -> bool:
    """True on every rank iff every value is finite on every rank."""
    bad = torch.tensor([0.0 if all(torch.isfinite(v).all() for v in values) else 1.0], device=values[0].device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def critic_step(generator, critic, real: torch.Tensor, rng: torch.Generator, gp_weight: float,
                gp_mode: str, weight_clip: float = 0.0) -> tuple[dict, bool]:
    """One critic update on a real batch (B, 2, X, Y, Z) and as many generated patches."""
    set_trainable(critic.module, True)
    z = generator.module.sample_latent(real.shape[0], generator=rng, device=real.device, dtype=real.dtype)
    with torch.no_grad():
        fake = generator.module(z)                        # (B, 2, X, Y, Z)
    d_real = critic(real).float().mean()
    d_fake = critic(fake).float().mean()
    loss = d_fake - d_real
    penalty = torch.zeros((), device=real.device)
    if gp_weight > 0:
        penalty = gradient_penalty(critic.module, real, fake, gp_mode, generator=rng, scale=loss_scale(critic))
        loss = loss + gp_weight * penalty
    finite = all_finite(loss)
    if finite:
        critic.backward(loss)
        critic.step()
        if weight_clip > 0:
            with torch.no_grad():
                for p in critic.module.parameters():
                    p.clamp_(-weight_clip, weight_clip)
    else:
        critic.zero_grad()
    return {"loss_critic": loss.item(), "wasserstein": (d_real - d_fake).item(), "penalty": penalty.item()}, finite


def generator_step(generator, critic, batch_size: int, rng: torch.Generator, device, dtype) -> tuple[dict, bool]:
    """One generator update: maximise the critic's score of fresh samples."""
    set_trainable(critic.module, False)
    z = generator.module.sample_latent(batch_size, generator=rng, device=device, dtype=dtype)
    fake = generator(z)                                   # (B, 2, X, Y, Z)
    loss = -critic.module(fake).float().mean()
    finite = all_finite(loss)
    if finite:
        generator.backward(loss)
        generator.step()
    else:
        generator.zero_grad()
    set_trainable(critic.module, True)
    return {"loss_generator": loss.item()}, finite


def train_iteration(generator, critic, batches, rng: torch.Generator, n_critic: int, gp_weight: float,
                    gp_mode: str, weight_clip: float = 0.0) -> StepResult:
    """n_critic critic steps (one real batch each, from ``batches``), then one generator step."""
    finite = True
    for _ in range(n_critic):
        real = next(batches)
        scalars, ok = critic_step(generator, critic, real, rng, gp_weight, gp_mode, weight_clip)
        finite &= ok
    g_scalars, ok = generator_step(generator, critic, real.shape[0], rng, real.device, real.dtype)
    return StepResult(finite=finite and ok, **scalars, **g_scalars)
