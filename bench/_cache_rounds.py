"""The node-local cache's part of bench/data_loader.py: warm and cold passes of each layout
through the trainer's loader, page-cache eviction, the memcpy ceiling, bytes per node."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hpc_gan.data.cache import CompactBatch, batch_to_device, store_bytes
from hpc_gan.data.dataset import PatchLoader

WORKER_COUNTS = (0, 1, 2, 4)
PAPER_SPLIT = (2350, (128, 128, 64))   # the paper's training patches


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass
class Layout:
    """One way of storing the split: its Dataset, the files a cold pass evicts, how it is read."""

    dataset: Dataset
    files: list[Path]
    compact: bool = False    # PatchLoader(compact=True): the cache's CompactBatch
    convert: bool = False    # also turn each batch into float32 (2, X, Y, Z) here, as a device would


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache. Only clean pages can go: written data is
    flushed first (fdatasync), then ``posix_fadvise(DONTNEED)`` (any user may do it)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(files: list[Path]) -> int | None:
    """Bytes of the files in the page cache (util-linux ``fincore``), or None without it."""
    if not shutil.which("fincore"):
        return None
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, files)],
                          capture_output=True, text=True)
    return sum(int(line) for line in done.stdout.split()) if done.returncode == 0 else None


def layout_pass(layout: Layout, batch: int, workers: int, seed: int, cold: bool) -> tuple[float, float]:
    """Patches/s of one epoch in random order through the trainer's PatchLoader: over the whole
    pass, and from the first batch on (without starting the worker processes, which an epoch
    of the paper's 2350 patches pays once per ~600 batches, this benchmark's 96 once per 24)."""
    if cold:
        if hasattr(layout.dataset, "unmap"):
            layout.dataset.unmap()          # mapped pages cannot be evicted
        evict(layout.files)
    loader = PatchLoader(layout.dataset, batch_size=batch, seed=seed, num_workers=workers, compact=layout.compact)
    start = time.perf_counter()
    batches = loader.epoch_batches()
    if layout.compact and workers:  # the same batches from DataLoader workers instead of the loader's thread
        order = loader.share.indices(0)
        chunks = [order[i:i + batch].tolist() for i in range(0, len(order) - batch + 1, batch)]
        batches = DataLoader(layout.dataset.batches(), batch_size=None, sampler=chunks, num_workers=workers)
    count, first = 0, None
    for tensor in batches:
        if layout.convert:
            tensor = batch_to_device(tensor, "cpu", torch.float32)
        count += len(tensor.image) if isinstance(tensor, CompactBatch) else len(tensor)
        if first is None:
            first = (count, time.perf_counter())
    end = time.perf_counter()
    return count / (end - start), (count - first[0]) / max(end - first[1], 1e-9)


def memcpy_ceiling(batch: int, patch_shape, seconds: float = 0.5) -> dict:
    """Copying one float32 batch (B, 2, X, Y, Z) into another buffer: what handing over a float32
    batch costs at the least (the cache moves float16 + bits instead, a quarter of the bytes)."""
    src = torch.rand((batch, 2, *patch_shape))
    dst = torch.empty_like(src)
    dst.copy_(src)
    copies, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        dst.copy_(src)
        copies += 1
    per_copy = (time.perf_counter() - start) / copies
    return {"patches_per_s": round(batch / per_copy, 1)}


def measure_cache_rounds(layouts: dict[str, Layout], args: argparse.Namespace) -> dict:
    """Every (layout, workers, warm/cold) case once per round, rounds interleaved and rotated as in
    :func:`measure_reading`; the medians of ``--repeats`` rounds. Workers 0 of the cache is the
    trainer's path (PatchLoader's prefetch thread); 1, 2, 4 hand the same batches over from
    DataLoader worker processes. Cold: the trainer's path of each layout (cache: w0, others:
    ``--workers``)."""
    cases = [(name, w, False) for name in layouts if not layouts[name].convert for w in WORKER_COUNTS]
    cases += [(name, 0, False) for name in layouts if layouts[name].convert]
    cases += [(name, 0 if layouts[name].compact else args.workers, True)
              for name in layouts if layouts[name].files and name != "cache_memory"]
    for name, layout in layouts.items():  # warm every page cache once
        layout_pass(layout, args.batch, args.workers, seed=10**6, cold=False)
    checks = {}
    for name, layout in layouts.items():
        if layout.files and name != "cache_memory":
            layout_pass(layout, args.batch, args.workers, seed=10**6, cold=False)
            before = resident_bytes(layout.files)
            if hasattr(layout.dataset, "unmap"):
                layout.dataset.unmap()
            evict(layout.files)
            checks[name] = {"resident_bytes_before": before, "resident_bytes_after_evict": resident_bytes(layout.files),
                            "file_bytes": sum(f.stat().st_size for f in layout.files)}
    passes: dict[tuple, list[tuple[float, float]]] = {case: [] for case in cases}
    copies = []
    for r in range(args.repeats):
        for case in cases[r % len(cases):] + cases[:r % len(cases)]:
            name, workers, cold = case
            passes[case].append(layout_pass(layouts[name], args.batch, workers, seed=r, cold=cold))
        copies.append(memcpy_ceiling(args.batch, args.patch_shape))     # in every round: the same load
        log(f"cache round {r + 1}/{args.repeats} done")
    float32_bytes = 8 * int(np.prod(args.patch_shape))          # (2, X, Y, Z) float32 per patch
    out = {}
    for (name, workers, cold), rates in passes.items():
        median = statistics.median(steady for _, steady in rates)
        out[f"{name}/w{workers}/{'cold' if cold else 'warm'}"] = {
            "patches_per_s": round(median, 2), "gb_per_s": round(median * float32_bytes / 1e9, 3),
            "with_worker_start_patches_per_s": round(statistics.median(total for total, _ in rates), 2),
            "passes": [round(steady, 2) for _, steady in rates]}
    rate = statistics.median(c["patches_per_s"] for c in copies)
    ceiling = {"patches_per_s": rate, "gb_per_s": round(rate * float32_bytes / 1e9, 3),
               "passes": [c["patches_per_s"] for c in copies], "threads": torch.get_num_threads()}
    return {"rates": out, "eviction_check": checks, "memcpy": ceiling}


def bytes_per_node(lzf_bytes_per_patch: int) -> dict:
    """What each data.cache mode keeps per node for the paper's split (2350 patches of 128x128x64)."""
    n, shape = PAPER_SPLIT
    half, full = store_bytes(n, shape, "float16"), store_bytes(n, shape, "float32")
    return {"patches": n, "patch_shape": list(shape),
            "none": {"node_memory_bytes": 0, "read_per_epoch_bytes": n * lzf_bytes_per_patch,
                     "note": "lzf shards (measured bytes per patch x N) read from the shared file system by each "
                             "node's ranks and decoded again every epoch; the page cache may keep what fits"},
            "memory": {"node_memory_bytes": half, "float32_image_bytes": full,
                       "note": "one store in /dev/shm per node, whatever the ranks and workers; counts against "
                               "the job's memory limit"},
            "local_disk": {"node_disk_bytes": half, "node_memory_bytes": "what the page cache holds (up to the store)",
                           "note": "when the store does not fit in memory, pages are read again from the local "
                                   "disk: the cold local_disk rate (no decode)"}}
