#!/usr/bin/env python
"""Step time of the two-engine DeepSpeed trainer against a bare PyTorch loop, same run (JSON).

Both sides run the same WGAN-GP iteration (critic step with the per-sample gradient penalty,
then generator step) on the same models, batch, data and precision (fp32, 1 rank, CPU):

* ``trainer``: the trainer's engines (DeepSpeed ZeRO-1, gloo, world size 1) driven by
  ``hpc_gan.train.steps.train_iteration`` with batches from the trainer's ``PatchLoader``;
* ``bare``: the same networks with ``torch.optim.Adam`` and ``gradient_penalty`` in plain PyTorch.

Rounds alternate between the two so that load from other work hits both alike; the figure is
the median over rounds of the per-step time. Target: trainer / bare <= 1.15.

    python bench/train_step.py [--steps 20] [--rounds 5] [--variant sn] [--profile smoke]

CUDA figures (the paper's variants at 128x128x64 against a single-GPU AMP loop) are not measured
by this script yet: no GPU was available when it was written (see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
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


def time_trainer(trainer: Trainer, batches, steps: int) -> float:
    t = trainer.cfg.train
    start = time.perf_counter()
    for _ in range(steps):
        train_iteration(trainer.generator, trainer.critic, batches, trainer.rng, t.n_critic, t.gp_weight, t.gp_mode)
    return (time.perf_counter() - start) / steps


class BareLoop:
    """The paper's recipe in plain PyTorch, one process."""

    def __init__(self, cfg) -> None:
        torch.manual_seed(cfg.train.seed)
        self.cfg = cfg
        self.g, self.d = build_generator(cfg.model), build_critic(cfg.model)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=cfg.train.lr_generator, betas=cfg.train.betas)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=cfg.train.lr_critic, betas=cfg.train.betas)
        self.rng = torch.Generator().manual_seed(1)

    def step(self, real: torch.Tensor) -> None:
        for p in self.d.parameters():
            p.requires_grad_(True)
        with torch.no_grad():
            fake = self.g(self.g.sample_latent(real.shape[0], generator=self.rng))
        loss = self.d(fake).mean() - self.d(real).mean()
        loss = loss + self.cfg.train.gp_weight * gradient_penalty(self.d, real, fake, generator=self.rng)
        self.opt_d.zero_grad()
        loss.backward()
        self.opt_d.step()
        for p in self.d.parameters():
            p.requires_grad_(False)
        loss_g = -self.d(self.g(self.g.sample_latent(real.shape[0], generator=self.rng))).mean()
        self.opt_g.zero_grad()
        loss_g.backward()
        self.opt_g.step()


def time_bare(loop: BareLoop, batches, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loop.step(to_model_range(next(batches)))
    return (time.perf_counter() - start) / steps


def run(args: argparse.Namespace) -> dict:
    env = dist.detect({})
    dist.init_process_group(env)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.variant, args.profile, overrides=["train.precision=fp32", "train.num_workers=0"])
        shards = make_shards(Path(tmp), cfg.model.patch_shape)
        cfg = load_config(args.variant, args.profile, overrides=[
            "train.precision=fp32", "train.num_workers=0", f"data.root={shards}", f"output_root={tmp}/runs"])
        trainer = Trainer(cfg, env)
        trainer_batches = (to_model_range(b) for b in trainer.loader)
        bare_batches = iter(type(trainer.loader)(trainer.dataset, cfg.train.batch_size, seed=1))
        bare = BareLoop(cfg)
        time_trainer(trainer, trainer_batches, 3)  # warm-up both
        time_bare(bare, bare_batches, 3)
        rounds = []
        for _ in range(args.rounds):
            rounds.append((time_trainer(trainer, trainer_batches, args.steps), time_bare(bare, bare_batches, args.steps)))
    trainer_s = statistics.median(r[0] for r in rounds)
    bare_s = statistics.median(r[1] for r in rounds)
    ratio = statistics.median(r[0] / r[1] for r in rounds)
    return {
        "benchmark": "train_step", "device": "cpu", "variant": args.variant, "profile": args.profile,
        "patch_shape": list(cfg.model.patch_shape), "batch_size": cfg.train.batch_size, "precision": "fp32",
        "world_size": 1, "steps_per_round": args.steps, "rounds": args.rounds,
        "trainer_step_ms": round(trainer_s * 1e3, 2), "bare_step_ms": round(bare_s * 1e3, 2),
        "ratio": round(ratio, 3), "target_ratio": 1.15, "meets_target": ratio <= 1.15,
        "cuda": "not measured: no CUDA device" if not torch.cuda.is_available() else "not implemented in this script",
        "torch": torch.__version__, "cpus": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="sn")
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed print()s; stdout is for the JSON only
        result = run(args)
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
