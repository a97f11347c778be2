"""In-training evaluation on W ranks, run by tests/test_train_evaluation_mp.py under
`python -m torch.distributed.run --nproc_per_node W` (W = 1 and 2).

The same generator weights (seeded; BatchNorm running statistics moved by seeded forwards) are
evaluated twice: the first run embeds the real patches and caches them, the second reads the
cache. Rank 0 writes both results as JSON.
Usage: eval_ranks.py DATA_ROOT WORK_DIR REPORT_JSON
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from hpc_gan.config import load_config
from hpc_gan.data.dataset import ShardedPatchDataset
from hpc_gan.models import Generator
from hpc_gan.train.evaluation import TrainingEvaluation


def main(data: str, work: str, report: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    # 7 samples: shares of 4 and 3 on 2 ranks, with batch 2 an uneven number of batches per rank
    cfg = load_config("sn", "smoke", overrides=[f"data.root={data}", "train.eval_samples=7", "train.batch_size=2",
                                                "train.eval_segmenter=true"])
    dataset = ShardedPatchDataset(data, "train", verify="none")
    torch.manual_seed(0)
    generator = Generator(cfg.model.latent_dim, cfg.model.ngf, cfg.model.patch_shape)
    with torch.no_grad():  # BatchNorm running statistics away from their initial values
        generator(generator.sample_latent(4, torch.Generator().manual_seed(1)))
    results = [TrainingEvaluation(cfg, dataset, rank, world, Path(work)).run(generator) for _ in range(2)]
    gathered = [None] * world
    dist.all_gather_object(gathered, results[0])
    if rank == 0:
        Path(report).write_text(json.dumps({"world_size": world, "results": results,
                                            "same_on_every_rank": all(g == results[0] for g in gathered)}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(*sys.argv[1:4])
