"""FIDStatistics.all_reduce on 2 ranks (gloo), run by tests/test_eval_fid.py under torchrun.

Each rank updates with its half of a fixed dataset (rank 0 as a torch tensor in two batches,
rank 1 as a NumPy array); rank 0 writes the all-reduced statistics to OUT.npz. A second set
is updated on rank 0 only, so rank 1 must learn D from the reduction.
Usage: fid_allreduce.py OUT.npz
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist

from hpc_gan.eval.fid import FIDStatistics


def dataset() -> np.ndarray:
    return np.random.default_rng(1234).normal(0.5, 2.0, size=(300, 16))  # (N, D), shared with the test


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, world
    data = dataset()
    half = np.array_split(data, world)[rank]
    stats = FIDStatistics()
    if rank == 0:
        for batch in np.array_split(half, 2):
            stats.update(torch.from_numpy(batch))  # float64 tensor
    else:
        stats.update(half)
    stats.all_reduce()
    one_rank = FIDStatistics()
    if rank == 0:
        one_rank.update(data[:50])
    one_rank.all_reduce()
    mu, sigma = stats.mean_cov()
    mu0, sigma0 = one_rank.mean_cov()
    if rank == 0:
        np.savez(out, mu=mu, sigma=sigma, count=stats.count, mu0=mu0, sigma0=sigma0, count0=one_rank.count)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
