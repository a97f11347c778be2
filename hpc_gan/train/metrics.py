"""What a run reports: ``metrics.jsonl``, TensorBoard scalars and slices, one progress line.

metrics.jsonl holds two kinds of records: training records (losses, throughput, ... every
``train.log_every`` steps; the averaged losses are ``null`` for a window without any finite step) and evaluation records ``{"step", "eval": {...}, "best_fid", "time"}``
(every ``train.eval_every`` steps); :func:`is_eval` tells them apart.

Only rank 0 writes; every rank calls :meth:`MetricsLogger.average` so the reported losses are
means over ranks (one small all-reduce every ``log_every`` steps).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hpc_gan.io import read_jsonl, write_text_atomic

log = logging.getLogger(__name__)
AVERAGED = ("loss_critic", "loss_generator", "wasserstein", "penalty")


def peak_memory_mb() -> float:
    """Peak GPU memory allocated on this device, or the process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLogger:
    """Accumulates per-step scalars and writes them every ``log_every`` steps (rank 0 only)."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, total_steps: int, log_every: int,
                 tensorboard: bool = True) -> None:
        self.rank0 = rank == 0
        self.world_size = world_size
        self.total_steps = total_steps
        self.log_every = log_every
        self.path = run_dir / "metrics.jsonl"
        self._sums: dict[str, float] = {}
        self._count = 0
        self._window_start = time.perf_counter()
        self._window_patches = 0
        self._writer = None
        self.last_means: dict[str, float | None] = {}  # the last flushed window's averages, on every rank
        if self.rank0 and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(run_dir / "tensorboard"))

    def add(self, scalars: dict, patches: int) -> None:
        for key in AVERAGED:
            self._sums[key] = self._sums.get(key, 0.0) + float(scalars[key])
        self._count += 1
        self._window_patches += patches

    def average(self) -> dict:
        """Means of the accumulated scalars over steps and ranks (collective: call on every rank).
        None for each when the window had no finite step (ranks agree on finiteness, so on that):
        a mean of nothing is not 0."""
        values = torch.tensor([self._sums.get(k, 0.0) / max(self._count, 1) for k in AVERAGED], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(values)
            values /= self.world_size
        if self._count == 0:
            return dict.fromkeys(AVERAGED)
        return dict(zip(AVERAGED, values.tolist()))

    def flush(self, step: int, epoch: int, extra: dict) -> dict | None:
        """Average, write the record and the progress line, and start a new window."""
        means = self.last_means = self.average()
        elapsed = time.perf_counter() - self._window_start
        record = {"step": step, "epoch": epoch, **means,
                  "patches_per_s": self._window_patches * self.world_size / max(elapsed, 1e-9),
                  "peak_memory_mb": peak_memory_mb(), **extra, "time": time.time()}
        self._sums, self._count = {}, 0
        self._window_start, self._window_patches = time.perf_counter(), 0
        if not self.rank0:
            return None
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
        print(progress_line(record, self.total_steps), file=sys.stdout, flush=True)
        return record

    def evaluation(self, step: int, result: dict, best_fid: float | None) -> None:
        """Write one in-training evaluation: ``{"step", "eval": {...}, "best_fid", "time"}`` to
        metrics.jsonl, ``eval/*`` scalars to TensorBoard, one line to the log (rank 0). Its time
        (``result["seconds"]``) is left out of the throughput of the current window."""
        self._window_start += result.get("seconds") or 0.0
        if not self.rank0:
            return
        record = {"step": step, "eval": result, "best_fid": best_fid, "time": time.time()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in result.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(f"eval/{key}", value, step)
        print(eval_line(record, self.total_steps), file=sys.stdout, flush=True)

    def images(self, step: int, samples: torch.Tensor) -> None:
        """Mid-axial slices of generated samples (B, 2, X, Y, Z): image row above label row."""
        if self._writer is None:
            return
        mid = samples[:, :, :, :, samples.shape[-1] // 2].float()          # (B, 2, X, Y)
        grid = torch.cat([torch.cat(list(mid[:, c]), dim=1) for c in range(2)], dim=0)  # (2X, B*Y)
        self._writer.add_image("samples/mid_axial", ((grid + 1) / 2).clamp(0, 1).unsqueeze(0), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def progress_line(record: dict, total_steps: int) -> str:
    """The line users read in SLURM logs, e.g.
    ``step 300/20000 ep 2 | D -1.234 G 0.567 W 1.80 GP 0.012 | 12.3 patch/s | scale 65536/32768 | 512 MB``;
    the dp variant shows the epsilon spent so far instead of the penalty (``eps 2.546``); ``-`` stands for a
    loss of a window without any finite step."""
    scales = f" | scale {record['loss_scale_critic']:g}/{record['loss_scale_generator']:g}" \
        if record.get("precision") == "fp16" else ""
    skipped = f" | skipped {record['skipped_steps']}" if record.get("skipped_steps") else ""
    def f(key: str, spec: str = ".4f") -> str:
        return "-" if record.get(key) is None else format(record[key], spec)

    last = f"eps {f('epsilon', '.4g')}" if "epsilon" in record else f"GP {f('penalty')}"  # dp: privacy spent
    return (f"step {record['step']}/{total_steps} ep {record['epoch']} | D {f('loss_critic')} "
            f"G {f('loss_generator')} W {f('wasserstein')} {last} | "
            f"{record['patches_per_s']:.1f} patch/s{scales}{skipped} | {record['peak_memory_mb']:.0f} MB")


def is_eval(record: dict) -> bool:
    """An in-training evaluation record (not a training record)."""
    return "eval" in record


def eval_line(record: dict, total_steps: int) -> str:
    """The evaluation's line in the log, e.g. ``step 1000/20000 eval | FID 41.23 (best 39.80) |
    P 0.612 R 0.503 cov 0.701 | vessel-fraction KS 0.188 | contrast 0.412 (real 0.905) | 3.1 s``."""
    e = record["eval"]

    def f(key: str, spec: str = ".3f") -> str:
        return "-" if e.get(key) is None else format(e[key], spec)

    best = "-" if record.get("best_fid") is None else format(record["best_fid"], ".4g")
    return (f"step {record['step']}/{total_steps} eval | FID {f('fid', '.4g')} (best {best}) | P {f('precision')} "
            f"R {f('recall')} cov {f('coverage')} | vessel-fraction KS {f('vessel_fraction_ks')} | contrast "
            f"{f('contrast')} (real {f('contrast_real')}) | {f('seconds', '.1f')} s")


class MetricsPosition:
    """Where metrics.jsonl stands, as a checkpoint part: the step of the checkpoint.

    On resume (rank 0) the records written after that step are dropped, and so is a torn last
    line a killed job left, so that the resumed run continues one continuous log.

    Args:
        path: the run's metrics.jsonl.
        rank: this process's rank (only rank 0 rewrites the file).
        step: returns the loop's current step (what ``state_dict`` records).
    """

    def __init__(self, path: Path, rank: int, step) -> None:
        self.path, self.rank, self.step = Path(path), rank, step

    def state_dict(self) -> dict:
        return {"step": int(self.step())}

    def load_state_dict(self, state: dict | None) -> None:
        """Cut the log back to the saved step (None, from a checkpoint without this part: the
        loop's current step, i.e. the checkpoint's)."""
        if self.rank == 0:
            truncate_after(self.path, int(state["step"]) if state else int(self.step()))


def truncate_after(path: Path, step: int) -> None:
    """Keep the records of ``path`` up to ``step`` (torn or unreadable lines dropped), atomically."""
    if not path.is_file():
        return
    kept = [r for r in read_jsonl(path) if isinstance(r.get("step"), int) and r["step"] <= step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
