"""The dp variant's trainer: a DP-SGD critic (Opacus; DPDDP across ranks) and a plain generator.

It shares the run directory, the step loop, metrics, stop/requeue handling and the checkpoint
markers with the DeepSpeed trainer (:class:`hpc_gan.train.trainer.TrainingLoop`), so
``python -m hpc_gan.train``, ``launch/submit.py --variant dp``, ``launch/status.py``,
``hpc_gan consolidate`` and ``hpc_gan sample`` work on it unchanged. What differs:

* **No DeepSpeed.** DP-SGD needs each sample's gradient; DeepSpeed's engines (ZeRO, fp16/bf16
  loss scaling) compute only the batch's. The route is Opacus' data parallel one: every rank
  holds both whole networks in fp32, the critic's clipped per-sample gradient sums are
  all-reduced and rank 0 adds the noise once; the generator's gradients are averaged.
  :meth:`hpc_gan.config.RunConfig.validate` refuses the DeepSpeed-only settings with one line.
* **Poisson sampling.** For critic step k every patch is in the global batch with probability
  ``q = train.batch_size * world_size / N`` (one draw seeded by ``(sampling seed, k)``, the same
  on every rank); rank r reads the selected patches whose index is r modulo the world size. The
  global batch is therefore independent of the number of ranks, and a resumed run draws the
  same batches as an uninterrupted one.
* **Secret seeds.** The noise and sampling seeds come from the operating system (rank 0, then
  broadcast) and are stored only in checkpoints, never in config.yaml or the consolidated file:
  whoever knows them can recompute the noise. ``privacy.secret_seeds=false`` derives them from
  ``train.seed`` for reproducible test runs.
* **Accounting.** ``epsilon`` at ``delta`` (default 1/N) for the critic steps taken is in every
  metrics record, in each checkpoint's ``state.json`` and in the consolidated generator, from
  which sampling and evaluation carry it into the samples' manifest and the evaluation report.
  With ``privacy.target_epsilon`` > 0, sigma is chosen so that the whole run spends that epsilon.
* **Checkpoints.** The same :class:`~hpc_gan.train.checkpointer.Checkpointer` as the DeepSpeed
  trainer, with these parts instead of the engines (rank 0 writes them; every rank holds the
  same): ``dp_generator`` and ``dp_critic`` (network, Adam state; the critic also its
  accountant's step count), ``dp_noise`` (the noise RNG and the secret sampling seed, never in
  state.json) and ``data`` (the Poisson sampler's cursor: the next critic step's draw).

Example:
    >>> cfg = load_config("dp", profile="smoke", overrides=["data.root=demo_out/shards"])
    >>> DPTrainer(cfg, hpc_gan.dist.detect()).fit()     # under torchrun / srun / mpiexec
"""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from hpc_gan import dist as hdist
from hpc_gan.config import RunConfig
from hpc_gan.errors import CheckpointError, ConfigError
from hpc_gan.models import build_critic, build_generator, count_parameters
from hpc_gan.privacy.accounting import default_delta, epsilon, noise_for_epsilon
from hpc_gan.privacy.dp_critic import dp_critic_step, generator_step, make_private_critic
from hpc_gan.train.checkpointer import JSON, SHARED, Checkpointer
from hpc_gan.train.steps import StepResult, all_finite, to_model_range
from hpc_gan.train.trainer import TrainingLoop


class PoissonBatches:
    """Batch sampler: this rank's share of the Poisson sample of each critic step.

    Example:
        >>> batches = iter(PoissonBatches(n=10, rate=0.5, rank=1, world_size=2, seed=0))
        >>> all(i % 2 == 1 for i in next(batches))
        True
    """

    def __init__(self, n: int, rate: float, rank: int, world_size: int, seed: int, start: int = 0) -> None:
        self.n, self.rate, self.rank, self.world_size, self.seed, self.start = n, rate, rank, world_size, seed, start

    def global_sample(self, step: int) -> torch.Tensor:
        """Indices in the batch of critic step ``step``, over all ranks (each patch with probability q)."""
        seed = int(np.random.SeedSequence([self.seed, step]).generate_state(1)[0])
        mask = torch.rand(self.n, generator=torch.Generator().manual_seed(seed)) < self.rate
        return mask.nonzero().flatten()

    def __iter__(self):
        step = self.start
        while True:
            chosen = self.global_sample(step)
            yield chosen[chosen % self.world_size == self.rank].tolist()
            step += 1


def _seeds(train_seed: int, secret: bool) -> tuple[int, int]:
    """(noise seed, Poisson sampling seed): from the OS on rank 0 and shared with every rank, or,
    for reproducible test runs, derived from ``train.seed`` (which config.yaml publishes)."""
    if not secret:
        return train_seed * 1_000_003 + 999_983, train_seed
    seeds = [secrets.randbits(63), secrets.randbits(63)]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(seeds, src=0)
    return seeds[0], seeds[1]


class _Stack:
    """Collate possibly empty batches of (2, X, Y, Z) patches into (b, 2, X, Y, Z)."""

    def __init__(self, patch_shape: tuple[int, int, int]) -> None:
        self.patch_shape = patch_shape

    def __call__(self, items: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(items) if items else torch.zeros((0, 2, *self.patch_shape))


class DPTrainer(TrainingLoop):
    """Trains the dp variant (``privacy.enabled``); ``fit()`` returns the last metrics record (rank 0)."""

    label = " (DP-SGD critic, Opacus, no DeepSpeed)"
    dp_sgd = True

    def __init__(self, cfg: RunConfig, env: hdist.DistEnv, run_dir: Path | None = None) -> None:
        cfg.validate()
        super().__init__(cfg, env, run_dir)
        t, p = cfg.train, cfg.privacy
        self.precision = "fp32"
        n = len(self.dataset)
        self.sample_rate = t.batch_size * env.world_size / n
        if self.sample_rate > 1:
            raise ConfigError(f"train.batch_size={t.batch_size} x {env.world_size} ranks exceeds the {n} training "
                              "patches (Poisson sampling rate > 1); lower train.batch_size or the number of ranks")
        self.delta = p.delta or default_delta(n)
        steps_per_epoch = max(n // (t.batch_size * env.world_size * t.n_critic), 1)
        self.total_steps = t.max_steps or t.epochs * steps_per_epoch
        planned = self.total_steps * t.n_critic
        self.sigma = (noise_for_epsilon(p.target_epsilon, self.sample_rate, planned, self.delta)
                      if p.target_epsilon > 0 else p.noise_multiplier)
        self.planned_epsilon = epsilon(self.sigma, self.sample_rate, planned, self.delta)

        torch.manual_seed(t.seed)  # identical initial weights on all ranks (DPDDP also broadcasts the critic)
        self.generator = build_generator(cfg.model).to(self.device)
        critic = build_critic(cfg.model).to(self.device)
        self.parameters = {"generator": count_parameters(self.generator), "critic": count_parameters(critic)}
        self.g_optimizer = torch.optim.Adam(self.generator.parameters(), lr=t.lr_generator, betas=t.betas)
        c_optimizer = torch.optim.Adam(critic.parameters(), lr=t.lr_critic, betas=t.betas)
        # Only rank 0 draws noise (DistributedDPOptimizer); its state and the sampling seed are checkpointed.
        noise_seed, self.sampling_seed = _seeds(t.seed, p.secret_seeds)
        self.noise_rng = torch.Generator(device=self.device).manual_seed(noise_seed)
        self.private = make_private_critic(critic, c_optimizer, self.sample_rate, self.sigma, p.max_grad_norm,
                                           distributed=env.world_size > 1, noise_generator=self.noise_rng)
        self.cursor = PoissonCursor(self.private)

    # ------------------------------------------------------------------ the loop's parts

    @property
    def generator_module(self) -> torch.nn.Module:
        return self.generator

    def _checked_modules(self) -> dict[str, torch.nn.Module]:
        return {"generator": self.generator, "critic": self.private.critic}

    @property
    def epoch(self) -> int:
        """Expected passes over the data so far (q x critic steps)."""
        return int(self.private.steps * self.sample_rate)

    def _real_batches(self):  # starts at the cursor that resume() restored
        sampler = PoissonBatches(len(self.dataset), self.sample_rate, self.env.rank, self.env.world_size,
                                 self.sampling_seed, start=self.cursor.next_draw)
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=_Stack(self.dataset.patch_shape),
                            num_workers=self.cfg.train.num_workers, pin_memory=self.device.type == "cuda")
        return (to_model_range(batch).to(self.device, non_blocking=True) for batch in loader)

    def iteration(self) -> StepResult:
        t = self.cfg.train
        sums = {"d_real": 0.0, "n_real": 0, "d_fake": 0.0, "n_fake": 0}
        for _ in range(t.n_critic):
            real = next(self.batches)                                      # (b, 2, X, Y, Z), b may be 0
            z = self.generator.sample_latent(max(real.shape[0], 1), generator=self.rng, device=self.device)
            for key, value in dp_critic_step(self.generator, self.private, real, z, t.weight_clip).items():
                sums[key] += value
        z = self.generator.sample_latent(t.batch_size, generator=self.rng, device=self.device)
        loss_g = generator_step(self.generator, self.g_optimizer, self.private, z)
        d_real = sums["d_real"] / sums["n_real"] if sums["n_real"] else 0.0
        d_fake = sums["d_fake"] / sums["n_fake"]
        finite = all_finite(torch.tensor([d_real, d_fake]), loss_g)
        return StepResult(loss_critic=d_fake - d_real, loss_generator=loss_g.item(), wasserstein=d_real - d_fake,
                          penalty=0.0, finite=finite)

    def privacy_record(self) -> dict:
        """What the run has spent and with which parameters (metrics, state.json, consolidated file)."""
        return {"epsilon": self.private.epsilon(self.delta), "delta": self.delta, "noise_multiplier": self.sigma,
                "max_grad_norm": self.private.max_grad_norm, "sample_rate": self.sample_rate,
                "critic_steps": self.private.steps, "planned_epsilon": self.planned_epsilon,
                "target_epsilon": self.cfg.privacy.target_epsilon or None, "accountant": "rdp (opacus)",
                "secret_seeds": self.cfg.privacy.secret_seeds,
                "training_patches": len(self.dataset)}

    def _extra(self) -> dict:
        record = self.privacy_record()
        return {k: record[k] for k in ("epsilon", "delta", "noise_multiplier", "critic_steps")} | {
            "nonfinite_steps": self.nonfinite_steps, "lr_critic": self.cfg.train.lr_critic,
            "lr_generator": self.cfg.train.lr_generator, "precision": self.precision}

    def _setup_summary(self) -> str:
        return (f"q {self.sample_rate:.4g} sigma {self.sigma:.4g} C {self.private.max_grad_norm:g} delta "
                f"{self.delta:.3g} | planned epsilon {self.planned_epsilon:.4g}")

    # ------------------------------------------------------------------ checkpoints

    def _register_networks(self, checkpointer: Checkpointer) -> None:
        checkpointer.register("dp_generator", _Trained(self.generator, self.g_optimizer), SHARED)
        checkpointer.register("dp_critic", _PrivateCritic(self.private), SHARED)
        checkpointer.register("dp_noise", _Noise(self), SHARED)
        checkpointer.register("data", self.cursor, JSON)

    def _state_extra(self) -> dict:
        return {"trainer": "dp", "privacy": self.privacy_record()}

    def _check_resume(self, state: dict, where: Path) -> None:
        if state.get("trainer") != "dp" or "dp_generator.pt" not in state.get("files", {}):
            raise CheckpointError(f"checkpoint {where} was not written by this DP trainer (no dp_generator.pt); use "
                                  "another run name or remove the directory")
        saved = state.get("privacy", {})
        if saved.get("noise_multiplier") != self.sigma or saved.get("sample_rate") != self.sample_rate:
            raise CheckpointError(
                f"checkpoint {where} was trained with sigma {saved.get('noise_multiplier')} and q "
                f"{saved.get('sample_rate')}, this job has sigma {self.sigma} and q {self.sample_rate}: the privacy "
                "accounting would be wrong; resume with the same privacy settings, batch size and number of ranks")


class PoissonCursor:
    """The DP data position (JSON part "data"): the index of the next Poisson draw. It equals
    the critic steps taken, which the trainer reads when the batches are made after resume."""

    def __init__(self, private) -> None:
        self.private = private
        self.next_draw = 0

    def state_dict(self) -> dict:
        return {"next_draw": int(self.private.steps)}

    def load_state_dict(self, state: dict) -> None:
        self.next_draw = int(state["next_draw"])


class _Trained:
    """A network and its optimizer as one SHARED part."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = module, optimizer

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class _PrivateCritic(_Trained):
    """The DP critic, its Adam state and the accountant's critic step count."""

    def __init__(self, private) -> None:
        super().__init__(private.critic, private.optimizer.original_optimizer)
        self.private = private

    def state_dict(self) -> dict:
        return super().state_dict() | {"critic_steps": int(self.private.steps)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.private.steps = int(state["critic_steps"])


class _Noise:
    """The noise generator's state and the secret sampling seed (never in state.json)."""

    def __init__(self, trainer: DPTrainer) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict:
        return {"noise_rng": self.trainer.noise_rng.get_state(), "sampling_seed": self.trainer.sampling_seed}

    def load_state_dict(self, state: dict) -> None:
        self.trainer.noise_rng.set_state(state["noise_rng"])
        self.trainer.sampling_seed = int(state["sampling_seed"])
