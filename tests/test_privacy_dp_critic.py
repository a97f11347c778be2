"""DP-SGD critic (paper appendix B): per-sample clipping, noise, weight clipping, accounting."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("opacus")

from hpc_gan.errors import ConfigError  # noqa: E402
from hpc_gan.models.gan import Critic, Generator  # noqa: E402
from hpc_gan.privacy.accounting import epsilon  # noqa: E402
from hpc_gan.privacy.dp_critic import dp_critic_step, generator_step, make_private_critic  # noqa: E402

SHAPE = (32, 32, 16)
LATENT = 16

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::UserWarning")]


def _nets(seed: int = 0):
    torch.manual_seed(seed)
    return (Generator(latent_dim=LATENT, ngf=32, patch_shape=SHAPE, out_channels=2),
            Critic(ndf=32, patch_shape=SHAPE, norm="group"))


def _private(critic, sigma: float, clip: float):
    opt = torch.optim.Adam(critic.parameters(), lr=1e-4, betas=(0.0, 0.9))
    return make_private_critic(critic, opt, sample_rate=0.5, noise_multiplier=sigma, max_grad_norm=clip,
                               noise_generator=torch.Generator().manual_seed(2))


def _real(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 2, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _z(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, LATENT, generator=torch.Generator().manual_seed(seed))


def test_per_sample_gradients_are_clipped_before_noise():
    generator, critic = _nets()
    clip = 1e-3
    private = _private(critic, sigma=0.0, clip=clip)
    scores = private.module(torch.cat([_real(), generator(_z(4)).detach()]))
    (torch.cat([-torch.ones(4), torch.ones(4)]) * scores).sum().backward()
    params = [p for p in private.module.parameters() if p.requires_grad]
    per_sample = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params]).norm(dim=0)  # (8,)
    assert per_sample.shape == (8,)
    assert (per_sample > clip).all()                                         # clipping will bite
    private.optimizer.step()                                                 # clip, sum, (no) noise
    summed = torch.stack([p.grad.norm() for p in params]).norm()
    assert summed <= 8 * clip * (1 + 1e-5)
    assert summed > 0


def test_noise_changes_the_update():
    def update(sigma: float) -> torch.Tensor:
        generator, critic = _nets()
        private = _private(critic, sigma=sigma, clip=1.0)
        before = torch.cat([p.detach().flatten().clone() for p in private.module.parameters()])
        dp_critic_step(generator, private, _real(), _z(4), 0.0)
        return torch.cat([p.detach().flatten() for p in private.module.parameters()]) - before

    quiet, again, noisy = update(0.0), update(0.0), update(1.0)
    assert torch.equal(quiet, again)                                          # deterministic without noise
    assert not torch.allclose(quiet, noisy)


def test_weight_clipping_and_epsilon_grow():
    generator, critic = _nets()
    private = _private(critic, sigma=0.5, clip=1.0)
    g_opt = torch.optim.Adam(generator.parameters(), lr=1e-4, betas=(0.0, 0.9))
    eps = []
    for step in range(2):
        dp_critic_step(generator, private, _real(2), _z(2, step), 0.01)
        generator_step(generator, g_opt, private, _z(2, 10 + step))
        eps.append(private.epsilon(1 / 8))
    assert all(p.abs().max() <= 0.01 for p in private.module.parameters())
    assert 0 < eps[0] < eps[1]
    assert private.steps == 2
    assert eps[1] == pytest.approx(epsilon(0.5, 0.5, 2, 1 / 8))


def test_an_empty_poisson_batch_still_steps():
    generator, critic = _nets()
    private = _private(critic, sigma=0.5, clip=1.0)
    before = torch.cat([p.detach().flatten().clone() for p in private.module.parameters()])
    stats = dp_critic_step(generator, private, torch.zeros(0, 2, *SHAPE), _z(1), 0.0)
    assert stats["n_real"] == 0 and stats["n_fake"] == 1 and private.steps == 1
    assert not torch.equal(before, torch.cat([p.detach().flatten() for p in private.module.parameters()]))


def test_the_plain_critic_is_reachable_for_checkpoints():
    _, critic = _nets()
    private = _private(critic, sigma=0.5, clip=1.0)
    assert private.critic is critic


def test_batchnorm_critic_and_bad_values_are_refused():
    critic = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.BatchNorm3d(4))
    with pytest.raises(ConfigError, match="critic_norm=group"):
        _private(critic, 0.5, 1.0)
    _, critic = _nets()
    opt = torch.optim.Adam(critic.parameters())
    with pytest.raises(ConfigError, match="noise_multiplier"):
        make_private_critic(critic, opt, 0.5, -1.0, 1.0)
    with pytest.raises(ConfigError, match="max_grad_norm"):
        make_private_critic(critic, opt, 0.5, 1.0, 0.0)
    with pytest.raises(ConfigError, match="sampling rate"):
        make_private_critic(critic, opt, 1.5, 1.0, 1.0)
