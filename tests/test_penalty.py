"""The WGAN-GP gradient penalty (hpc_gan.train.penalty) against direct computations.

A tiny float64 critic (Conv3d + LeakyReLU + Linear on (B, 2, 8, 8, 8) patches) is differentiated
one example at a time, and the penalty is compared with the formula to 1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hpc_gan.train.penalty import gradient_penalty

pytestmark = pytest.mark.unit

SHAPE = (3, 2, 8, 8, 8)         # (B, C, X, Y, Z)


class TinyCritic(nn.Module):
    """(B, 2, 8, 8, 8) -> (B,); counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 3, 3, stride=2, padding=1)     # -> (B, 3, 4, 4, 4)
        self.linear = nn.Linear(3 * 4 * 4 * 4, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = nn.functional.leaky_relu(self.conv(x), 0.2)
        return self.linear(h.flatten(1)).squeeze(1)


@pytest.fixture
def critic() -> TinyCritic:
    torch.manual_seed(0)
    return TinyCritic().double()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    rng = torch.Generator().manual_seed(1)
    real = torch.randn(SHAPE, generator=rng, dtype=torch.float64)
    fake = torch.randn(SHAPE, generator=rng, dtype=torch.float64)
    return real, fake


def weights(seed: int, n: int) -> torch.Tensor:
    """The interpolation weights gradient_penalty draws from a generator seeded with `seed`."""
    shape = (n,) + (1,) * (len(SHAPE) - 1)
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def input_gradient(critic: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """d critic(x).sum() / dx for one example x of shape (1, C, X, Y, Z)."""
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(critic(x).sum(), x)[0]


def test_per_sample_matches_a_loop_over_examples(critic, batch):
    real, fake = batch
    penalty = gradient_penalty(critic, real, fake, "per_sample", generator=torch.Generator().manual_seed(7))
    eps = weights(7, SHAPE[0])
    x_hat = eps * real + (1 - eps) * fake
    expected = sum((input_gradient(critic, x_hat[i:i + 1]).norm() - 1) ** 2 for i in range(SHAPE[0])) / SHAPE[0]
    assert penalty.dtype == torch.float64
    assert abs(penalty.item() - expected.item()) < 1e-10


def test_batch_mode_matches_its_formula(critic, batch):
    real, fake = batch
    penalty = gradient_penalty(critic, real, fake, "batch", generator=torch.Generator().manual_seed(7))
    eps = weights(7, 1)                                      # one weight for the whole batch
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    grad = torch.autograd.grad(critic(x_hat).sum(), x_hat)[0]
    expected = (grad.norm() - 1) ** 2                        # one norm over the whole batch
    assert abs(penalty.item() - expected.item()) < 1e-10


def test_modes_differ_for_more_than_one_example(critic, batch):
    real, fake = batch
    per_sample = gradient_penalty(critic, real, fake, "per_sample", generator=torch.Generator().manual_seed(3))
    whole = gradient_penalty(critic, real, fake, "batch", generator=torch.Generator().manual_seed(3))
    assert abs(per_sample.item() - whole.item()) > 1e-3


def test_the_critic_is_called_exactly_once(critic, batch):
    gradient_penalty(critic, *batch)
    assert critic.calls == 1


def test_loss_scale_gives_the_same_penalty(critic, batch):
    real, fake = batch
    plain = gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(5))
    scaled = gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(5), scale=1024.0)
    assert torch.allclose(plain, scaled, rtol=1e-12, atol=0)


def test_half_precision_gradient_is_unscaled_in_float32(batch):
    real, fake = (t.half() for t in batch)
    critic = lambda x: (x.flatten(1) * 1e-3).sum(1)           # noqa: E731  input gradient 1e-3 everywhere
    penalty = gradient_penalty(critic, real, fake, scale=2.0 ** 12)
    assert penalty.dtype == torch.float32
    norm = math.sqrt(2 * 8 * 8 * 8) * 1e-3                    # ‖g_i‖ for every example
    assert abs(penalty.item() - (norm - 1) ** 2) < 1e-3


@pytest.mark.parametrize("scale", [math.inf, 2.0 ** 40])
def test_overflow_gives_a_non_finite_penalty(batch, scale):
    real, fake = (t.half() for t in batch)                   # fp16 overflows above 65504
    critic = lambda x: x.flatten(1).sum(1)                   # noqa: E731
    penalty = gradient_penalty(critic, real, fake, scale=scale)
    assert not torch.isfinite(penalty)


def test_penalty_is_differentiable_in_the_critic_parameters(critic, batch):
    penalty = gradient_penalty(critic, *batch, generator=torch.Generator().manual_seed(2))
    penalty.backward()
    # The final bias shifts scores but not their input gradient, so it gets none.
    assert critic.linear.bias.grad is None
    for param in (critic.conv.weight, critic.conv.bias, critic.linear.weight):
        assert param.grad is not None and torch.isfinite(param.grad).all()
    assert critic.conv.weight.grad.abs().sum() > 0 and critic.linear.weight.grad.abs().sum() > 0


def test_no_gradient_reaches_the_fake_or_real_patches(critic, batch):
    real, fake = (t.clone().requires_grad_(True) for t in batch)
    gradient_penalty(critic, real, fake).backward()
    assert real.grad is None and fake.grad is None


def test_seeded_generator_is_deterministic_and_seeds_matter(critic, batch):
    def run(seed):
        return gradient_penalty(critic, *batch, generator=torch.Generator().manual_seed(seed)).item()

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_constant_critic_has_penalty_one():
    real, fake = torch.zeros(2, 1, 4, 4, 4), torch.ones(2, 1, 4, 4, 4)
    critic = lambda x: (x * 0).flatten(1).sum(1)             # noqa: E731  zero input gradient
    assert gradient_penalty(critic, real, fake).item() == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "global"}, "mode 'global'"),
    ({"fake": torch.zeros(3, 2, 8, 8, 4)}, "differ in shape"),
    ({"scale": 0.0}, "must be > 0"),
    ({"scale": math.nan}, "must be > 0"),
])
def test_bad_arguments_raise_value_error(critic, batch, kwargs, message):
    real, fake = batch
    arguments = {"real": real, "fake": fake, **kwargs}
    with pytest.raises(ValueError, match=message):
        gradient_penalty(critic, **arguments)


def test_critic_scores_of_the_wrong_shape_raise(batch):
    with pytest.raises(ValueError, match="expected \\(3,\\)"):
        gradient_penalty(lambda x: x.flatten(1), *batch)
