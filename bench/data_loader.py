#!/usr/bin/env python
"""Data-loading benchmark: the node-local decoded cache, HDF5 shards and the paper's one-gzipped-.npy-per-patch layout.

Prints one JSON object on stdout (progress goes to stderr):

* the node-local decoded cache (``data.cache``, hpc_gan.data.cache) against the paper's layout
  and the default lzf shards, side by side in interleaved rounds: 1, 2 and 4 DataLoader workers
  on a warm page cache, and ``--workers`` on a cold one (each file of the layout evicted with
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` before every cold pass, checked with ``fincore`` where
  installed; the machine-wide ``drop_caches`` is not used); patches/s and GB/s of float32 batch
  bytes delivered, and a ``memcpy`` of the same float32 batch as the physical ceiling. Headline:
  ``cache / paper`` (target >= 10) and ``cache / memcpy`` (target >= 0.5), warm, ``--workers``;
* bytes per node of each ``data.cache`` mode for the paper's split (2350 patches of 128x128x64);
* reading throughput (patches/s) through the same torch DataLoader (same workers, batch size,
  random order) for the shards of every compression and for the baseline layout: ``speedup =
  shards (lzf, the default) / baseline``;
* packing throughput and bytes per patch of ``pack()`` for every compression;
* a single-process profile of one patch read of each format (where the time goes).

The patches come from synthetic TOF-MRA-like subjects (smooth tissue, noise, bright tubes, stored
as int16 like scanner data), because compression ratios and decode times depend on the content.
Everything is written in a temporary directory that is removed at the end.

Usage:
    python bench/data_loader.py                 # default, ~6 min on 2 cores
    python bench/data_loader.py --quick         # CI smoke run, tiny patches
    python bench/data_loader.py --out bench.json
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from hpc_gan.cli_types import shape3
from hpc_gan.data.cache import CacheSettings, open_dataset
from hpc_gan.data.dataset import PatchLoader, ShardedPatchDataset
from hpc_gan.data.nifti import save_nifti
from hpc_gan.data.pack import assign_splits, match_subjects, pack
from hpc_gan.data.patches import SamplingPlan
from hpc_gan.data.shards import COMPRESSIONS, open_shard

TARGET_SPEEDUP = 10
HEADLINE = "lzf"          # the packer's default compression
BASELINE = "baseline_gzip_npy"
LOADER_ONLY = "loader_only"   # no storage: the DataLoader's own cost, the ceiling for any format
SUBJECTS = 4
TARGET_CACHE_VS_PAPER, TARGET_CACHE_VS_MEMCPY = 10, 0.5
SPACING = (0.5, 0.5, 0.8)

from _cache_rounds import WORKER_COUNTS, Layout, bytes_per_node, log, measure_cache_rounds  # noqa: E402
from _report import emit  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--patches", type=int, default=96, help="patches in the benchmark dataset")
    p.add_argument("--patch-shape", type=shape3, default=(128, 128, 64), help="patch size X,Y,Z")
    p.add_argument("--workers", type=int, default=2,
                   help="DataLoader workers (and pack() processes)")
    p.add_argument("--batch", type=int, default=4, help="batch size")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed reading passes per format (the median is reported)")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: 32,32,16 patches, 16 of them, 2 repeats")
    p.add_argument("--tmp-dir", default=None,
                   help="parent of the temporary directory, e.g. the cluster file system the "
                        "training reads from; unset: the system temp")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.patch_shape, args.patches, args.repeats = (32, 32, 16), 16, 2
    if args.patches < args.batch or args.batch < 1 or args.workers < 0 or args.repeats < 1:
        p.error("need --batch >= 1, --patches >= --batch, --workers >= 0 and --repeats >= 1")
    return args


# ---------------------------------------------------------------- synthetic TOF-MRA subjects

def synthetic_subject(shape: tuple[int, int, int],
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An int16 image and its uint8 vessel label.

    Like TOF-MRA: dark air with magnitude noise, a head of smoothly varying grey tissue, a few
    winding bright vessels with blurred (partial-volume) edges, Gaussian noise everywhere.
    """
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radii = np.array([0.95, 0.95, 0.9])[:, None, None, None]
    head = (np.sum((grid / radii) ** 2, axis=0) < 1).astype(np.float32)
    noise = rng.normal(0, 1, shape).astype(np.float32)
    tissue = ndimage.gaussian_filter(noise, sigma=max(shape) / 25)
    tissue = head * (250 + 60 * tissue / (tissue.std() + 1e-6))
    label = vessel_tree(shape, rng) * head.astype(np.uint8)
    vessels = 550 * ndimage.gaussian_filter(label.astype(np.float32), sigma=0.7)
    image = np.abs(tissue + vessels + rng.normal(0, 25, shape))   # magnitude images are >= 0
    return np.round(image).astype(np.int16), label


def vessel_tree(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Label volume of random-walk tubes of radius 1-3 voxels (count scales with the volume)."""
    label = np.zeros(shape, np.uint8)
    tubes = max(3, round(12 * np.prod(shape) / (160 * 160 * 80)))
    for _ in range(tubes):
        point = rng.uniform(0.2, 0.8, 3) * shape
        step = rng.normal(size=3)
        radius = rng.uniform(1.0, 3.0)
        for _ in range(2 * max(shape)):
            step = step / np.linalg.norm(step) + rng.normal(scale=0.15, size=3)
            point = point + step / np.linalg.norm(step)
            if np.any(point < 0) or np.any(point >= shape):
                break
            stamp_ball(label, point, radius)
    return label


def stamp_ball(label: np.ndarray, centre: np.ndarray, radius: float) -> None:
    lo = np.maximum(np.floor(centre - radius).astype(int), 0)
    hi = np.minimum(np.ceil(centre + radius).astype(int) + 1, label.shape)
    box = np.mgrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    inside = np.sum((box - centre[:, None, None, None]) ** 2, axis=0) <= radius ** 2
    label[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] |= inside.astype(np.uint8)


def write_subjects(root: Path, volume_shape: tuple[int, int, int]) -> None:
    affine = np.diag(SPACING + (1.0,))
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(SUBJECTS):
        image, label = synthetic_subject(volume_shape, np.random.default_rng(i))
        save_nifti(image, affine, root / "images" / f"sub-{i:03d}.nii.gz")
        save_nifti(label, affine, root / "labels" / f"sub-{i:03d}_seg.nii.gz")


def sampling_plan(patch_shape: tuple[int, int, int], patches: int) -> SamplingPlan:
    """The paper's scheme (grid + vessel-centred patches), sized to give ~``patches`` in all."""
    per_subject = math.ceil(patches / SUBJECTS)
    grid = (2, 2, 2) if per_subject >= 8 else (1, 1, 1)
    return SamplingPlan(patch_shape=patch_shape, grid=grid,
                        vessel_patches=per_subject - int(np.prod(grid)), seed=0)


# ---------------------------------------------------------------- packing

def pack_all(src: Path, work: Path, plan: SamplingPlan, workers: int) -> dict:
    """pack() the subjects once per compression; time it and measure the shard bytes."""
    subjects = match_subjects(src / "images", src / "labels")
    splits = assign_splits([s.id for s in subjects], fractions=(1.0, 0.0, 0.0))  # all in train
    results = {}
    for compression in COMPRESSIONS:
        out = work / f"shards_{compression}"
        start = time.perf_counter()
        manifest = pack(subjects, splits, out, plan, compression=compression, workers=workers,
                        progress=False)
        seconds = time.perf_counter() - start
        shards = manifest["splits"]["train"]["shards"]
        n = sum(s["n"] for s in shards)
        results[compression] = {"dir": str(out), "n": n, "seconds": round(seconds, 3),
                                "patches_per_s": round(n / seconds, 2),
                                "bytes_per_patch": round(sum(s["bytes"] for s in shards) / n)}
        log(f"packed {n} patches with {compression}: {seconds:.1f} s")
    return results


def patch_locations(root: Path) -> list[tuple[Path, int]]:
    """(shard file, row) of every train patch, in the dataset's index order."""
    dataset = ShardedPatchDataset(root, "train", verify="none")
    files = [root / info.file for info in dataset.manifest.shards("train")]
    return [(files[shard], row) for shard, row in map(dataset.locate, range(len(dataset)))]


def write_baseline(shard_dir: Path, out: Path, workers: int) -> dict:
    """The paper's layout, from the same patches: <i>_img.npy.gz and <i>_lbl.npy.gz per patch."""
    out.mkdir()
    jobs = [(path, row, out / f"{i:05d}")
            for i, (path, row) in enumerate(patch_locations(shard_dir))]
    start = time.perf_counter()
    # gzip level 9 is slow: as many processes as pack() gets
    with ProcessPoolExecutor(max_workers=max(workers, 1)) as pool:
        list(pool.map(_write_baseline_patch, *zip(*jobs)))
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in out.iterdir())
    return {"dir": str(out), "n": len(jobs), "seconds": round(seconds, 3),
            "patches_per_s": round(len(jobs) / seconds, 2),
            "bytes_per_patch": round(size / len(jobs))}


def _write_baseline_patch(shard: Path, row: int, stem: Path) -> None:
    with open_shard(shard) as f:
        image, label = f["image"][row], f["label"][row]
    for suffix, array in (("_img", image), ("_lbl", label)):
        # gzip.open's default level 9, as in the paper's code
        with gzip.open(f"{stem}{suffix}.npy.gz", "wb") as handle:
            np.save(handle, array)


class GzipNpyDataset(Dataset):
    """The paper's reader: one gzipped .npy image and label per patch -> (2, X, Y, Z) float32."""

    def __init__(self, root: str | os.PathLike) -> None:
        suffix = "_img.npy.gz"
        self.stems = sorted(str(p)[: -len(suffix)] for p in Path(root).glob("*" + suffix))

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> torch.Tensor:
        with gzip.open(self.stems[index] + "_img.npy.gz", "rb") as handle:
            image = np.load(handle)
        with gzip.open(self.stems[index] + "_lbl.npy.gz", "rb") as handle:
            label = np.load(handle)
        return torch.stack([torch.from_numpy(image),
                            torch.from_numpy(label.astype(np.float32))])


class ZerosDataset(Dataset):
    """No storage at all: what the DataLoader itself costs per patch (collate, worker-to-main
    transfer through shared memory). Its rate bounds what any storage format can reach."""

    def __init__(self, n: int, patch_shape: tuple[int, int, int]) -> None:
        self.n, self.shape = n, (2,) + tuple(patch_shape)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.zeros(self.shape)


# ---------------------------------------------------------------- reading

def read_pass(dataset: Dataset, batch: int, workers: int, seed: int) -> float:
    """Patches/s of one epoch in random order, through the PatchLoader (DataLoader) training uses,
    with the same settings for every format."""
    loader = PatchLoader(dataset, batch_size=batch, seed=seed, num_workers=workers, shuffle=True,
                         drop_last=True)
    count = 0
    start = time.perf_counter()
    for tensor in loader.epoch_batches():
        count += tensor.shape[0]
    return count / (time.perf_counter() - start)


def measure_reading(datasets: dict[str, Dataset], args: argparse.Namespace) -> dict:
    """Interleaved passes: round r reads every format with seed r (the same patch order), starting
    with a different format each round, so drifts in machine load hit all formats alike. One
    untimed pass per format first warms the page cache equally."""
    names = list(datasets)
    for name in names:  # seed 10**6: an order that no timed pass uses
        read_pass(datasets[name], args.batch, args.workers, seed=10**6)
    passes: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            passes[name].append(read_pass(datasets[name], args.batch, args.workers, seed=r))
        rates = ", ".join(f"{n} {v[-1]:.1f}/s" for n, v in passes.items())
        log(f"reading round {r + 1}/{args.repeats}: {rates}")
    return {name: {"median_patches_per_s": round(statistics.median(v), 2),
                   "passes": [round(x, 2) for x in v]} for name, v in passes.items()}


def cache_layouts(packing: dict, baseline_dir: Path, work: Path) -> tuple[dict[str, Layout], dict]:
    """The paper's layout, lzf shards and the cache (local disk and /dev/shm); the build times."""
    lzf = Path(packing[HEADLINE]["dir"])
    layouts = {"paper": Layout(GzipNpyDataset(baseline_dir), sorted(baseline_dir.iterdir())),
               "lzf": Layout(ShardedPatchDataset(lzf, "train", verify="none"), sorted(lzf.glob("train-*.h5")))}
    builds = {}
    for name, settings in (("cache_local_disk", CacheSettings("local_disk", str(work / "node"))),
                           ("cache_memory", CacheSettings("memory"))):
        start = time.perf_counter()
        dataset = open_dataset(lzf, "train", "full", settings, workers=1)
        builds[name] = {"build_seconds_one_process": round(time.perf_counter() - start, 2),
                        "store_bytes": sum(f.stat().st_size for f in dataset.store.path.glob("*.npy")),
                        "path": str(dataset.store.path.parent)}
        layouts[name] = Layout(dataset, sorted(dataset.store.path.glob("*.npy")), compact=True)
    layouts["cache_memory_to_float32"] = Layout(layouts["cache_memory"].dataset, [], compact=True, convert=True)
    return layouts, builds


# ---------------------------------------------------------------- single-process profile

def profile(shard_dirs: dict[str, Path], baseline_dir: Path, patches: int = 16) -> dict:
    """Median ms per patch of each step of one read, in this process, over distinct patches (each
    HDF5 chunk is read once, as in an epoch, so the chunk cache cannot hide the decode)."""
    result = {}
    for compression, root in shard_dirs.items():
        rows = patch_locations(root)[:patches]
        steps = _with_shards(rows, _profile_shards)
        # fresh handles, so an empty chunk cache again
        steps["image_read_direct_preallocated"] = _with_shards(rows, _profile_read_direct)
        result[f"shards_{compression}"] = steps
    baseline = GzipNpyDataset(baseline_dir)
    result[BASELINE] = _profile_baseline(baseline.stems[:patches])
    return result


def _with_shards(rows: list[tuple[Path, int]], fn):
    """fn(rows, files) with every shard of ``rows`` open, as ShardedPatchDataset opens them."""
    files = {path: open_shard(path) for path in {path for path, _ in rows}}
    try:
        return fn(rows, files)
    finally:
        for f in files.values():
            f.close()


def _profile_shards(rows: list[tuple[Path, int]], files: dict) -> dict:
    steps = {key: [] for key in ("raw_chunk_read", "image_read_decode", "label_read_decode",
                                 "to_float_and_stack")}
    for path, row in rows:
        image_ds, label_ds = files[path]["image"], files[path]["label"]
        t0 = time.perf_counter()
        image_ds.id.read_direct_chunk((row, 0, 0, 0))     # the compressed bytes only: I/O cost
        t1 = time.perf_counter()
        image = image_ds[row]
        t2 = time.perf_counter()
        label = label_ds[row]
        t3 = time.perf_counter()
        _stack(image, label)
        t4 = time.perf_counter()
        for key, dt in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            steps[key].append(dt)
    return _median_ms(steps, exclude=("raw_chunk_read",))


def _profile_read_direct(rows: list[tuple[Path, int]], files: dict) -> float:
    """ms per image read straight into a preallocated array; the difference with
    ``image_read_decode`` is what allocating a fresh output array per read costs."""
    buffer = np.empty(files[rows[0][0]]["image"].shape[1:], np.float32)
    times = []
    for path, row in rows:
        start = time.perf_counter()
        files[path]["image"].read_direct(buffer, np.s_[row])
        times.append(time.perf_counter() - start)
    return round(1e3 * statistics.median(times), 3)


def _profile_baseline(stems: list[str]) -> dict:
    steps = {key: [] for key in ("raw_file_read", "image_inflate_npload", "label_inflate_npload",
                                 "to_float_and_stack")}
    for stem in stems:
        t0 = time.perf_counter()
        Path(stem + "_img.npy.gz").read_bytes()           # the compressed bytes only: I/O cost
        t1 = time.perf_counter()
        with gzip.open(stem + "_img.npy.gz", "rb") as handle:
            image = np.load(handle)
        t2 = time.perf_counter()
        with gzip.open(stem + "_lbl.npy.gz", "rb") as handle:
            label = np.load(handle)
        t3 = time.perf_counter()
        _stack(image, label)
        t4 = time.perf_counter()
        for key, dt in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            steps[key].append(dt)
    return _median_ms(steps, exclude=("raw_file_read",))


def _stack(image: np.ndarray, label: np.ndarray) -> torch.Tensor:
    """What both readers do last (see ShardedPatchDataset.__getitem__)."""
    return torch.stack([torch.from_numpy(image), torch.from_numpy(label.astype(np.float32))])


def _median_ms(steps: dict[str, list[float]], exclude: tuple) -> dict:
    # medians, not means: a busy machine adds rare long stalls that would swamp the split
    out = {key: round(1e3 * statistics.median(times), 3) for key, times in steps.items()}
    # the excluded raw read is repeated inside the decoding reads: not part of the total
    out["total"] = round(sum(v for k, v in out.items() if k not in exclude), 3)
    return out


# ---------------------------------------------------------------- report

def environment() -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
            "hdf5plugin": hdf5plugin.version, "numpy": np.__version__}


def cache_summary(args, cache: dict, builds: dict, lzf_bytes: int) -> dict:
    """The cache's headline figures against the paper's layout and the memcpy ceiling."""
    rates, ceiling = cache["rates"], cache["memcpy"]
    w = args.workers
    cached, paper = rates["cache_memory/w0/warm"]["patches_per_s"], rates[f"paper/w{w}/warm"]["patches_per_s"]
    best_paper = max(rates[f"paper/w{k}/warm"]["patches_per_s"] for k in WORKER_COUNTS)
    return {"workers": w, "cache_patches_per_s": cached, "paper_patches_per_s": paper,
            "cache_vs_paper_warm": round(cached / paper, 2), "target_cache_vs_paper": TARGET_CACHE_VS_PAPER,
            "cache_vs_best_paper_any_workers": round(cached / best_paper, 2),
            "memcpy": ceiling, "cache_vs_memcpy": round(cached / ceiling["patches_per_s"], 3),
            "target_cache_vs_memcpy": TARGET_CACHE_VS_MEMCPY,
            "meets_targets": cached / paper >= TARGET_CACHE_VS_PAPER
            and cached / ceiling["patches_per_s"] >= TARGET_CACHE_VS_MEMCPY,
            "rate": "patches/s from the first batch of a pass to its end (worker start-up excluded; "
                    "with_worker_start_patches_per_s includes it); gb_per_s = float32 batch bytes delivered",
            "page_cache_eviction": "fdatasync + posix_fadvise(POSIX_FADV_DONTNEED) on every file of the layout before each cold "
                                   "pass (not drop_caches); /dev/shm cannot be evicted, so cache_memory is warm only",
            "rates": rates, "eviction_check": cache["eviction_check"], "builds": builds,
            "bytes_per_node": bytes_per_node(lzf_bytes)}


def report(args, volume_shape, packing, baseline, reading, prof, cache: dict) -> dict:
    raw = int(np.prod(args.patch_shape)) * 5            # float32 image + uint8 label
    shards = reading[f"shards_{HEADLINE}"]["median_patches_per_s"]
    base = reading[BASELINE]["median_patches_per_s"]
    speedup = shards / base
    per_round = [sh / bl for sh, bl in zip(reading[f"shards_{HEADLINE}"]["passes"],
                                           reading[BASELINE]["passes"])]
    ceiling = reading[LOADER_ONLY]["median_patches_per_s"]
    _add_ratios(packing, baseline, reading, raw)
    note = ("smoke run: tiny patches, start-up costs dominate; the figures say nothing about "
            "speed" if args.quick else "")
    return {
        "benchmark": "data_loader",
        "note": note,
        "cache_vs_paper_warm": cache["cache_vs_paper_warm"],
        "cache_vs_memcpy": cache["cache_vs_memcpy"],
        "cache_meets_targets": cache["meets_targets"],
        "shards_compression": HEADLINE,
        "shards_patches_per_s": shards,
        "baseline_patches_per_s": base,
        "speedup": round(speedup, 2),
        "target_speedup": TARGET_SPEEDUP,
        "meets_target": speedup >= TARGET_SPEEDUP,
        "speedup_median_of_rounds": round(statistics.median(per_round), 2),
        "loader_only_patches_per_s": ceiling,
        "max_speedup_any_format": round(ceiling / base, 2),
        "settings": {"patches": packing[HEADLINE]["n"], "patch_shape": list(args.patch_shape),
                     "workers": args.workers, "batch": args.batch, "repeats": args.repeats,
                     "quick": args.quick, "subjects": SUBJECTS, "volume_shape": list(volume_shape),
                     "order": "random (PatchLoader)", "page_cache": "warm",
                     "raw_bytes_per_patch": raw},
        "environment": environment(),
        "reading": reading,
        "packing": packing,
        "baseline_layout": baseline,
        "profile_ms_per_patch": prof,
        "cache": cache,
    }


def _add_ratios(packing: dict, baseline: dict, reading: dict, raw: int) -> None:
    """Compression ratios, and each compression's reading rate next to its packing figures."""
    for compression, entry in packing.items():
        entry.pop("dir")
        entry["compression_ratio"] = round(raw / entry["bytes_per_patch"], 2)
        entry["read_patches_per_s"] = reading[f"shards_{compression}"]["median_patches_per_s"]
    baseline.pop("dir")
    baseline["compression_ratio"] = round(raw / baseline["bytes_per_patch"], 2)


def run(args: argparse.Namespace) -> dict:
    volume_shape = tuple(math.ceil(1.25 * s) for s in args.patch_shape)
    plan = sampling_plan(args.patch_shape, args.patches)
    with tempfile.TemporaryDirectory(prefix="hpc_gan_bench_", dir=args.tmp_dir) as tmp:
        work = Path(tmp)
        log(f"writing {SUBJECTS} synthetic subjects of shape {volume_shape} in {work}")
        write_subjects(work / "nifti", volume_shape)
        packing = pack_all(work / "nifti", work, plan, args.workers)
        baseline = write_baseline(Path(packing[HEADLINE]["dir"]), work / "baseline", args.workers)
        log(f"wrote the baseline layout: {baseline['seconds']:.1f} s")
        datasets: dict[str, Dataset] = {
            f"shards_{c}": ShardedPatchDataset(packing[c]["dir"], "train", verify="size")
            for c in COMPRESSIONS}
        datasets[BASELINE] = GzipNpyDataset(work / "baseline")
        datasets[LOADER_ONLY] = ZerosDataset(len(datasets[BASELINE]), args.patch_shape)
        reading = measure_reading(datasets, args)
        prof = profile({c: Path(packing[c]["dir"]) for c in COMPRESSIONS}, work / "baseline")
        for dataset in datasets.values():
            if isinstance(dataset, ShardedPatchDataset):
                dataset.close()
        layouts, builds = cache_layouts(packing, work / "baseline", work)
        try:
            cache = measure_cache_rounds(layouts, args)
        finally:
            for name in ("lzf", "cache_local_disk", "cache_memory"):
                layouts[name].dataset.close()          # the /dev/shm store goes with its last user
        summary = cache_summary(args, cache, builds, packing[HEADLINE]["bytes_per_patch"])
    return report(args, volume_shape, packing, baseline, reading, prof, summary)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return emit(run(args), args.out)


if __name__ == "__main__":
    sys.exit(main())
