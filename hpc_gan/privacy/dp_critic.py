"""DP-SGD on the critic, the paper's appendix B recipe, single process.

The critic is the only network that reads real patches, so only its optimiser steps spend
privacy; the generator learns from the critic's (already private) parameters and is
post-processing. The recipe (DESIGN.md, configs/variants/dp.yaml):

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

Multi-process (DPDDP) training is not implemented: :func:`train_dp` refuses ``world_size > 1``.

Example:
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> critic = Critic(ndf=32, patch_shape=(32, 32, 16), norm="group")
    >>> opt = torch.optim.Adam(critic.parameters(), lr=1e-4, betas=(0.0, 0.9))
    >>> loader = DataLoader(TensorDataset(torch.rand(8, 2, 32, 32, 16)), batch_size=2)
    >>> private = make_private_critic(critic, opt, loader, noise_multiplier=0.5, max_grad_norm=1.0)
    >>> private.sample_rate
    0.25
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from hpc_gan.errors import ConfigError
from hpc_gan.models.gan import Critic  # noqa: F401  (doctest)
from hpc_gan.privacy.accounting import default_delta, epsilon, noise_for_epsilon
from hpc_gan.train.steps import set_trainable, to_model_range

__all__ = ["PrivateCritic", "make_private_critic", "dp_critic_step", "generator_step", "clip_weights", "train_dp"]


@dataclass
class PrivateCritic:
    """A critic wrapped by Opacus, with its DP optimiser, Poisson loader and accountant.

    Attributes:
        module: the ``GradSampleModule`` around the critic (call it like the critic).
        optimizer: Opacus' ``DPOptimizer`` (clips per sample, adds noise in ``step()``).
        data_loader: Opacus' ``DPDataLoader`` (Poisson sampling when asked for).
        engine: the ``PrivacyEngine`` whose RDP accountant counts every optimiser step.
        noise_multiplier, max_grad_norm, sample_rate: the DP-SGD parameters in force.
    """

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data_loader: DataLoader
    engine: object
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    _batches: Iterator | None = field(default=None, repr=False)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first step)."""
        steps = sum(n for _, _, n in self.engine.accountant.history)
        return epsilon(self.noise_multiplier, self.sample_rate, steps, delta)

    @property
    def steps(self) -> int:
        """Noisy optimiser steps taken so far (what the accountant charges)."""
        return sum(n for _, _, n in self.engine.accountant.history)

    def next_batch(self) -> torch.Tensor:
        """The next Poisson-sampled batch of real patches (new epoch when one ends); may be empty."""
        while True:
            if self._batches is None:
                self._batches = iter(self.data_loader)
            try:
                batch = next(self._batches)
            except StopIteration:
                self._batches = None
                continue
            return batch[0] if isinstance(batch, (list, tuple)) else batch


def make_private_critic(critic: torch.nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader,
                        noise_multiplier: float, max_grad_norm: float, poisson: bool = True,
                        noise_generator: torch.Generator | None = None) -> PrivateCritic:
    """Wrap ``critic``, its ``optimizer`` and the real-data ``data_loader`` for DP-SGD (Opacus).

    Args:
        critic: a plain critic, e.g. ``Critic(ndf=32, patch_shape=(32, 32, 16), norm="group")``;
            no BatchNorm or spectral norm (Opacus cannot compute their per-sample gradients).
        optimizer: the critic's optimiser (the paper: Adam lr 1e-4, betas (0, 0.9)).
        data_loader: a ``torch.utils.data.DataLoader`` of real patches; its batch size over its
            dataset's length sets the sampling rate.
        noise_multiplier: sigma (>= 0; 0 clips without noise and gives no privacy).
        max_grad_norm: per-sample clip norm C (> 0).
        poisson: Poisson sampling (what the RDP accountant assumes); False keeps the loader's
            fixed-size batches (the accountant's epsilon is then only an approximation).
        noise_generator: seeded generator for the noise (tests); ``None`` = Opacus' default.

    Returns:
        A :class:`PrivateCritic`.

    Raises:
        ConfigError: a layer Opacus cannot handle (the message lists them) or a bad value.
    """
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    if noise_multiplier < 0:
        raise ConfigError(f"privacy.noise_multiplier must be >= 0, got {noise_multiplier}")
    if not max_grad_norm > 0:
        raise ConfigError(f"privacy.max_grad_norm must be > 0, got {max_grad_norm}")
    errors = ModuleValidator.validate(critic, strict=False)
    if errors:
        raise ConfigError(
            "the critic has layers Opacus cannot train privately: "
            + "; ".join(str(e) for e in errors) + " — use model.critic_norm=group"
        )
    engine = PrivacyEngine(accountant="rdp")
    module, dp_optimizer, dp_loader = engine.make_private(
        module=critic, optimizer=optimizer, data_loader=data_loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=poisson, loss_reduction="sum",
        noise_generator=noise_generator,
    )
    sample_rate = data_loader.batch_size / len(data_loader.dataset)
    return PrivateCritic(module, dp_optimizer, dp_loader, engine, float(noise_multiplier), float(max_grad_norm),
                         sample_rate)


def clip_weights(module: torch.nn.Module, clip: float) -> None:
    """WGAN weight clipping: every parameter of ``module`` into ``[-clip, clip]`` (0 = off)."""
    if clip > 0:
        with torch.no_grad():
            for p in module.parameters():
                p.clamp_(-clip, clip)


def dp_critic_step(generator: torch.nn.Module, critic: PrivateCritic, real: torch.Tensor, latent_dim: int,
                   rng: torch.Generator, weight_clip: float) -> dict:
    """One DP-SGD step of the critic on a real batch and as many fakes (at least one).

    Args:
        generator: the plain generator (not trained here; run without gradients).
        critic: from :func:`make_private_critic`.
        real: (b, 2, X, Y, Z) real patches in the model's range (b may be 0 under Poisson sampling).
        latent_dim: size of z.
        rng: generator for the latents.
        weight_clip: clip critic weights to +-this after the step (0 = off).

    Returns:
        ``{"loss_critic", "wasserstein"}`` floats (W estimate: mean D(real) - mean D(fake)).
    """
    device = next(critic.module.parameters()).device
    set_trainable(critic.module, True)
    n_fake = max(real.shape[0], 1)
    z = torch.randn(n_fake, latent_dim, generator=rng).to(device)
    with torch.no_grad():
        fake = generator(z)                                    # (b', 2, X, Y, Z)
    real = real.to(device)
    scores = critic.module(torch.cat([real, fake]))            # (b + b',)
    sign = torch.cat([-torch.ones(real.shape[0], device=device), torch.ones(n_fake, device=device)])
    critic.optimizer.zero_grad(set_to_none=True)
    (sign * scores).sum().backward()                           # per sample: -D(real_i), +D(fake_i)
    critic.optimizer.step()
    clip_weights(critic.module, weight_clip)
    d_real = scores[: real.shape[0]].mean().item() if real.shape[0] else 0.0
    d_fake = scores[real.shape[0]:].mean().item()
    return {"loss_critic": d_fake - d_real, "wasserstein": d_real - d_fake}


def generator_step(generator: torch.nn.Module, g_optimizer: torch.optim.Optimizer, critic: PrivateCritic,
                   batch_size: int, latent_dim: int, rng: torch.Generator) -> float:
    """One plain (non-private) generator step: minimise ``-mean D(G(z))``; returns that loss.

    The critic's parameters are frozen and Opacus' per-sample hooks disabled meanwhile (with
    frozen parameters alone, its backward hook still fires and finds no stored activations).
    """
    device = next(generator.parameters()).device
    set_trainable(critic.module, False)
    critic.module.disable_hooks()
    try:
        z = torch.randn(batch_size, latent_dim, generator=rng).to(device)
        loss = -critic.module(generator(z)).mean()
        g_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        g_optimizer.step()
    finally:
        critic.module.enable_hooks()
        set_trainable(critic.module, True)
    return loss.item()


class _RealPatches(Dataset):
    """Real patches in the model's range (label channel {0, 1} -> {-1, 1})."""

    def __init__(self, patches: Dataset) -> None:
        self.patches = patches

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_model_range(self.patches[index][None])[0]


def _betas(train) -> tuple[float, float]:
    return float(train.betas[0]), float(train.betas[1])


def _plan_noise(cfg, sample_rate: float, critic_steps: int, delta: float) -> float:
    if cfg.privacy.target_epsilon > 0:
        return noise_for_epsilon(cfg.privacy.target_epsilon, sample_rate, critic_steps, delta)
    return cfg.privacy.noise_multiplier


def train_dp(cfg, env, dataset: Dataset | None = None, log=print) -> list[dict]:
    """Train generator + DP critic of a run config in one process; returns the metrics records.

    Each generator step takes ``cfg.train.n_critic`` DP critic steps. The run is
    ``cfg.train.max_steps`` generator steps, or ``epochs`` passes at ``n_critic`` Poisson batches
    per generator step. Records (one per ``log_every`` generator steps and the last) hold the
    losses, ``epsilon`` at ``delta`` and the critic steps taken; they are also appended to
    ``<run_dir>/metrics.jsonl``.

    Args:
        cfg: a validated ``RunConfig`` with ``privacy.enabled`` and ``model.critic_norm="group"``.
        env: the ``DistEnv``; only ``world_size == 1`` is supported.
        dataset: real patches (default: ``ShardedPatchDataset(cfg.data.root, cfg.data.split)``).
        log: where progress lines go.

    Raises:
        ConfigError: privacy disabled, gradient penalty on, several processes, or an
            Opacus-incompatible critic.
    """
    from hpc_gan.models.build import build_critic, build_generator
    from hpc_gan.models.gan import init_weights

    if not cfg.privacy.enabled:
        raise ConfigError("train_dp needs privacy.enabled=true (use the dp variant)")
    if cfg.train.gp_weight > 0:
        raise ConfigError("train.gp_weight must be 0 for DP training (weight clipping replaces the penalty)")
    if env.world_size > 1:
        raise ConfigError(
            f"DP training runs in one process only (world size {env.world_size}); multi-process DPDDP "
            "is not implemented — launch with one task"
        )
    if dataset is None:
        from hpc_gan.data.dataset import ShardedPatchDataset

        dataset = ShardedPatchDataset(cfg.data.root, cfg.data.split, verify=cfg.data.verify)
    t = cfg.train
    torch.manual_seed(t.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seeded = torch.Generator().manual_seed(t.seed)
    generator = init_weights(build_generator(cfg.model), seeded).to(device)
    critic = init_weights(build_critic(cfg.model), seeded).to(device)
    n = len(dataset)
    sample_rate = t.batch_size / n
    delta = cfg.privacy.delta or default_delta(n)
    steps_per_epoch = max(n // t.batch_size // t.n_critic, 1)
    total = t.max_steps or t.epochs * steps_per_epoch
    sigma = _plan_noise(cfg, sample_rate, total * t.n_critic, delta)
    loader = DataLoader(_RealPatches(dataset), batch_size=t.batch_size, num_workers=0,
                        generator=torch.Generator().manual_seed(t.seed))
    private = make_private_critic(
        critic, torch.optim.Adam(critic.parameters(), lr=t.lr_critic, betas=_betas(t)), loader,
        noise_multiplier=sigma, max_grad_norm=cfg.privacy.max_grad_norm,
        noise_generator=torch.Generator(device=device).manual_seed(t.seed + 1),
    )
    g_opt = torch.optim.Adam(generator.parameters(), lr=t.lr_generator, betas=_betas(t))
    log(f"dp: {total} generator steps x {t.n_critic} critic steps, n={n}, q={sample_rate:.4g}, "
        f"sigma={sigma:.4g}, C={cfg.privacy.max_grad_norm}, delta={delta:.3g}, planned epsilon="
        f"{epsilon(sigma, sample_rate, total * t.n_critic, delta):.4g}")
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    start = time.perf_counter()
    for step in range(1, total + 1):
        critic_stats = [dp_critic_step(generator, private, private.next_batch(), cfg.model.latent_dim, seeded,
                                       t.weight_clip) for _ in range(t.n_critic)]
        loss_g = generator_step(generator, g_opt, private, t.batch_size, cfg.model.latent_dim, seeded)
        if step % t.log_every == 0 or step == total:
            record = {
                "step": step, "critic_steps": private.steps,
                "loss_critic": sum(s["loss_critic"] for s in critic_stats) / t.n_critic,
                "wasserstein": sum(s["wasserstein"] for s in critic_stats) / t.n_critic,
                "loss_generator": loss_g, "epsilon": private.epsilon(delta), "delta": delta,
                "noise_multiplier": sigma, "elapsed_s": time.perf_counter() - start,
            }
            if not all(math.isfinite(v) for v in (record["loss_critic"], loss_g)):
                raise FloatingPointError(f"non-finite loss at generator step {step}: {record}")
            records.append(record)
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            log(f"dp step {step}/{total}: W={record['wasserstein']:.4g} loss_g={loss_g:.4g} "
                f"epsilon={record['epsilon']:.4g}")
    return records
