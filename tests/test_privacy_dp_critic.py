"""DP-SGD critic (paper appendix B): per-sample clipping, noise, weight clipping, accounting."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("opacus")

from hpc_gan.config import DataConfig, ModelConfig, PrivacyConfig, RunConfig, TrainConfig  # noqa: E402
from hpc_gan.dist import DistEnv  # noqa: E402
from hpc_gan.errors import ConfigError  # noqa: E402
from hpc_gan.models.gan import Critic, Generator  # noqa: E402
from hpc_gan.privacy.accounting import epsilon  # noqa: E402
from hpc_gan.privacy.dp_critic import dp_critic_step, generator_step, make_private_critic, train_dp  # noqa: E402

SHAPE = (32, 32, 16)
LATENT = 16
SINGLE = DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, "single")

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::UserWarning")]


def _nets(seed: int = 0):
    torch.manual_seed(seed)
    return (Generator(latent_dim=LATENT, ngf=32, patch_shape=SHAPE, out_channels=2),
            Critic(ndf=32, patch_shape=SHAPE, norm="group"))


def _private(critic, sigma: float, clip: float, poisson: bool = False):
    data = torch.rand(8, 2, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    opt = torch.optim.Adam(critic.parameters(), lr=1e-4, betas=(0.0, 0.9))
    return make_private_critic(critic, opt, DataLoader(TensorDataset(data), batch_size=4), sigma, clip,
                               poisson=poisson, noise_generator=torch.Generator().manual_seed(2))


def test_per_sample_gradients_are_clipped_before_noise():
    generator, critic = _nets()
    clip = 1e-3
    private = _private(critic, sigma=0.0, clip=clip)
    real = private.next_batch()                                              # (4, 2, 32, 32, 16)
    scores = private.module(torch.cat([real, generator(torch.randn(4, LATENT)).detach()]))
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
        dp_critic_step(generator, private, private.next_batch(), LATENT, torch.Generator().manual_seed(3), 0.0)
        return torch.cat([p.detach().flatten() for p in private.module.parameters()]) - before

    quiet, again, noisy = update(0.0), update(0.0), update(1.0)
    assert torch.equal(quiet, again)                                          # deterministic without noise
    assert not torch.allclose(quiet, noisy)


def test_weight_clipping_and_epsilon_grow():
    generator, critic = _nets()
    private = _private(critic, sigma=0.5, clip=1.0, poisson=True)
    g_opt = torch.optim.Adam(generator.parameters(), lr=1e-4, betas=(0.0, 0.9))
    rng = torch.Generator().manual_seed(0)
    eps = []
    for _ in range(2):
        dp_critic_step(generator, private, private.next_batch(), LATENT, rng, 0.01)
        generator_step(generator, g_opt, private, 2, LATENT, rng)
        eps.append(private.epsilon(1 / 8))
    assert all(p.abs().max() <= 0.01 for p in private.module.parameters())
    assert 0 < eps[0] < eps[1]
    assert private.steps == 2
    assert eps[1] == pytest.approx(epsilon(0.5, 0.5, 2, 1 / 8))


def test_batchnorm_critic_is_refused():
    critic = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.BatchNorm3d(4))
    with pytest.raises(ConfigError, match="critic_norm=group"):
        _private(critic, 0.5, 1.0)


def _cfg(root, tmp_path, **privacy) -> RunConfig:
    return RunConfig(
        name="dp", variant="dp", output_root=str(tmp_path),
        model=ModelConfig(latent_dim=LATENT, ngf=32, ndf=32, patch_shape=SHAPE, critic_norm="group"),
        train=TrainConfig(batch_size=2, max_steps=2, n_critic=5, lr_critic=1e-4, lr_generator=1e-4,
                          gp_weight=0.0, weight_clip=0.01, log_every=1, num_workers=0),
        data=DataConfig(root=str(root), verify="none"),
        privacy=PrivacyConfig(enabled=True, **privacy),
    )


def test_train_dp_reports_growing_epsilon(smoke_shards, tmp_path):
    cfg = _cfg(smoke_shards, tmp_path, noise_multiplier=0.5, max_grad_norm=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = train_dp(cfg, SINGLE, log=lambda _: None)
    assert [r["critic_steps"] for r in records] == [5, 10]
    assert 0 < records[0]["epsilon"] < records[1]["epsilon"]
    assert (cfg.run_dir / "metrics.jsonl").read_text().count("\n") == 2


def test_train_dp_refuses_what_it_cannot_do(smoke_shards, tmp_path):
    with pytest.raises(ConfigError, match="one process"):
        train_dp(_cfg(smoke_shards, tmp_path), DistEnv(0, 2, 0, 2, "127.0.0.1", 29500, "torchrun"))
    cfg = _cfg(smoke_shards, tmp_path)
    cfg.train.gp_weight = 10.0
    with pytest.raises(ConfigError, match="gp_weight"):
        train_dp(cfg, SINGLE)
