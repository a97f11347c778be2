"""Two-rank feature extraction, run by tests/test_eval_features.py under
`python -m torch.distributed.run --nproc_per_node 2`.

Every rank embeds its share of a tiny in-memory dataset, gathers all features, and compares them
with the features one process computes alone; rank 0 writes a JSON report.
Usage: features_ranks.py REPORT_JSON
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from hpc_gan.eval.features import extract_features, gather_features
from hpc_gan.models.resnet3d import build_extractor

N_PATCHES = 7          # odd: the two ranks get 4 and 3 patches, so gathering pads one share


def tiny_dataset(n: int = N_PATCHES) -> list[torch.Tensor]:
    """(2, 16, 16, 8) patches in [-1, 1], a slab of background (-1) in each image."""
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        item = torch.rand(2, 16, 16, 8, generator=g) * 2 - 1
        item[0, : 2 + i % 4] = -1.0
        items.append(item)
    return items


def main(report_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    dataset = tiny_dataset()
    model, identity = build_extractor("medicalnet_resnet10", seed=0)
    features, indices = extract_features(dataset, model, rank=rank, world_size=world, batch_size=2, seed=3)
    gathered = gather_features(features, indices, world)
    alone, alone_indices = extract_features(dataset, model, rank=0, world_size=1, batch_size=3, seed=3)
    diff = float(np.abs(gathered - alone).max())
    shares = [None] * world
    dist.all_gather_object(shares, indices.tolist())
    if rank == 0:
        report = {"world_size": world, "shape": list(gathered.shape), "shares": shares,
                  "max_abs_diff": diff, "alone_indices": alone_indices.tolist(), "identity": identity}
        with open(report_path, "w") as handle:
            json.dump(report, handle)
    ok = diff < 1e-5 and gathered.shape == alone.shape
    print(f"{'OK' if ok else 'MISMATCH'} rank={rank} shape={gathered.shape} max_abs_diff={diff:.3g}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(sys.argv[1])
