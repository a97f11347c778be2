"""Run by tests/test_data_cache_mp.py under `torchrun --nproc_per_node 2` (one node, gloo).

1. Both ranks open the split through the node-local cache at once: which rank built it, and a
   digest of every patch each rank reads.
2. fp32 training on float16-exact data: 2 steps reading the shards directly and 2 steps reading
   the float16 cache give identical generator and critic weights.
Rank 0 writes report.json. Usage: cache_ranks.py DATA_ROOT WORK_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hpc_gan import dist as hdist
from hpc_gan.config import load_config
from hpc_gan.data.cache import CacheSettings, open_cached_split
from hpc_gan.train.trainer import Trainer

ENV = hdist.detect()


def gathered(value) -> list:
    out = [None] * ENV.world_size
    dist.all_gather_object(out, value)
    return out


def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in module.parameters()])


def train(data: str, out: Path, cache: str, cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    overrides = [f"data.root={data}", f"output_root={out}", "train.log_every=1", "train.image_every=0",
                 "train.eval_every=0", "train.max_steps=2", "train.precision=fp32", "train.num_workers=1",
                 f"data.cache={cache}", f"data.cache_dir={cache_dir}"]
    t = Trainer(load_config("sn", "smoke", overrides=overrides), ENV)
    t.fit()
    return flat(t.generator.module), flat(t.critic.module), type(t.dataset).__name__


def main() -> None:
    data, work = sys.argv[1], Path(sys.argv[2])
    hdist.init_process_group(ENV)
    report = {}
    ds = open_cached_split(data, "train", "full", CacheSettings("local_disk", str(work / "node")))
    digest = float(sum(ds[i].double().sum() * (i + 1) for i in range(len(ds))))
    report["open"] = gathered({"built": ds.store.built, "type": type(ds).__name__, "digest": digest,
                               "store": str(ds.store.path)})
    dist.barrier()
    ds.close()
    g_plain, d_plain, plain_type = train(data, work / "plain", "none", work / "unused")
    g_cached, d_cached, cached_type = train(data, work / "cached", "local_disk", work / "node2")
    report["training"] = {"types": [plain_type, cached_type], "generator_equal": bool(torch.equal(g_plain, g_cached)),
                          "critic_equal": bool(torch.equal(d_plain, d_cached)),
                          "generator_moved": float((g_plain - flat(load_generator_init())).abs().max())}
    if ENV.rank == 0:
        (work / "report.json").write_text(json.dumps(report))
    dist.barrier()


def load_generator_init() -> torch.nn.Module:
    from hpc_gan.models import build_generator

    torch.manual_seed(0)
    return build_generator(load_config("sn", "smoke").model)


if __name__ == "__main__":
    main()
