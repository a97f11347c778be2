#!/usr/bin/env python
"""What privacy costs per iteration: the dp trainer against the same recipe without DP-SGD (JSON).

Both sides run the dp variant's iteration (``n_critic`` critic steps with weight clipping, then a
generator step) on the same networks, batch size, data and precision (fp32, 1 rank, CPU or one GPU):

* ``dp``: :class:`hpc_gan.train.dp_trainer.DPTrainer` — Poisson batches, Opacus per-sample
  gradients, clipping and noise;
* ``plain``: the same GroupNorm critic and generator with ``torch.optim.Adam`` on fixed-size
  batches from the trainer's ``PatchLoader`` (no per-sample gradients, no noise).

Rounds alternate between the two; the figure is the median over rounds of dp / plain. There is no
target: the ratio tells users what the guarantee costs in time (Opacus' per-sample gradients of
3D convolutions unfold their inputs).

    python bench/dp_step.py [--steps 5] [--rounds 3] [--profile smoke] [--set model.ndf=64 ...]
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
import warnings
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from hpc_gan import dist  # noqa: E402
from hpc_gan.config import load_config  # noqa: E402
from hpc_gan.data.dataset import PatchLoader  # noqa: E402
from hpc_gan.privacy.dp_critic import clip_weights  # noqa: E402
from hpc_gan.train.dp_trainer import DPTrainer  # noqa: E402
from hpc_gan.train.steps import to_model_range  # noqa: E402

from _report import emit  # noqa: E402
from train_step import BareLoop, _sync, make_shards  # noqa: E402


class PlainLoop(BareLoop):
    """The dp variant's recipe without DP-SGD, in plain PyTorch (train_step.py's networks and Adams)."""

    def iteration(self, batches) -> None:
        t = self.cfg.train
        for p in self.d.parameters():
            p.requires_grad_(True)
        for _ in range(t.n_critic):
            real = to_model_range(next(batches)).to(self.device)
            with torch.no_grad():
                fake = self.g(self._latent(real.shape[0]))
            loss = self.d(fake).mean() - self.d(real).mean()
            self.opt_d.zero_grad()
            loss.backward()
            self.opt_d.step()
            clip_weights(self.d, t.weight_clip)
        for p in self.d.parameters():
            p.requires_grad_(False)
        loss_g = -self.d(self.g(self._latent(t.batch_size))).mean()
        self.opt_g.zero_grad()
        loss_g.backward()
        self.opt_g.step()


def timed(fn, steps: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def run(args: argparse.Namespace) -> dict:
    env = dist.detect({})
    overrides = ["train.num_workers=0", "privacy.secret_seeds=false", *args.set]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("dp", args.profile, overrides=overrides)
        shards = make_shards(Path(tmp), cfg.model.patch_shape)
        cfg = load_config("dp", args.profile, overrides=[*overrides, f"data.root={shards}", f"output_root={tmp}/runs"])
        trainer = DPTrainer(cfg, env)
        plain = PlainLoop(cfg, trainer.device)
        batches = iter(PatchLoader(trainer.dataset, cfg.train.batch_size, seed=1))

        def dp_iteration():
            trainer.iteration()

        def plain_iteration():
            plain.iteration(batches)

        device = trainer.device
        timed(dp_iteration, 2, device)  # warm-up both
        timed(plain_iteration, 2, device)
        rounds = [(timed(dp_iteration, args.steps, device), timed(plain_iteration, args.steps, device))
                  for _ in range(args.rounds)]
    per_sample_mb = trainer.parameters["critic"] * 4 / 2**20
    return {
        "benchmark": "dp_step", "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "profile": args.profile, "overrides": args.set,
        "patch_shape": list(cfg.model.patch_shape), "ndf": cfg.model.ndf, "ngf": cfg.model.ngf,
        "batch_size": cfg.train.batch_size, "n_critic": cfg.train.n_critic, "world_size": 1, "precision": "fp32",
        "critic_parameters": trainer.parameters["critic"], "per_sample_gradient_mb_per_sample": round(per_sample_mb, 3),
        "steps_per_round": args.steps, "rounds": args.rounds,
        "dp_iteration_ms": round(statistics.median(r[0] for r in rounds) * 1e3, 2),
        "plain_iteration_ms": round(statistics.median(r[1] for r in rounds) * 1e3, 2),
        "ratio": round(statistics.median(r[0] / r[1] for r in rounds), 3),
        "load_average": os.getloadavg()[0], "torch": torch.__version__, "cpus": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--steps", type=int, default=5, help="iterations per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = run(args)
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
