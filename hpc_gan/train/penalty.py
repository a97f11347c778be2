"""The WGAN-GP gradient penalty (Gulrajani et al. 2017), per sample, with an fp16 recipe.

The penalty pulls the norm of the critic's input gradient towards 1 at points x̂ between real
and generated patches. Standard WGAN-GP draws one interpolation weight and takes one gradient
norm *per example*; the original code of Subramaniam et al. drew one weight for the whole batch
and took one norm over the whole batch's gradient. That defect is available as ``mode="batch"``
(``train.gp_mode: batch``) only to reproduce the original numbers.

Per-sample norms are read off one backward pass of ``critic(x̂).sum()``, which is exact when the
critic treats examples independently (instance norm, group norm, spectral norm, no norm), but
not with BatchNorm in the critic, which mixes examples.

fp16 (PyTorch AMP's gradient-penalty recipe): the input gradient of a half-precision critic can
underflow, so it is taken on the critic output multiplied by the critic's loss scale and divided
by it again in float32 before the norm. An overflow is not hidden: the penalty is then inf/NaN
and the caller's finiteness check skips the step (and DeepSpeed lowers the scale).

Example:
    >>> critic = lambda x: x.flatten(1).sum(1)           # (B, 2, 8, 8, 8) -> (B,)
    >>> real, fake = torch.randn(4, 2, 8, 8, 8), torch.randn(4, 2, 8, 8, 8)
    >>> gradient_penalty(critic, real, fake)              # |grad| = sqrt(1024) for every x̂
    tensor(961.)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

MODES = ("per_sample", "batch")


def gradient_penalty(
    critic: Callable[[Tensor], Tensor],
    real: Tensor,
    fake: Tensor,
    mode: str = "per_sample",
    generator: torch.Generator | None = None,
    scale: float = 1.0,
) -> Tensor:
    """Gradient penalty of ``critic`` between ``real`` and ``fake`` (multiply by λ yourself).

    Args:
        critic: maps x̂ of shape (B, C, X, Y, Z) to scores of shape (B,) or (B, 1); called
            exactly once. Under DeepSpeed pass ``critic_engine.module``, not the engine (the
            engine's hooks would fire inside ``torch.autograd.grad``).
        real: real patches, (B, C, X, Y, Z) (any shape with the batch first).
        fake: generated patches, same shape; detached here (no gradient to the generator).
        mode: ``"per_sample"`` (standard: one ε_i ~ U(0, 1) and one norm per example, penalty
            mean_i (‖g_i‖₂ − 1)²) or ``"batch"`` (the original code: one ε and one norm over
            the whole batch, penalty (‖g‖₂ − 1)²).
        generator: source of the interpolation weights, for reproducible steps; weights are
            drawn on its device and moved to ``real``'s.
        scale: the critic's loss scale under fp16 (1.0 otherwise); ``inf`` is allowed and
            yields a non-finite penalty.

    Returns:
        A scalar tensor, float32 (float64 for float64 inputs), differentiable with respect to
        the critic's parameters.

    Raises:
        ValueError: unknown ``mode``, ``real`` and ``fake`` of different shapes, a tensor
            without a batch dimension, ``scale`` not > 0, or critic scores not of shape (B,).
    """
    _check(real, fake, mode, scale)
    batch = real.shape[0]
    x_hat = _interpolate(real.detach(), fake.detach(), mode, generator)   # (B, C, X, Y, Z)
    scores = critic(x_hat)
    if scores.numel() != batch:
        raise ValueError(f"critic returned scores of shape {tuple(scores.shape)}; expected ({batch},)")
    (scaled_grad,) = torch.autograd.grad(outputs=scores.sum() * scale, inputs=x_hat, create_graph=True)
    # Upcast before unscaling: an fp16 gradient divided by 2**16 in fp16 would lose its small
    # entries. float64 stays float64.
    grad = scaled_grad.to(torch.promote_types(scaled_grad.dtype, torch.float32)) / scale
    if mode == "per_sample":
        norms = grad.reshape(batch, -1).norm(2, dim=1)                    # (B,)
        return ((norms - 1) ** 2).mean()
    return (grad.norm(2) - 1) ** 2


def _check(real: Tensor, fake: Tensor, mode: str, scale: float) -> None:
    if mode not in MODES:
        raise ValueError(f"gradient penalty mode {mode!r} is not one of {', '.join(MODES)}")
    if real.shape != fake.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} patches differ in shape")
    if real.dim() < 2 or real.shape[0] < 1:
        raise ValueError(f"patches of shape {tuple(real.shape)}: expected (B, C, X, Y, Z) with B >= 1")
    if not scale > 0:
        raise ValueError(f"loss scale {scale} must be > 0")


def _interpolate(real: Tensor, fake: Tensor, mode: str, generator: torch.Generator | None) -> Tensor:
    """x̂ = ε·real + (1 − ε)·fake with ε of shape (B, 1, 1, 1, 1) or (1, 1, 1, 1, 1) for "batch"."""
    n_weights = real.shape[0] if mode == "per_sample" else 1
    shape = (n_weights,) + (1,) * (real.dim() - 1)
    device = generator.device if generator is not None else real.device
    eps = torch.rand(shape, generator=generator, device=device, dtype=real.dtype).to(real.device)
    return (eps * real + (1 - eps) * fake).requires_grad_(True)
