"""Resume on another number of ranks, run by tests/test_train_reshard_mp.py under torchrun.

Usage: reshard_scenarios.py DATA_ROOT WORK_DIR ACTION:NAME:G:D:STEPS[,...]
  write  train a fresh run NAME (generator ZeRO stage G, critic D) for STEPS steps, then save
         every parameter's fp32 master weight and Adam moments (gathered) to NAME-<world>.pt
  resume resume run NAME (written by another number of ranks) up to STEPS steps; the gathered
         states right after loading go to NAME-resumed-<world>.pt, and a JSON report to
         NAME-resumed-<world>.json (steps, losses after the resume)
  full   train NAME for STEPS steps with a checkpoint every step; from the second checkpoint on,
         DeepSpeed's torch.save fails on the last rank as on a full disk (RuntimeError without
         errno, little free space); every rank's error line goes to NAME-full-<rank>.txt
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from hpc_gan import dist as hdist
from hpc_gan.config import load_config
from hpc_gan.io import read_jsonl
from hpc_gan.train.trainer import Trainer

ENV = hdist.detect()


def make_trainer(data: str, work: Path, name: str, g: int, d: int, steps: int) -> Trainer:
    overrides = [f"data.root={data}", f"output_root={work / name}", "train.log_every=1", "train.image_every=0",
                 "train.checkpoint_every=1000", "data.verify=none", "train.eval_every=0", "train.precision=fp32",
                 f"train.zero_stage_generator={g}", f"train.zero_stage_critic={d}", f"train.max_steps={steps}"]
    return Trainer(load_config("sn", "smoke", overrides=overrides), ENV)


def optimizer_states(t: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 master weight and Adam moments, gathered (collective)."""
    out = {}
    for net, engine in (("generator", t.generator), ("critic", t.critic)):
        for name, param in engine.module.named_parameters():
            out[f"{net}.{name}.fp32"] = safe_get_full_fp32_param(param)
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{net}.{name}.{key}"] = safe_get_full_optimizer_state(param, key)
    return {k: v.detach().float().cpu().clone() for k, v in out.items()}


def disk_full(t: Trainer, work: Path, name: str) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from hpc_gan.errors import CheckpointError
    from hpc_gan.train import checkpointer

    t.cfg.train.checkpoint_every = 1
    save, saves = TorchCheckpointEngine.save, []

    def failing_save(self, state_dict, path):
        saves.append(path)
        if "step-00000001" not in str(path) and ENV.rank == ENV.world_size - 1:
            with open(path, "wb") as handle:  # a partial file, as a full disk leaves it
                handle.write(b"PK")
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
        save(self, state_dict, path)

    TorchCheckpointEngine.save = failing_save
    checkpointer._free_bytes = lambda where: 0
    try:
        t.fit()
        message = "no error"
    except CheckpointError as exc:
        message = str(exc)
    finally:
        TorchCheckpointEngine.save = save
    (work / f"{name}-full-{ENV.rank}.txt").write_text(message)


def main() -> None:
    data, work, actions = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(",")
    hdist.init_process_group(ENV)
    for action in actions:
        kind, name, g, d, steps = action.split(":")
        t = make_trainer(data, work, name, int(g), int(d), int(steps))
        if kind == "full":
            disk_full(t, work, name)
            continue
        if kind == "write":
            t.fit()
            states = optimizer_states(t)
            if ENV.rank == 0:
                torch.save(states, work / f"{name}-{ENV.world_size}.pt")
            continue
        captured = {}
        load = t.checkpointer.load

        def load_and_capture(point, load=load, t=t, captured=captured):
            load(point)
            captured.update(optimizer_states(t))

        t.checkpointer.load = load_and_capture
        resumed_at = t.resume_point.step
        t.fit()
        if ENV.rank == 0:
            torch.save(captured, work / f"{name}-resumed-{ENV.world_size}.pt")
            records = [r for r in read_jsonl(t.run_dir / "metrics.jsonl") if r["step"] > resumed_at]
            report = {"resumed_at": resumed_at, "step": t.step, "saved_world_size": t.resume_point.world_size,
                      "losses": [[r["loss_critic"], r["loss_generator"]] for r in records],
                      "data": t.loader.state_dict()}
            (work / f"{name}-resumed-{ENV.world_size}.json").write_text(json.dumps(report))
    hdist.barrier()


if __name__ == "__main__":
    main()
