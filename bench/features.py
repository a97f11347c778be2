#!/usr/bin/env python
"""Feature-extraction throughput with 1 rank and with 2 ranks (torchrun, gloo, CPU), same run (JSON).

Each side is one `torchrun` launch of this script in ``--worker`` mode on the same synthetic
TOF-MRA-like patches, with the MedicalNet ResNet-10 layout and its fixed-seed random weights
(the throughput does not depend on the weights). A timed pass is what the evaluator does:
``extract_features`` on the rank's share (read, MedicalNet normalisation with seeded noise,
forward) and ``gather_features`` to every rank, between two barriers. Each rank gets the same
number of threads (``--threads-per-rank``, default 1: the CPU stand-in for one GPU per rank), so
the ratio measures how the work divides over ranks. The figure is the median of ``--passes``
passes of all launches of a side, after one untimed warm-up batch per launch; start-up (imports,
rendezvous) is not timed. The launches alternate 1, 2, 2, 1, 1, 2, ... (``--rounds`` pairs), so
that load from other work on the machine hits both sides alike.

With ``--all-threads`` a further launch runs 1 rank with ``2 x --threads-per-rank`` threads,
i.e. the same cores used by intra-op threading instead of ranks.

    python bench/features.py                       # 64 patches of 64x64x32, ~1 min on 2 cores
    python bench/features.py --quick               # smoke run, 32x32x16, ~15 s
    python bench/features.py --patches 128 --rounds 3 --all-threads --out features.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hpc_gan.cli_types import shape3  # noqa: E402
from hpc_gan.dist import free_port, without_launcher_env  # noqa: E402

from _report import emit  # noqa: E402

TARGET_RATIO = 1.7


def log(message: str) -> None:
    print(f"[bench/features] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--patches", type=int, default=64, help="patches embedded per pass")
    p.add_argument("--patch-shape", type=shape3, default=(64, 64, 32), help="patch size X,Y,Z")
    p.add_argument("--batch", type=int, default=4, help="extract_features batch size")
    p.add_argument("--passes", type=int, default=2, help="timed passes per launch")
    p.add_argument("--rounds", type=int, default=2,
                   help="pairs of launches (1 rank, 2 ranks), alternating order; the median over all passes")
    p.add_argument("--threads-per-rank", type=int, default=1, help="torch intra-op threads of each rank")
    p.add_argument("--all-threads", action="store_true",
                   help="also time 1 rank with 2 x --threads-per-rank threads")
    p.add_argument("--quick", action="store_true", help="smoke run: 16 patches of 32,32,16, 1 pass, 1 round")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)   # result file of a torchrun rank
    args = p.parse_args(argv)
    if args.quick:
        args.patches, args.patch_shape, args.passes, args.rounds = 16, (32, 32, 16), 1, 1
    return args


# --------------------------------------------------------------------------- data


def synthetic_patch(index: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """A (2, X, Y, Z) TOF-MRA-like patch in [-1, 1]: noisy tissue, bright tubes, a -1 corner
    outside the "head" (MedicalNet background)."""
    rng = np.random.default_rng([0, index])
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij"))  # (3, X, Y, Z)
    image = rng.normal(0.2, 0.05, shape)
    label = np.zeros(shape, bool)
    for _ in range(3):
        centre, direction = rng.uniform(-0.6, 0.6, 3), rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        offset = grid - centre[:, None, None, None]
        along = np.tensordot(direction, offset, axes=1)
        distance = np.linalg.norm(offset - along * direction[:, None, None, None], axis=0)
        label |= distance < 0.08
    image[label] += 0.8
    outside = np.linalg.norm(grid - 1.0, axis=0) < 0.9
    image[outside] = image.min()
    image = 2 * (image - image.min()) / (image.max() - image.min()) - 1                    # min-max to [-1, 1]
    return torch.from_numpy(np.stack([image, 2.0 * label - 1]).astype(np.float32))


# --------------------------------------------------------------------------- one torchrun rank


def worker(args: argparse.Namespace) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from hpc_gan.eval.features import extract_features, gather_features
    from hpc_gan.models.resnet3d import build_extractor

    torch.set_num_threads(args.threads_per_rank)
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    dataset = [synthetic_patch(i, args.patch_shape) for i in range(args.patches)]
    model, identity = build_extractor("medicalnet_resnet10", seed=0)
    extract_features(dataset[:args.batch], model, batch_size=args.batch)          # warm-up, untimed
    times, full = [], None
    for _ in range(args.passes):
        dist.barrier()
        start = time.perf_counter()
        features, indices = extract_features(dataset, model, rank=rank, world_size=world, batch_size=args.batch)
        full = gather_features(features, indices, world)
        dist.barrier()
        times.append(time.perf_counter() - start)
    if rank == 0:
        np.save(Path(args.worker).with_suffix(".npy"), full)
        Path(args.worker).write_text(json.dumps({"world_size": world, "threads": torch.get_num_threads(),
                                                 "seconds": times, "identity": identity}))
    dist.destroy_process_group()


# --------------------------------------------------------------------------- the driver


def launch(args: argparse.Namespace, nproc: int, threads: int, work: Path) -> dict:
    result = work / f"w{nproc}_t{threads}.json"
    env = without_launcher_env()
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__,
               "--worker", str(result), "--patches", str(args.patches),
               "--patch-shape", ",".join(map(str, args.patch_shape)), "--batch", str(args.batch),
               "--passes", str(args.passes), "--threads-per-rank", str(threads)]
    log(f"{nproc} rank(s) x {threads} thread(s): {args.patches} patches of {args.patch_shape}, "
        f"{args.passes} pass(es)")
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"the {nproc}-rank launch failed (exit {done.returncode})")
    out = json.loads(result.read_text())
    out.update(features=np.load(result.with_suffix(".npy")), launch_s=time.perf_counter() - started)
    rates = [args.patches / s for s in out["seconds"]]
    log(f"  {statistics.median(rates):.2f} samples/s (median of {len(rates)}), launch {out['launch_s']:.1f} s")
    return out


def combine(args: argparse.Namespace, runs: list[dict]) -> dict:
    """The passes of all launches of one side: median rate, every pass, launch times."""
    rates = [args.patches / s for run in runs for s in run["seconds"]]
    return {"world_size": runs[0]["world_size"], "threads_per_rank": runs[0]["threads"],
            "samples_per_s": round(statistics.median(rates), 3),
            "passes_samples_per_s": [round(r, 3) for r in rates],
            "launch_s": [round(run["launch_s"], 1) for run in runs]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    load_start = os.getloadavg()  # other jobs on the cores show up here and in the pass spread
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="bench_features_") as tmp:
        for r in range(args.rounds):
            for nproc in ((1, 2) if r % 2 == 0 else (2, 1)):
                runs[nproc].append(launch(args, nproc, args.threads_per_rank, Path(tmp)))
        wide = [launch(args, 1, 2 * args.threads_per_rank, Path(tmp))] if args.all_threads else None
    one, two = combine(args, runs[1]), combine(args, runs[2])
    ratio = two["samples_per_s"] / one["samples_per_s"]
    features = [run["features"] for side in runs.values() for run in side]
    result = {
        "benchmark": "features",
        "one_rank_samples_per_s": round(one["samples_per_s"], 3),
        "two_ranks_samples_per_s": round(two["samples_per_s"], 3),
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "max_abs_diff_one_vs_two_ranks": max(float(np.abs(f - features[0]).max()) for f in features),
        "runs": {"one_rank": one, "two_ranks": two},
        "settings": {"patches": args.patches, "patch_shape": list(args.patch_shape), "batch": args.batch,
                     "passes": args.passes, "rounds": args.rounds, "threads_per_rank": args.threads_per_rank,
                     "extractor": runs[1][0]["identity"]["name"], "weights": runs[1][0]["identity"]["weights"],
                     "backend": "gloo", "device": "cpu"},
        "environment": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "load_average_1_5_15_min": {"start": [round(x, 2) for x in load_start],
                                                    "end": [round(x, 2) for x in os.getloadavg()]}},
        "note": "smoke run: the figures say nothing about speed" if args.quick else "",
    }
    if wide is not None:
        wide = combine(args, wide)
        result["one_rank_all_threads_samples_per_s"] = round(wide["samples_per_s"], 3)
        result["runs"]["one_rank_all_threads"] = wide
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
