"""DP-SGD scenarios run by tests/test_privacy_dp_mp.py under `torchrun --nproc_per_node 2`.

Rank 0 writes a JSON report of what it measured; the test asserts on it.
Usage: dp_scenarios.py DATA_ROOT WORK_DIR
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from hpc_gan import dist as hdist
from hpc_gan.config import load_config
from hpc_gan.models import Critic, Generator
from hpc_gan.privacy.dp_critic import dp_critic_step, make_private_critic
from hpc_gan.train.dp_trainer import DPTrainer
from hpc_gan.train.consolidate import consolidate, load_generator

ENV = hdist.detect()
SHAPE, LATENT, LR = (32, 32, 16), 16, 1e-4


def parity() -> dict:
    """One DP critic step on 2 ranks (own real batches and fakes, noise on rank 0) against one
    process stepping on the union of both ranks' samples with the same noise draw."""
    def nets():
        torch.manual_seed(0)
        generator = Generator(latent_dim=LATENT, ngf=32, patch_shape=SHAPE, out_channels=2).eval()  # per-sample fakes
        return generator, Critic(ndf=32, patch_shape=SHAPE, norm="group")

    def private(critic, distributed):
        opt = torch.optim.Adam(critic.parameters(), lr=LR, betas=(0.0, 0.9))
        return make_private_critic(critic, opt, sample_rate=0.5, noise_multiplier=1.0, max_grad_norm=1.0,
                                   distributed=distributed, noise_generator=torch.Generator().manual_seed(7))

    def batch(rank):
        g = torch.Generator().manual_seed(100 + rank)
        return torch.rand(2 + rank, 2, *SHAPE, generator=g) * 2 - 1, torch.randn(2 + rank, LATENT, generator=g)

    generator, critic = nets()
    before = torch.cat([p.detach().flatten().clone() for p in critic.parameters()])
    shared = private(critic, distributed=True)
    real, z = batch(ENV.rank)                                              # 2 patches on rank 0, 3 on rank 1
    dp_critic_step(generator, shared, real, z, weight_clip=0.0)
    after = torch.cat([p.detach().flatten() for p in shared.critic.parameters()])

    generator, critic = nets()
    alone = private(critic, distributed=False)
    (r0, z0), (r1, z1) = batch(0), batch(1)
    dp_critic_step(generator, alone, torch.cat([r0, r1]), torch.cat([z0, z1]), weight_clip=0.0)
    single = torch.cat([p.detach().flatten() for p in alone.critic.parameters()])
    return {"max_diff_over_lr": float((after - single).abs().max()) / LR,
            "moved_over_lr": float((after - before).abs().max()) / LR}


def _trainer(data: str, out: Path, steps: int) -> DPTrainer:
    cfg = load_config("dp", "smoke", overrides=[f"data.root={data}", f"output_root={out}", "train.log_every=1",
                                                 "train.image_every=0", "data.verify=none", f"train.max_steps={steps}",
                                                 "train.checkpoint_every=2", "privacy.secret_seeds=false",
                                                 "train.eval_every=0"])
    return DPTrainer(cfg, ENV)


def _spread(tensor: torch.Tensor) -> float:
    """Largest difference of ``tensor`` between the ranks."""
    gathered = [torch.empty_like(tensor) for _ in range(ENV.world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def _records(run_dir: Path) -> list[dict]:
    if ENV.rank != 0:
        return []
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def training(data: str, work: Path) -> dict:
    """4 steps on 2 ranks; the same 4 steps as 2 + resume + 2; consolidation."""
    straight = _trainer(data, work / "straight", 4)
    straight.fit()
    critic = torch.cat([p.detach().flatten() for p in straight.private.critic.parameters()])
    generator = torch.cat([p.detach().flatten() for p in straight.generator.parameters()])
    _trainer(data, work / "split", 2).fit()
    resumed = _trainer(data, work / "split", 4)
    resumed.fit()
    path = consolidate(straight.run_dir) if ENV.rank == 0 else None
    secret = DPTrainer(load_config("dp", "smoke", overrides=[f"data.root={data}", f"output_root={work / 'secret'}",
                                                              "data.verify=none"]), ENV)
    seeds = [None] * ENV.world_size
    dist.all_gather_object(seeds, secret.sampling_seed)
    report = {"critic_spread": _spread(critic), "generator_spread": _spread(generator), "secret_seeds": seeds,
              "sample_rate": straight.sample_rate, "delta": straight.delta,
              "straight": _records(straight.run_dir), "split": _records(resumed.run_dir)}
    if path is not None:
        loaded, meta = load_generator(path, "dp")
        z = torch.randn(2, straight.cfg.model.latent_dim, generator=torch.Generator().manual_seed(0))
        straight.generator.eval()
        with torch.no_grad():
            report["consolidated_diff"] = float((loaded(z) - straight.generator(z)).abs().max())
        report["consolidated_privacy"] = meta["privacy"]
    return report


def main() -> None:
    warnings.simplefilter("ignore", UserWarning)
    data, work = sys.argv[1], Path(sys.argv[2])
    hdist.init_process_group(ENV)
    report = {"parity": parity(), "training": training(data, work)}
    if ENV.rank == 0:
        (work / "report.json").write_text(json.dumps(report, indent=1, default=str))
    dist.barrier()


if __name__ == "__main__":
    main()
