#!/usr/bin/env python
"""Step time of the two-engine DeepSpeed trainer against a bare PyTorch loop, same run (JSON).

Both sides run the same WGAN-GP iteration (critic step with the per-sample gradient penalty,
then generator step) on the same models, batch, data and precision, on one rank:

* ``trainer``: the trainer's engines (DeepSpeed ZeRO-1, world size 1) driven by
  ``hpc_gan.train.steps.train_iteration`` with batches from the trainer's ``PatchLoader``;
* ``bare``: the same networks with ``torch.optim.Adam`` and ``gradient_penalty`` in plain
  PyTorch — on CUDA in fp16 with ``torch.autocast`` and one ``GradScaler`` per network (the
  single-GPU AMP baseline; the penalty uses the scaled/unscaled recipe of the trainer).

Rounds alternate between the two so that load from other work hits both alike; the figure is
the median over rounds of the per-step time. Target: trainer / bare <= 1.15. On CUDA the JSON
also holds patches/s and the peak GPU memory of each side.

    python bench/train_step.py [--steps 20] [--rounds 5] [--variant sn] [--profile smoke]
    python bench/train_step.py --variant c_sn_mp --profile "" --steps 10     # a GPU, real size

The CUDA path was written without a GPU (none was lent so far): its first run on one is its
test (see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hpc_gan import dist  # noqa: E402
from hpc_gan.config import load_config  # noqa: E402
from hpc_gan.data import pack as packing  # noqa: E402
from hpc_gan.data.nifti import save_nifti  # noqa: E402
from hpc_gan.data.patches import SamplingPlan  # noqa: E402
from hpc_gan.models import build_critic, build_generator  # noqa: E402
from hpc_gan.train.penalty import gradient_penalty  # noqa: E402
from hpc_gan.train.steps import to_model_range, train_iteration  # noqa: E402
from hpc_gan.train.trainer import Trainer  # noqa: E402

from _report import emit  # noqa: E402


def make_shards(root: Path, patch_shape) -> Path:
    """A few noisy volumes with a vessel-like tube, packed at the profile's patch size."""
    shape = tuple(2 * p for p in patch_shape)
    rng = np.random.default_rng(0)
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    for i in range(3):
        label = np.zeros(shape, np.uint8)
        label[shape[0] // 2 - 2:shape[0] // 2 + 2, shape[1] // 2 - 2:shape[1] // 2 + 2, :] = 1
        image = rng.normal(100, 10, shape).astype(np.float32) + 200 * label
        save_nifti(image, np.eye(4), root / "images" / f"s{i}.nii.gz")
        save_nifti(label, np.eye(4), root / "labels" / f"s{i}.nii.gz")
    subjects = packing.match_subjects(root / "images", root / "labels")
    packing.pack(subjects, {"train": [s.id for s in subjects]}, root / "shards",
                 SamplingPlan(tuple(patch_shape), (2, 2, 2), 8, 0), progress=False)
    return root / "shards"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_trainer(trainer: Trainer, batches, steps: int) -> float:
    t = trainer.cfg.train
    _sync(trainer.device)
    start = time.perf_counter()
    for _ in range(steps):
        train_iteration(trainer.generator, trainer.critic, batches, trainer.rng, t.n_critic, t.gp_weight, t.gp_mode)
    _sync(trainer.device)
    return (time.perf_counter() - start) / steps


class BareLoop:
    """The paper's recipe in plain PyTorch, one process (fp16/bf16: autocast; fp16 also one
    GradScaler per network)."""

    def __init__(self, cfg, device: torch.device | str = "cpu", precision: str = "fp32") -> None:
        torch.manual_seed(cfg.train.seed)
        self.cfg, self.device = cfg, torch.device(device)
        self.amp = precision == "fp16"
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.g, self.d = build_generator(cfg.model).to(self.device), build_critic(cfg.model).to(self.device)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=cfg.train.lr_generator, betas=cfg.train.betas)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=cfg.train.lr_critic, betas=cfg.train.betas)
        self.scaler_g = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.scaler_d = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.rng = torch.Generator().manual_seed(1)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def _latent(self, n: int) -> torch.Tensor:
        return self.g.sample_latent(n, generator=self.rng, device=self.device)

    def step(self, real: torch.Tensor) -> None:
        for p in self.d.parameters():
            p.requires_grad_(True)
        with self._autocast():
            with torch.no_grad():
                fake = self.g(self._latent(real.shape[0]))
            loss = self.d(fake).float().mean() - self.d(real).float().mean()
            penalty = gradient_penalty(self.d, real, fake, generator=self.rng,
                                       scale=self.scaler_d.get_scale() if self.amp else 1.0)
            loss = loss + self.cfg.train.gp_weight * penalty
        self.opt_d.zero_grad()
        self.scaler_d.scale(loss).backward()
        self.scaler_d.step(self.opt_d)
        self.scaler_d.update()
        for p in self.d.parameters():
            p.requires_grad_(False)
        with self._autocast():
            loss_g = -self.d(self.g(self._latent(real.shape[0]))).float().mean()
        self.opt_g.zero_grad()
        self.scaler_g.scale(loss_g).backward()
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()


def time_bare(loop: BareLoop, batches, steps: int) -> float:
    _sync(loop.device)
    start = time.perf_counter()
    for _ in range(steps):
        loop.step(to_model_range(next(batches)).to(loop.device, non_blocking=True))
    _sync(loop.device)
    return (time.perf_counter() - start) / steps


def _peak_mb(device: torch.device, measure) -> tuple[float, float | None]:
    """Run ``measure()``; its result and, on CUDA, the peak memory allocated meanwhile (MB)."""
    if device.type != "cuda":
        return measure(), None
    torch.cuda.reset_peak_memory_stats(device)
    value = measure()
    return value, torch.cuda.max_memory_allocated(device) / 2**20


def run(args: argparse.Namespace) -> dict:
    env = dist.detect({})
    dist.init_process_group(env)
    cuda = torch.cuda.is_available()
    precision = args.precision or ("fp16" if cuda else "fp32")
    if precision == "fp16" and not cuda:
        raise SystemExit("error: --precision fp16 needs a CUDA device (DeepSpeed refuses fp16 on CPU); use fp32 or bf16")
    sets = [f"train.precision={precision}", "train.num_workers=0"]
    profile = args.profile or None
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.variant, profile, overrides=sets)
        shards = make_shards(Path(tmp), cfg.model.patch_shape)
        cfg = load_config(args.variant, profile, overrides=[*sets, f"data.root={shards}", f"output_root={tmp}/runs"])
        trainer = Trainer(cfg, env)
        device = trainer.device
        trainer_batches = trainer.batches
        bare_batches = iter(type(trainer.loader)(trainer.dataset, cfg.train.batch_size, seed=1))
        bare = BareLoop(cfg, device, precision)
        time_trainer(trainer, trainer_batches, 3)  # warm-up both
        time_bare(bare, bare_batches, 3)
        rounds, peaks = [], {"trainer": [], "bare": []}
        for _ in range(args.rounds):
            t_trainer, peak_trainer = _peak_mb(device, lambda: time_trainer(trainer, trainer_batches, args.steps))
            t_bare, peak_bare = _peak_mb(device, lambda: time_bare(bare, bare_batches, args.steps))
            rounds.append((t_trainer, t_bare))
            peaks["trainer"].append(peak_trainer)
            peaks["bare"].append(peak_bare)
    trainer_s = statistics.median(r[0] for r in rounds)
    bare_s = statistics.median(r[1] for r in rounds)
    ratio = statistics.median(r[0] / r[1] for r in rounds)
    patches = cfg.train.batch_size * cfg.train.n_critic
    result = {
        "benchmark": "train_step", "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "variant": args.variant, "profile": profile,
        "patch_shape": list(cfg.model.patch_shape), "batch_size": cfg.train.batch_size, "precision": precision,
        "world_size": 1, "steps_per_round": args.steps, "rounds": args.rounds,
        "trainer_step_ms": round(trainer_s * 1e3, 2), "bare_step_ms": round(bare_s * 1e3, 2),
        "trainer_patches_per_s": round(patches / trainer_s, 2), "bare_patches_per_s": round(patches / bare_s, 2),
        "ratio": round(ratio, 3), "target_ratio": 1.15, "meets_target": ratio <= 1.15,
        "torch": torch.__version__, "cpus": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if cuda:
        result["peak_memory_mb"] = {side: round(max(values), 1) for side, values in peaks.items()}
        result["cuda_path"] = "written without a GPU on 2026-11-24; check its first figures"
    else:
        result["cuda"] = "not measured: no CUDA device"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="sn")
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                        help="default: fp16 on CUDA (against an AMP baseline), fp32 on CPU")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed print()s; stdout is for the JSON only
        result = run(args)
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
