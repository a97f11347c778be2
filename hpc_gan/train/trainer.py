"""The two-engine WGAN-GP trainer: build, resume, loop, checkpoint.

Every rank runs the same code; rank 0 alone writes metrics, the resolved config and the
COMPLETE markers. Everything that must survive a restart (both engines, the data cursor, each
rank's RNG states, the step, the metrics position, the BatchNorm statistics, the generator EMA
when ``train.ema_decay`` > 0) is a part registered with one
:class:`~hpc_gan.train.checkpointer.Checkpointer`, which saves and restores them together.
:class:`TrainingLoop` is what the DeepSpeed :class:`Trainer` shares with the DP-SGD trainer
(:class:`hpc_gan.train.dp_trainer.DPTrainer`): the loop, metrics, stop requests, checkpoints.

Resume on another number of ranks: the checkpoint is chosen (and its files verified) before
the engines are built, so that they load DeepSpeed's universal format, into which the
checkpointer converts the ZeRO shards (fp32 weights and Adam moments are kept exactly); the
data cursor re-deals the rest of the epoch, and each rank's RNG streams are seeded from
(train.seed, step, rank, world size) (:func:`hpc_gan.train.checkpoint.derived_rng_state`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from hpc_gan import dist as hdist
from hpc_gan.config import RunConfig, resolve_precision, save_config, to_dict
from hpc_gan.data.cache import CacheSettings, batch_to_device, open_cached_split
from hpc_gan.data.dataset import PatchLoader, ShardedPatchDataset
from hpc_gan.errors import CheckpointError, ConfigError, DataError, HpcGanError
from hpc_gan.models import build_critic, build_generator, count_parameters
from hpc_gan.train import checkpoint as ckpt
from hpc_gan.train import ema as gen_ema
from hpc_gan.train import guards
from hpc_gan.train import stop as stop_request
from hpc_gan.train.checkpointer import JSON, PER_RANK, SHARDED, SHARED, Checkpointer, EnginePart, ResumePoint, RNGPart
from hpc_gan.train.ds_config import critic_config, generator_config
from hpc_gan.train.evaluation import TrainingEvaluation
from hpc_gan.train.metrics import MetricsLogger, MetricsPosition
from hpc_gan.train.steps import StepResult, loss_scale, to_model_range, train_iteration

log = logging.getLogger(__name__)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def check_trainer_route(cfg: RunConfig, dp_sgd: bool) -> None:
    """The one refusal of a run given to the wrong trainer: ``privacy.enabled`` runs train with
    DP-SGD (:class:`~hpc_gan.train.dp_trainer.DPTrainer`), all others with DeepSpeed.

    Raises:
        ConfigError: naming the trainer the run needs.
    """
    if cfg.privacy.enabled and not dp_sgd:
        raise ConfigError("privacy.enabled (variant dp) is trained by hpc_gan.train.dp_trainer.DPTrainer, not by "
                          "the DeepSpeed trainer (DeepSpeed computes no per-sample gradients); "
                          "python -m hpc_gan.train picks it by itself")
    if dp_sgd and not cfg.privacy.enabled:
        raise ConfigError("DPTrainer trains runs with privacy.enabled=true (variant dp); use the Trainer")


class TrainingLoop:
    """What every trainer shares: the run directory, the step loop, metrics, stop requests and
    checkpoints (markers, state.json, RNG states, resume checks).

    Subclasses build the networks, set ``total_steps``, ``precision`` and ``parameters`` and
    supply :meth:`iteration`, :attr:`epoch`, :meth:`_real_batches`, :meth:`_setup_summary`,
    :meth:`_register_networks`, :meth:`_check_resume`, :meth:`_extra` and :meth:`_state_extra`.
    """

    total_steps: int
    precision: str
    parameters: dict  # {"generator": n, "critic": n}
    label = ""  # after the variant name in the start line

    #: True for the trainer of ``privacy.enabled`` runs (DP-SGD, no DeepSpeed), False for the others.
    dp_sgd = False

    def __init__(self, cfg: RunConfig, env: hdist.DistEnv, run_dir: Path | None = None) -> None:
        check_trainer_route(cfg, self.dp_sgd)
        self.cfg, self.env = cfg, env
        self.run_dir = Path(run_dir or cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.device = torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
        self.step = 0
        self.nonfinite_steps = 0
        self.stop_requested = False
        self.requeue = False  # the stop came from the time-limit signal: the job requeues itself
        self.dataset = _verified_dataset(cfg, env.rank)
        if self.dataset.patch_shape != cfg.model.patch_shape:
            raise ConfigError(f"data.root '{cfg.data.root}' holds {self.dataset.patch_shape} patches but "
                              f"model.patch_shape is {cfg.model.patch_shape}; re-pack or fix model.patch_shape")
        # Latents and penalty weights differ per rank (different samples) but are reproducible.
        self.rng = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + env.rank)
        self._batches = None
        self.ema: gen_ema.GeneratorEMA | None = None  # set by fit() when train.ema_decay > 0
        self.checkpointer = Checkpointer(self.ckpt_root, env.rank, env.world_size, cfg.train.keep_checkpoints)
        # Chosen and verified now, before subclasses build their networks (another world size
        # makes the engines load DeepSpeed's universal format); nothing is written yet.
        self.resume_point: ResumePoint | None = self.checkpointer.select()

    @property
    def resharding(self) -> bool:
        """The checkpoint to resume was written by another number of ranks."""
        return self.resume_point is not None and self.resume_point.world_size != self.env.world_size

    # ------------------------------------------------------------------ what subclasses supply

    @property
    def generator_module(self) -> torch.nn.Module:
        """The plain generator (sampling, BatchNorm statistics)."""
        raise NotImplementedError

    @property
    def epoch(self) -> int:
        raise NotImplementedError

    def iteration(self) -> StepResult:
        """One generator step with its ``n_critic`` critic steps (collective: all ranks agree on ``finite``)."""
        raise NotImplementedError

    def _real_batches(self):
        """This rank's real batches (B, 2, X, Y, Z) in the model's range, on its device."""
        raise NotImplementedError

    def _setup_summary(self) -> str:
        """What the start line says about how this trainer trains (ZeRO stages, DP parameters)."""
        raise NotImplementedError

    def _register_networks(self, checkpointer: Checkpointer) -> None:
        """Register the networks, their optimizers and the data cursor (key "data")."""
        raise NotImplementedError

    def _check_resume(self, state: dict, where: Path) -> None:
        """Refuse a checkpoint this trainer cannot continue (CheckpointError), before anything is written."""

    def _state_extra(self) -> dict:
        """Entries of state.json beyond the common ones (rank 0)."""
        return {}

    def _extra(self) -> dict:
        """Entries of each metrics record beyond the averaged losses."""
        return {}

    # ------------------------------------------------------------------ run

    @property
    def batches(self):
        """The real batches; made on first use, i.e. after :meth:`resume` restored the data position."""
        if self._batches is None:
            self._batches = self._real_batches()
        return self._batches

    def fit(self) -> dict | None:
        self._check_resume_point()  # every refusal comes before the run directory is touched
        resumed = self.resume()
        self._prepare_run_dir()
        metrics = MetricsLogger(self.run_dir, self.env.rank, self.env.world_size, self.total_steps,
                                self.cfg.train.log_every)
        self._announce(resumed)
        stop_request.install()  # normally done by python -m hpc_gan.train before start-up; idempotent
        evaluation = TrainingEvaluation(self.cfg, self.dataset, self.env.rank, self.env.world_size, self.run_dir,
                                        self.device) if self.cfg.train.eval_every else None
        fixed_z = torch.Generator().manual_seed(12345)
        divergence = guards.DivergenceGuard(self.cfg.model.patch_shape, self.cfg.train.divergence_lipschitz,
                                            self.cfg.train.divergence_max_running_var, self.cfg.train.divergence_windows)
        record, bad_run = None, 0
        try:
            while self.step < self.total_steps:
                t = self.cfg.train
                result = self.iteration()
                if self.ema is not None:
                    self.ema.update(self.generator_module, self.step)
                self.step += 1
                bad_run = 0 if result.finite else bad_run + 1
                self.nonfinite_steps += not result.finite
                if bad_run and self.precision != "fp16" and bad_run >= t.max_nonfinite_steps:
                    self._stop_diverged(f"losses were not finite for {bad_run} consecutive steps")
                if result.finite:
                    metrics.add(vars(result), t.batch_size * t.n_critic)
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    record = metrics.flush(self.step, self.epoch, self._extra())
                    self._check_divergence(divergence, metrics.last_means["wasserstein"])
                if t.image_every and self.step % t.image_every == 0:
                    metrics.images(self.step, self.samples(4, fixed_z))
                stop = self._agree_to_stop()
                evaluated, best = None, False
                calm = not (bad_run or divergence.suspect)
                if evaluation and evaluation.due(self.step, self.total_steps) and not stop and calm:
                    evaluated, best = self._evaluate(evaluation, metrics)
                periodic = self.step % t.checkpoint_every == 0 or self.step == self.total_steps
                if stop or best or (periodic and calm):  # never checkpoint inside a non-finite or diverging streak
                    self.save(evaluated, best)
                if stop:
                    self.stop_requested = True
                    self.requeue = stop_request.requeue_wanted()
                    stop_request.clear()  # honoured: a later run in this process starts without it
                    log.warning("stop requested: checkpoint %s written, exiting%s", ckpt.tag_of(self.step),
                                " for requeue" if self.requeue else " (SIGTERM: no self-requeue)")
                    break
        finally:
            metrics.close()
            self._close_batches()
        return record

    def _check_divergence(self, divergence: guards.DivergenceGuard, wasserstein: float | None) -> None:
        """Judge the window just logged (collective); stop when the bound held for
        ``train.divergence_windows`` windows, or when the run ends inside an out-of-bounds window."""
        reason = divergence.observe(wasserstein, guards.max_running_var(self.generator_module))
        if reason:
            self._stop_diverged(f"{reason} for {divergence.windows} consecutive logging windows")
        if divergence.suspect and self.step == self.total_steps:
            self._stop_diverged(f"the run ended inside a diverging stretch ({divergence.reason})")

    def _stop_diverged(self, what: str) -> None:
        raise guards.TrainingDiverged(guards.stop_message(what, self.step, self.precision, self.ckpt_root))

    def _checked_modules(self) -> dict[str, torch.nn.Module]:
        """The networks whose weights and buffers a checkpoint holds (checked before saving)."""
        return {"generator": self.generator_module}

    def _checked_tensors(self):
        for name, module in self._checked_modules().items():
            yield from guards.module_tensors(name, module)
        if self.ema is not None:
            yield from ((f"generator_ema.{n}", t) for n, t in self.ema.params.items())

    def _close_batches(self) -> None:
        """Stop the data loader's worker processes now: left to the garbage collector, each
        loader's shutdown waits out a timeout (seconds) at the end of every run."""
        batches, self._batches = self._batches, None
        if batches is not None:
            batches.close()

    def _announce(self, resumed: str | None) -> None:
        """The start line in the job log (rank 0)."""
        if self.env.rank != 0:
            return
        print(f"hpc_gan train: variant {self.cfg.variant or 'custom'}{self.label} | world size {self.env.world_size} "
              f"({self.env.launcher}) | {self.precision} | {self._setup_summary()} | parameters "
              f"G {self.parameters['generator']:,} D {self.parameters['critic']:,} | {len(self.dataset)} patches "
              f"{'x'.join(map(str, self.dataset.patch_shape))} | {self.total_steps} steps | "
              + (f"resumed from {resumed}" if resumed else "fresh start") + f" | {self.run_dir}", flush=True)
        if resumed and self.resharding:
            point = self.resume_point
            print(f"hpc_gan train: checkpoint {point.tag} was written by {point.world_size} ranks, this job has "
                  f"{self.env.world_size}: converted {', '.join(self.checkpointer.converted) or 'nothing'} to "
                  f"DeepSpeed's universal format in {point.where / ckpt.UNIVERSAL} (fp32 weights and Adam moments "
                  f"kept); data continues at patch {self._data_read()} of epoch {self.epoch}; RNG streams seeded "
                  f"from (train.seed, step {point.step}, rank, world size {self.env.world_size})", flush=True)

    def _data_read(self) -> int | str:
        """Patches of the current epoch read so far (for the resharding line); "-" if unknown."""
        return "-"

    def evaluation_module(self) -> torch.nn.Module:
        """The generator that previews and evaluation during training use: the EMA average (with
        the live generator's BatchNorm statistics) when the run keeps one, as `hpc_gan sample`
        does; else the trained generator itself."""
        if self.ema is not None:
            return gen_ema.averaged_generator(self.ema, lambda: build_generator(self.cfg.model), self.generator_module,
                                              self.device)
        return self.generator_module

    def _evaluate(self, evaluation: TrainingEvaluation, metrics: MetricsLogger) -> tuple[dict, bool]:
        """One in-training evaluation (collective), logged, and whether it has the best FID so far
        (then this step is checkpointed and becomes ``checkpoints/best``)."""
        self._average_batchnorm_buffers()  # eval mode uses running statistics: the same on every rank
        result = evaluation.run(self.evaluation_module())
        best = evaluation.improves(result)
        metrics.evaluation(self.step, result, evaluation.best_fid)
        return result, best

    @torch.no_grad()
    def samples(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """n patches (n, 2, X, Y, Z) from the generator in eval mode (BatchNorm running statistics)."""
        module = self.evaluation_module()
        module.eval()
        try:
            z = module.sample_latent(n, generator=rng, device=self.device, dtype=next(module.parameters()).dtype)
            return module(z)
        finally:
            module.train()

    # ------------------------------------------------------------------ stop requests

    def _agree_to_stop(self) -> bool:
        """A signal may reach ranks at different steps (or during start-up): stop when any rank has seen one."""
        flag = torch.tensor([1.0 if self.stop_requested or stop_request.requested() else 0.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ------------------------------------------------------------------ checkpoints

    def _check_resume_point(self) -> None:
        point = self.resume_point
        if point is None:
            return
        saved = point.state.get("variant")
        if saved != self.cfg.variant:
            raise CheckpointError(f"'{self.run_dir}' holds checkpoints of variant '{saved}', not "
                                  f"'{self.cfg.variant}'; use another run name or remove the directory")
        self._check_resume(point.state, point.where)

    def _prepare_run_dir(self) -> None:
        if self.env.rank == 0:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
        hdist.barrier()

    def _register_parts(self) -> None:
        """Everything that must survive a restart, under fixed keys (see hpc_gan.train.checkpoint)."""
        cp, t = self.checkpointer, self.cfg.train
        self._register_networks(cp)
        cp.register("generator_buffers", _BatchNormStatistics(self), SHARED)
        if t.ema_decay:
            self.ema = gen_ema.for_run(t.ema_decay, t.ema_warmup, self.generator_module)
            cp.register("generator_ema", _EMAPart(self), SHARED, optional=True)
        cp.register("rng", RNGPart(self.rng, t.seed), PER_RANK)
        # optional: checkpoints written before these parts existed hold only the top-level step
        cp.register("loop", self, JSON, optional=True)
        cp.register("metrics", MetricsPosition(self.run_dir / "metrics.jsonl", self.env.rank, lambda: self.step),
                    JSON, optional=True)

    def state_dict(self) -> dict:
        """The loop's own position (the "loop" part)."""
        return {"step": self.step, "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {"step": self.step}
        self.step, self.nonfinite_steps = int(state["step"]), int(state.get("nonfinite_steps", 0))

    def save(self, evaluated: dict | None = None, best: bool = False) -> Path:
        """Write one checkpoint with every rank; rank 0 marks it COMPLETE after a barrier.

        ``evaluated``: this step's in-training evaluation, kept in state.json; ``best``: it has
        the lowest FID so far, so ``checkpoints/best`` will name this checkpoint."""
        self._average_batchnorm_buffers()
        bad = guards.agree_nonfinite(self._checked_tensors(), self.env.rank)  # collective: all ranks refuse
        if bad:
            self._stop_diverged(f"the state holds non-finite values ({bad}), so {ckpt.tag_of(self.step)} was not written")
        if self.ema is not None:
            self.ema.copy_buffers_from(self.generator_module)  # the rank average, as in generator_buffers
        meta = {"epoch": self.epoch, "variant": self.cfg.variant, "precision": self.precision,
                "manifest_sha256": self.dataset.manifest.digest, "config": to_dict(self.cfg),
                **self._state_extra(), **({"eval": evaluated} if evaluated else {})}
        return self.checkpointer.save(self.step, meta, best)

    def resume(self) -> str | None:
        """Restore every part from the checkpoint chosen at construction, if any; returns its tag."""
        if not self.checkpointer.parts:
            self._register_parts()
        point = self.resume_point
        if point is None:
            if self.env.rank == 0:  # records of a job killed before its first checkpoint
                MetricsPosition(self.run_dir / "metrics.jsonl", 0, lambda: 0).load_state_dict({"step": 0})
            return None
        self.step = point.step
        self.checkpointer.load(point)
        return point.tag

    def _batchnorm_layers(self):
        return [m for m in self.generator_module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def _average_batchnorm_buffers(self) -> None:
        """Each rank's BatchNorm saw only its own batches; a checkpoint keeps the rank average."""
        if not dist.is_initialized() or self.env.world_size == 1:
            return
        for layer in self._batchnorm_layers():
            for buffer in (layer.running_mean, layer.running_var):
                dist.all_reduce(buffer)
                buffer /= self.env.world_size

    def _buffers(self) -> dict:
        return {name: b.detach().float().cpu() if b.is_floating_point() else b.detach().cpu()
                for name, b in self.generator_module.named_buffers() if "running" in name or "num_batches" in name}


class Trainer(TrainingLoop):
    """Trains one variant with two DeepSpeed engines. ``fit()`` returns the last metrics record
    (rank 0) or None.

    Example:
        >>> cfg = load_config("sn", profile="smoke", overrides=["data.root=demo_out/shards"])
        >>> Trainer(cfg, hpc_gan.dist.detect()).fit()     # under torchrun / srun / mpiexec
    """

    def __init__(self, cfg: RunConfig, env: hdist.DistEnv, run_dir: Path | None = None) -> None:
        super().__init__(cfg, env, run_dir)
        self.precision = resolve_precision(cfg.train, torch.cuda.is_available())
        self.dtype = DTYPES[self.precision]
        self.loader = PatchLoader(self.dataset, cfg.train.batch_size, env.rank, env.world_size, cfg.train.seed,
                                  cfg.train.num_workers, compact=True)
        self.total_steps = cfg.train.max_steps or (cfg.train.epochs * self.loader.batches_per_epoch()
                                                   // cfg.train.n_critic)
        self.generator, self.critic = self._engines()

    def _engines(self):
        import deepspeed

        torch.manual_seed(self.cfg.train.seed)  # identical initial weights (and spectral-norm vectors) on all ranks
        generator, critic = build_generator(self.cfg.model), build_critic(self.cfg.model)
        generator.checkpointing = critic.checkpointing = self.cfg.train.activation_checkpointing
        if self.cfg.train.sync_batchnorm:
            generator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(generator)
        self.parameters = {"generator": count_parameters(generator), "critic": count_parameters(critic)}
        betas = self.cfg.train.betas
        cuda = torch.cuda.is_available()
        engines = []
        for model, lr, config in ((generator, self.cfg.train.lr_generator, generator_config),
                                  (critic, self.cfg.train.lr_critic, critic_config)):
            optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=betas)
            ds_config = config(self.cfg, self.env.world_size, cuda)
            if self.resharding:  # load the universal checkpoint the checkpointer will convert to
                ds_config["checkpoint"] = {"load_universal": True}
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
            engines.append(engine)
        for engine in engines:
            _match_buffer_dtype(engine.module)
        return engines

    @property
    def generator_module(self) -> torch.nn.Module:
        return self.generator.module

    def _checked_modules(self) -> dict[str, torch.nn.Module]:
        return {"generator": self.generator.module, "critic": self.critic.module}

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    def _real_batches(self):
        return (to_model_range(batch_to_device(b, self.device, self.dtype)) for b in self.loader)

    def iteration(self) -> StepResult:
        t = self.cfg.train
        return train_iteration(self.generator, self.critic, self.batches, self.rng, t.n_critic, t.gp_weight,
                               t.gp_mode, t.weight_clip)

    def _extra(self) -> dict:
        return {"loss_scale_critic": loss_scale(self.critic), "loss_scale_generator": loss_scale(self.generator),
                "skipped_steps": int(self.critic.skipped_steps + self.generator.skipped_steps),
                "nonfinite_steps": self.nonfinite_steps,
                "lr_critic": self.cfg.train.lr_critic, "lr_generator": self.cfg.train.lr_generator,
                "precision": self.precision}

    def _setup_summary(self) -> str:
        return f"ZeRO G{self.cfg.train.zero_stage_generator}/D{self.cfg.train.zero_stage_critic}"

    def _register_networks(self, checkpointer: Checkpointer) -> None:
        checkpointer.register("generator", EnginePart(self.generator, "generator"), SHARDED)
        checkpointer.register("critic", EnginePart(self.critic, "critic"), SHARDED)
        checkpointer.register("data", self.loader, JSON)

    def _check_resume(self, state: dict, where: Path) -> None:
        if state.get("trainer", "deepspeed") != "deepspeed":
            raise CheckpointError(f"checkpoint {where} was written by the {state.get('trainer')} trainer, not the "
                                  "DeepSpeed one; use another run name or remove the directory")

    def _data_read(self) -> int:
        return self.loader.state_dict()["read"]

    def _state_extra(self) -> dict:
        return {"trainer": "deepspeed"}


class _BatchNormStatistics:
    """The generator's BatchNorm running statistics (averaged over ranks before saving) as a
    SHARED part: what sampling uses, and what a resharded ZeRO-3 resume restores."""

    def __init__(self, loop: TrainingLoop) -> None:
        self.loop = loop

    def state_dict(self) -> dict:
        return self.loop._buffers()

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        buffers = dict(self.loop.generator_module.named_buffers())
        for name, saved in state.items():
            buffers[name].copy_(saved)


class _EMAPart:
    """The generator EMA as a SHARED part; absent from a checkpoint (EMA turned on since), it
    starts from the resumed weights."""

    def __init__(self, loop: TrainingLoop) -> None:
        self.loop = loop

    def state_dict(self) -> dict:
        return self.loop.ema.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        t = self.loop.cfg.train
        if state is None:
            self.loop.ema = gen_ema.for_run(t.ema_decay, t.ema_warmup, self.loop.generator_module)
        else:
            self.loop.ema.load_state_dict(state)


def _verified_dataset(cfg: RunConfig, rank: int):
    """Rank 0 checks the shards (reading every byte once is enough) and tells every rank the
    verdict, so that all ranks stop with the same error instead of some waiting forever.
    With ``data.cache`` one process per node checks and decodes them (hpc_gan.data.cache)."""
    cache = CacheSettings.from_config(cfg.data)
    if cache.mode != "none":
        return open_cached_split(cfg.data.root, cfg.data.split, cfg.data.verify, cache, max(1, cfg.train.num_workers))
    verdict = [""]
    if rank == 0:
        try:
            ShardedPatchDataset(cfg.data.root, cfg.data.split, verify=cfg.data.verify)
        except HpcGanError as exc:
            verdict[0] = str(exc)
    if dist.is_initialized():
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise DataError(verdict[0])
    return ShardedPatchDataset(cfg.data.root, cfg.data.split, verify="none")


def _match_buffer_dtype(module: torch.nn.Module) -> None:
    """DeepSpeed casts parameters to fp16/bf16 but not buffers (BatchNorm running statistics,
    spectral-norm vectors), and batch_norm / mv refuse mixed dtypes. The consolidated file
    stores them in fp32 again."""
    dtype = next(module.parameters()).dtype
    for buffer in module.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)
