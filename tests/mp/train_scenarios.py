"""Training scenarios run by tests/test_train_mp.py under `torchrun --nproc_per_node 2`.

One launch runs several scenarios (importing DeepSpeed costs seconds per process); rank 0
writes a JSON report of what it measured, the test asserts on it.
Usage: train_scenarios.py DATA_ROOT WORK_DIR SCENARIO[,SCENARIO...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hpc_gan import dist as hdist
from hpc_gan.config import load_config
from hpc_gan.models import Critic, Generator, spectral_norm_buffers
from hpc_gan.train import steps as train_steps
from hpc_gan.train import trainer as trainer_module
from hpc_gan.train.consolidate import consolidate, load_generator
from hpc_gan.train.guards import TrainingDiverged
from hpc_gan.train.penalty import gradient_penalty
from hpc_gan.train.trainer import Trainer

ENV = hdist.detect()


def make_trainer(data: str, out: Path, variant: str = "sn", **sets) -> Trainer:
    overrides = [f"data.root={data}", f"output_root={out}", "train.log_every=1", "train.image_every=0",
                 "train.checkpoint_every=1000", "data.verify=none", "train.eval_every=0"]
    overrides += [f"{k.replace('__', '.')}={v}" for k, v in sets.items()]
    return Trainer(load_config(variant, "smoke", overrides=overrides), ENV)


def losses(run_dir: Path) -> list[list[float]]:
    path = run_dir / "metrics.jsonl"
    if ENV.rank != 0:
        return []
    return [[r["step"], r["loss_critic"], r["loss_generator"]] for r in map(json.loads, path.read_text().splitlines())]


def flat_params(module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in module.parameters()])


def matrix(data, work) -> dict:
    """ZeRO 1/2/3 x fp32/bf16: trains, losses finite, generator weights move."""
    out = {}
    for stage in (1, 2, 3):
        for precision in ("fp32", "bf16"):
            name = f"zero{stage}_{precision}"
            t = make_trainer(data, work / name, train__zero_stage_generator=stage,
                             train__zero_stage_critic=min(stage, 2), train__precision=precision, train__max_steps=3)
            before = _gathered_generator(t)
            record = t.fit()
            after = _gathered_generator(t)
            out[name] = {"record": record, "moved": float((after - before).abs().max())}
    # the xl_sn_mp recipe at small size: generator ZeRO-3 with optimizer offload and activation checkpointing
    t = make_trainer(data, work / "zero3_offload", train__zero_stage_generator=3, train__zero_stage_critic=2,
                     train__offload_optimizer="true", train__activation_checkpointing="true", train__max_steps=3)
    before = _gathered_generator(t)
    record = t.fit()
    out["zero3_offload_checkpointing"] = {"record": record, "moved": float((_gathered_generator(t) - before).abs().max())}
    return out


def _gathered_generator(t: Trainer) -> torch.Tensor:
    if t.cfg.train.zero_stage_generator == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(t.generator.module.parameters())):
            return flat_params(t.generator.module).clone()
    return flat_params(t.generator.module).clone()


def resume(data, work) -> dict:
    """6 steps straight == 3 steps, new process state, resume, 3 more steps (fp32)."""
    straight = make_trainer(data, work / "straight", train__max_steps=6)
    straight.fit()
    first = make_trainer(data, work / "split", train__max_steps=3)
    first.fit()
    torch.manual_seed(999)  # disturb the global RNG: resume must restore it
    second = make_trainer(data, work / "split", train__max_steps=6)
    second.fit()
    return {"straight": losses(work / "straight/run/sn"), "split": losses(work / "split/run/sn"),
            "resumed_at": 3}


def sn_sync(data, work) -> dict:
    """Spectral-norm power-iteration vectors are identical on all ranks after every step."""
    diffs = []
    real_iteration = trainer_module.train_iteration

    def checked(generator, critic, *args, **kwargs):
        result = real_iteration(generator, critic, *args, **kwargs)
        for name, buf in spectral_norm_buffers(critic.module).items():
            gathered = [torch.empty_like(buf) for _ in range(ENV.world_size)]
            dist.all_gather(gathered, buf.contiguous())
            diffs.append(max(float((g - gathered[0]).abs().max()) for g in gathered))
        return result

    trainer_module.train_iteration = checked
    try:
        make_trainer(data, work / "sn_sync", train__max_steps=5).fit()
    finally:
        trainer_module.train_iteration = real_iteration
    return {"checks": len(diffs), "max_diff": max(diffs)}


def consolidation(data, work) -> dict:
    """The consolidated generator reproduces the trained one for the same z."""
    t = make_trainer(data, work / "cons", train__max_steps=4, train__zero_stage_generator=2)
    t.fit()
    result = {}
    if ENV.rank == 0:
        path = consolidate(t.run_dir)
        loaded, meta = load_generator(path, variant="sn")
        z = torch.Generator().manual_seed(3)
        trained = t.samples(3, z)
        z = torch.Generator().manual_seed(3)
        with torch.no_grad():
            again = loaded(loaded.sample_latent(3, generator=z))
        result = {"max_diff": float((trained - again).abs().max()), "step": meta["step"], "file": str(path)}
    dist.barrier()
    return result


def parity(data, work) -> dict:
    """Two WGAN-GP iterations on 2 ranks (ZeRO 1 and 2) == plain PyTorch on both ranks' batches."""
    out = {}
    for stage in (1, 2):
        t = make_trainer(data, work / f"parity{stage}", variant="gp", train__max_steps=2,
                         train__zero_stage_generator=stage, train__zero_stage_critic=stage)
        reals = _peek_batches(t, 2)
        t.fit()
        if ENV.rank == 0:
            out[f"zero{stage}"] = _reference_difference(t, reals, losses(t.run_dir))
    return out


def _peek_batches(t: Trainer, steps: int) -> list[list[torch.Tensor]]:
    """Each rank's first ``steps`` batches (rank order), without moving the trainer's cursor."""
    from hpc_gan.data.dataset import PatchLoader

    per_rank = []
    for rank in range(ENV.world_size):
        loader = iter(PatchLoader(t.dataset, t.cfg.train.batch_size, rank, ENV.world_size, t.cfg.train.seed))
        per_rank.append([train_steps.to_model_range(next(loader)) for _ in range(steps)])
    return per_rank


def _reference_difference(t: Trainer, reals: list[list[torch.Tensor]], logged: list) -> dict:
    """Largest differences to plain PyTorch: losses (relative) of every step, parameters after.

    Conv biases followed by BatchNorm (generator) or InstanceNorm (gp critic) get a zero
    gradient in exact arithmetic (the normalisation removes them); Adam turns their ~1e-10 rounding noise into +-lr, so they are
    reported apart and not compared. Adam's first steps also amplify rounding noise of tiny
    gradients, so parameters are compared relative to the learning rate.
    """
    cfg = t.cfg
    torch.manual_seed(cfg.train.seed)
    g = Generator(cfg.model.latent_dim, cfg.model.ngf, cfg.model.patch_shape)
    d = Critic(cfg.model.ndf, cfg.model.patch_shape, norm=cfg.model.critic_norm)
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.train.lr_generator, betas=cfg.train.betas)
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.train.lr_critic, betas=cfg.train.betas)
    rngs = [torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + r) for r in range(ENV.world_size)]
    loss_errors = []
    for step, row in enumerate(logged):
        batches = [per_rank[step] for per_rank in reals]
        loss_d, loss_g = _reference_iteration(g, d, opt_g, opt_d, batches, rngs, cfg.train.gp_weight)
        loss_errors += [abs(row[1] - loss_d) / max(1.0, abs(loss_d)), abs(row[2] - loss_g) / max(1.0, abs(loss_g))]
    before_norm = {f"G.net.{i}.1.bias" for i in (2, 3, 4)} | {f"D.net.{i}.0.bias" for i in range(4)}
    params, ignored = 0.0, 0.0
    for prefix, ref, trained, lr in (("G.", g, t.generator.module, cfg.train.lr_generator),
                                     ("D.", d, t.critic.module, cfg.train.lr_critic)):
        for (name, a), b in zip(ref.named_parameters(), trained.parameters()):
            diff = float((a.detach() - b.detach().float()).abs().max()) / lr
            if prefix + name in before_norm:
                ignored = max(ignored, diff)
            else:
                params = max(params, diff)
    return {"steps": len(logged), "losses": max(loss_errors), "params_over_lr": params,
            "bias_before_norm_over_lr": ignored}


def _reference_iteration(g, d, opt_g, opt_d, batches, rngs, gp_weight) -> tuple[float, float]:
    """One iteration in plain PyTorch; each rank's batch goes through BatchNorm separately, as on the ranks."""
    for p in d.parameters():
        p.requires_grad_(True)
    loss_d = 0
    for real, rng in zip(batches, rngs):
        z = g.sample_latent(real.shape[0], generator=rng)
        with torch.no_grad():
            fake = g(z)
        gp = gradient_penalty(d, real, fake, "per_sample", generator=rng)
        loss_d = loss_d + (d(fake).mean() - d(real).mean() + gp_weight * gp) / len(batches)
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()
    for p in d.parameters():
        p.requires_grad_(False)
    loss_g = sum(-d(g(g.sample_latent(r.shape[0], generator=rng))).mean() for r, rng in zip(batches, rngs))
    loss_g = loss_g / len(batches)
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()
    return loss_d.item(), loss_g.item()


def _patched_iteration(after_each):
    """Wrap the trainer's iteration; ``after_each(step, result)`` may change the result."""
    real_iteration = trainer_module.train_iteration
    count = {"step": 0}

    def wrapped(*args, **kwargs):
        result = real_iteration(*args, **kwargs)
        count["step"] += 1
        return after_each(count["step"], result)

    return real_iteration, wrapped


def nonfinite(data, work) -> dict:
    """bf16/fp32: N consecutive non-finite losses stop the run; the last good checkpoint stays."""
    def poison(step, result):
        if step >= 3:
            result.finite = False
        return result

    real_iteration, trainer_module.train_iteration = _patched_iteration(poison)
    t = make_trainer(data, work / "nonfinite", train__max_steps=20, train__checkpoint_every=2,
                     train__max_nonfinite_steps=3)
    try:
        t.fit()
        message = ""
    except TrainingDiverged as exc:
        message = str(exc)
    finally:
        trainer_module.train_iteration = real_iteration
    from hpc_gan.train import checkpoint as ckpt

    return {"message": message, "step": t.step, "complete": ckpt.complete_tags(t.ckpt_root),
            "latest": ckpt.newest_complete(t.ckpt_root)}


def stop_signal(data, work) -> dict:
    """A stop signal on one rank: all ranks stop at the same step boundary after one checkpoint."""
    import os
    import signal

    def signal_rank1(step, result):
        if step == 2 and ENV.rank == 1:
            os.kill(os.getpid(), signal.SIGUSR2)
        return result

    real_iteration, trainer_module.train_iteration = _patched_iteration(signal_rank1)
    try:
        t = make_trainer(data, work / "stop", train__max_steps=20)
        t.fit()
    finally:
        trainer_module.train_iteration = real_iteration
    from hpc_gan.train import checkpoint as ckpt

    steps = [None] * ENV.world_size
    dist.all_gather_object(steps, (t.step, t.stop_requested))
    return {"ranks": steps, "latest": ckpt.newest_complete(t.ckpt_root)}


def evaluation(data, work) -> dict:
    """6 steps, evaluation every 2 (9 samples at batch 4: rank 1's second generator pass is empty,
    which ZeRO-3's collective forward must still run), keep 1 checkpoint: records, best, pruning;
    with a generator EMA, which is what gets evaluated."""
    from hpc_gan.train import checkpoint as ckpt

    t = make_trainer(data, work / "evaluation", train__max_steps=6, train__eval_every=2, train__eval_samples=9,
                     train__batch_size=4, train__zero_stage_generator=3, train__keep_checkpoints=1,
                     train__ema_decay=0.9)
    t.fit()
    out = {"best": ckpt.best_tag(t.ckpt_root), "complete": ckpt.complete_tags(t.ckpt_root)}
    if ENV.rank == 0:
        out["records"] = [json.loads(line) for line in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
        out["consolidated"] = str(consolidate(t.run_dir, best=True))
    return out


def _ema_flat(t: Trainer) -> torch.Tensor:
    return torch.cat([t.ema.params[n].flatten().cpu() for n in sorted(t.ema.params)])


def _gathered_by_name(t: Trainer) -> torch.Tensor:
    """The raw generator weights in _ema_flat's order (ZeRO-3: gathered)."""
    import deepspeed

    named = dict(t.generator.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(named.values())):
        return torch.cat([named[n].detach().float().flatten().cpu() for n in sorted(named)])


def _rank_spread(flat: torch.Tensor) -> float:
    """Largest difference between this tensor on any rank and on rank 0."""
    gathered = [torch.empty_like(flat) for _ in range(ENV.world_size)]
    dist.all_gather(gathered, flat.contiguous())
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def ema(data, work) -> dict:
    """Generator EMA on 2 ranks: the same on every rank (ZeRO 1 and 3), resumed bit-identically,
    ZeRO-3 agreeing with ZeRO-1, consolidated as it was trained."""
    sets = {"train__ema_decay": 0.9, "train__ema_warmup": "true"}
    straight = make_trainer(data, work / "ema_straight", train__max_steps=6, **sets)
    straight.fit()
    make_trainer(data, work / "ema_split", train__max_steps=3, **sets).fit()
    torch.manual_seed(999)  # disturb the global RNG: resume must restore it
    split = make_trainer(data, work / "ema_split", train__max_steps=6, **sets)
    split.fit()
    zero3 = make_trainer(data, work / "ema_zero3", train__max_steps=6, train__zero_stage_generator=3, **sets)
    zero3.fit()
    result = {"straight": losses(straight.run_dir), "split": losses(split.run_dir),
              "rank_spread": {name: _rank_spread(_ema_flat(t)) for name, t in
                              (("zero1", straight), ("zero1_resumed", split), ("zero3", zero3))},
              "resume_max_diff": float((_ema_flat(straight) - _ema_flat(split)).abs().max()),
              "zero3_vs_zero1": float((_ema_flat(straight) - _ema_flat(zero3)).abs().max()),
              "ema_vs_raw": float((_ema_flat(zero3) - _gathered_by_name(zero3)).abs().max()),
              "steps": [straight.ema.step, split.ema.step, zero3.ema.step]}
    if ENV.rank == 0:
        path = consolidate(zero3.run_dir)
        loaded, meta = load_generator(path, variant="sn")
        result["consolidated_max_diff"] = max(float((p - zero3.ema.params[n].cpu()).abs().max())
                                              for n, p in loaded.named_parameters())
        result["consolidated_weights"] = meta["weights"]
    dist.barrier()
    return result


SCENARIOS = {"ema": ema, "evaluation": evaluation,
             "nonfinite": nonfinite, "stop_signal": stop_signal, "matrix": matrix, "resume": resume, "sn_sync": sn_sync, "consolidation": consolidation,
             "parity": parity}


def main() -> None:
    data, work, names = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(",")
    hdist.init_process_group(ENV)
    report = {name: SCENARIOS[name](data, work) for name in names}
    if ENV.rank == 0:
        (work / "report.json").write_text(json.dumps(report, indent=1, default=str))
    dist.barrier()


if __name__ == "__main__":
    main()
