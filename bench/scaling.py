#!/usr/bin/env python
"""Weak scaling of the two-engine DeepSpeed trainer on CPU: 1 rank against 2 ranks (JSON).

At a FIXED per-rank batch (default: smoke profile, variant ``sn``, fp32, ZeRO-1) the trainer's
step time is measured with 1 rank and with 2 ranks. Each measurement is its own launch::

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node {1,2} \\
        --master_port <free port> bench/scaling.py --worker ...

The worker builds a :class:`hpc_gan.train.trainer.Trainer` exactly as ``bench/train_step.py``
does (gloo, batches from the trainer's ``PatchLoader``), runs ``--warmup`` iterations, then times
``--steps`` calls of ``train_iteration`` between two barriers; rank 0 writes the per-step time to
a JSON file. 1-rank and 2-rank launches alternate for ``--rounds`` rounds so that load from other
work hits both alike; the figures are medians over rounds.

Reported: step times, throughput (patches/s = world x batch / step time), weak-scaling
efficiency t1 / t2 (ideal 1.0), and the per-step all-reduce volume (gradient bytes of both
engines = parameters x 4 bytes in fp32; one critic and one generator step per iteration).

    python bench/scaling.py [--steps 20] [--rounds 3] [--variant sn] [--profile smoke] [--zero 1]

On 2 shared CPU cores this shows the overhead of data parallelism in this trainer (gloo
all-reduce, barriers, two processes on two cores), not network scaling: see docs/SCALING.md for
the model at cluster scale. CUDA/NCCL is not measured by this script.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

HERE = Path(__file__).resolve()
BYTES_FP32 = 4


def _overrides(args: argparse.Namespace, data_root: str | None = None, output_root: str | None = None) -> list[str]:
    out = ["train.precision=fp32", "train.num_workers=0",
           f"train.zero_stage_generator={args.zero}", f"train.zero_stage_critic={min(args.zero, 2)}"]
    if data_root:
        out.append(f"data.root={data_root}")
    if output_root:
        out.append(f"output_root={output_root}")
    return out


# --------------------------------------------------------------------------- worker (under torchrun)


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    from hpc_gan import dist
    from hpc_gan.config import load_config
    from hpc_gan.train.steps import to_model_range, train_iteration
    from hpc_gan.train.trainer import Trainer

    env = dist.detect()
    dist.init_process_group(env)
    cfg = load_config(args.variant, args.profile, overrides=_overrides(args, args.data_root, args.output_root))
    trainer = Trainer(cfg, env)
    batches = (to_model_range(b) for b in trainer.loader)
    t = cfg.train

    def iterate(n: int) -> None:
        for _ in range(n):
            train_iteration(trainer.generator, trainer.critic, batches, trainer.rng, t.n_critic, t.gp_weight, t.gp_mode)

    iterate(args.warmup)
    dist.barrier()
    start = time.perf_counter()
    iterate(args.steps)
    dist.barrier()
    step_s = (time.perf_counter() - start) / args.steps
    if env.rank == 0:
        Path(args.result).write_text(json.dumps({
            "world_size": env.world_size, "batch_size": t.batch_size, "steps": args.steps, "step_s": step_s,
            "parameters": trainer.parameters,
        }))
    torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- driver


def launch(nproc: int, args: argparse.Namespace, data_root: Path, run_root: Path, result: Path) -> dict:
    from hpc_gan.dist import free_port, without_launcher_env

    env = without_launcher_env()
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), str(HERE), "--worker",
           "--variant", args.variant, "--profile", args.profile, "--zero", str(args.zero),
           "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--data-root", str(data_root), "--output-root", str(run_root), "--result", str(result)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=HERE.parent.parent)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not result.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"{nproc}-rank launch failed (exit {proc.returncode}):\n{tail}")
    out = json.loads(result.read_text())
    result.unlink()
    out["launch_wall_s"] = wall
    return out


def model_parameters(variant: str, profile: str) -> dict:
    from hpc_gan.config import load_config
    from hpc_gan.train.plan import count_model_parameters

    generator, critic = count_model_parameters(load_config(variant, profile).model)
    return {"generator": generator, "critic": critic}


def run(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(HERE.parent))
    from hpc_gan.config import load_config
    from train_step import make_shards  # the same synthetic shards as bench/train_step.py

    load_before = os.getloadavg()
    cfg = load_config(args.variant, args.profile, overrides=_overrides(args))
    params = model_parameters(args.variant, args.profile)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        data_root = make_shards(Path(tmp) / "data", cfg.model.patch_shape)
        for r in range(args.rounds):
            pair = {}
            for nproc in (1, 2):
                pair[nproc] = launch(nproc, args, data_root, Path(tmp) / f"runs_{r}_{nproc}", Path(tmp) / "result.json")
                print(f"round {r}: {nproc} rank(s) {pair[nproc]['step_s'] * 1e3:.1f} ms/step", file=sys.stderr)
            rounds.append(pair)
    load_after = os.getloadavg()

    batch = cfg.train.batch_size
    t1 = statistics.median(p[1]["step_s"] for p in rounds)
    t2 = statistics.median(p[2]["step_s"] for p in rounds)
    eff_rounds = [p[1]["step_s"] / p[2]["step_s"] for p in rounds]
    grad_bytes = (params["generator"] + params["critic"]) * BYTES_FP32
    world = 2
    return {
        "benchmark": "scaling", "kind": "weak", "device": "cpu", "backend": "gloo",
        "variant": args.variant, "profile": args.profile, "patch_shape": list(cfg.model.patch_shape),
        "batch_size_per_rank": batch, "precision": "fp32",
        "zero_stage_generator": args.zero, "zero_stage_critic": min(args.zero, 2),
        "threads_per_rank": 1, "steps_per_round": args.steps, "warmup_steps": args.warmup, "rounds": args.rounds,
        "step_ms": {"1": round(t1 * 1e3, 2), "2": round(t2 * 1e3, 2)},
        "step_ms_all": {str(n): [round(p[n]["step_s"] * 1e3, 2) for p in rounds] for n in (1, 2)},
        "throughput_patches_per_s": {"1": round(batch / t1, 2), "2": round(2 * batch / t2, 2)},
        "weak_scaling_efficiency": round(statistics.median(eff_rounds), 3),
        "weak_scaling_efficiency_all": [round(e, 3) for e in eff_rounds],
        "speedup_throughput": round((2 * batch / t2) / (batch / t1), 3),
        "parameters": params,
        "allreduce": {
            "gradient_bytes_per_step": grad_bytes,
            "note": "critic step + generator step each all-reduce their fp32 gradients once per iteration",
            "ring_bytes_sent_per_rank_at_world_2": int(2 * (world - 1) / world * grad_bytes),
        },
        "launch_wall_s": {str(n): [round(p[n]["launch_wall_s"], 1) for p in rounds] for n in (1, 2)},
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "cuda": "not measured: no CUDA device",
        "cpus": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="sn")
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per launch")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per launch")
    parser.add_argument("--rounds", type=int, default=3, help="alternating 1-rank / 2-rank launch pairs")
    parser.add_argument("--zero", type=int, default=1, choices=(1, 2, 3),
                        help="ZeRO stage of the generator (the critic uses min(stage, 2))")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per launch")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-root", help=argparse.SUPPRESS)
    parser.add_argument("--output-root", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed print()s; stdout is for the JSON only
        if args.worker:
            worker(args)
            return 0
        result = run(args)
    from _report import emit

    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
