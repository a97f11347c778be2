"""One checkpointer of stateful parts: save them together under one tag, verify, restore.

Every part that must survive a restart is registered under a fixed key with a scope that says
who writes it and where (the layout is in :mod:`hpc_gan.train.checkpoint`):

========  =========================================  ===============================================
scope     writer -> file                             the part provides
========  =========================================  ===============================================
JSON      rank 0 -> ``state.json["parts"][key]``      ``state_dict()`` (JSON) / ``load_state_dict()``
SHARED    rank 0 -> ``<key>.pt``                      ``state_dict()`` (tensors) / ``load_state_dict()``
PER_RANK  every rank -> ``rank-RRRRR.pt``             the same, plus ``derive(step, rank, world_size)``
SHARDED   every rank, collectively -> ``<key>/``      ``save_shards(dir)`` / ``load_shards(dir)`` and
                                                     ``to_universal(dir, out)`` (rank 0)
========  =========================================  ===============================================

:meth:`Checkpointer.save` writes every part, agrees across ranks that all writes succeeded
(a full disk on any rank ends in one line naming the file, and the previous checkpoint stays the
newest), records the size and SHA-256 of every written file in ``state.json``, then rank 0
writes COMPLETE, moves ``latest`` (and ``best``) and prunes. :meth:`Checkpointer.select` picks
the newest COMPLETE checkpoint whose files all match their record — ranks hash in parallel —
falling back to older ones with one line per damaged checkpoint; it writes nothing, so a caller
can check the choice before touching the run. :meth:`Checkpointer.load` restores the parts; on
another world size SHARDED parts are converted to DeepSpeed's universal format first, PER_RANK
parts are re-seeded with ``derive`` and JSON parts get the saved world size inside their state.

Example (fake parts, one process):
    >>> cp = Checkpointer(Path("runs/a/checkpoints"), rank=0, world_size=1, keep=2)
    >>> cp.register("loop", loop, JSON); cp.register("ema", ema, SHARED)
    >>> cp.save(step=10, meta={"variant": "sn"})
    >>> point = cp.select(); cp.load(point)          # point.tag == "step-00000010"
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hpc_gan.errors import CheckpointError
from hpc_gan.io import disk_full, torch_save_atomic, write_text_atomic
from hpc_gan.train import checkpoint as ckpt

log = logging.getLogger(__name__)
JSON, SHARED, PER_RANK, SHARDED = "json", "shared", "per_rank", "sharded"
SCOPES = (SHARDED, SHARED, PER_RANK, JSON)  # load order: networks first, their companions after
FORMAT_VERSION = 2
LOW_SPACE_BYTES = 1 << 24  # torch's writers lose errno ("basic_ios::clear"): under 16 MiB free counts as full


@dataclass
class Part:
    key: str
    obj: Any
    scope: str
    optional: bool = False  # may be absent from a checkpoint (e.g. EMA turned on later): load_state_dict(None)

    def file(self, rank: int = 0) -> str:
        return ckpt.rank_file(rank) if self.scope == PER_RANK else f"{self.key}.pt"


@dataclass
class ResumePoint:
    """The checkpoint :meth:`Checkpointer.select` chose: its tag, directory and state.json."""

    tag: str
    where: Path
    state: dict
    skipped: list[str] = field(default_factory=list)  # one line per newer checkpoint found damaged
    damaged: list[str] = field(default_factory=list)  # their tags

    @property
    def world_size(self) -> int:
        return int(self.state["world_size"])

    @property
    def step(self) -> int:
        return int(self.state["step"])


class Checkpointer:
    """Saves and restores registered parts under ``root`` (``<run_dir>/checkpoints``).

    Args:
        root: the checkpoints directory.
        rank, world_size: this process and the job's number of ranks.
        keep: COMPLETE checkpoints kept by pruning (plus the one ``best`` names).
        comm: ``(gather, barrier)``; default torch.distributed when initialized, else one process.
    """

    def __init__(self, root: Path, rank: int, world_size: int, keep: int,
                 comm: tuple[Callable[[Any], list], Callable[[], None]] | None = None) -> None:
        self.root, self.rank, self.world_size, self.keep = Path(root), rank, world_size, keep
        self.parts: dict[str, Part] = {}
        self._gather, self._barrier = comm or (_gather, _barrier)
        self.converted: list[str] = []  # what the last load converted (for the job log)

    def register(self, key: str, obj: Any, scope: str, optional: bool = False) -> None:
        if scope not in SCOPES:
            raise ValueError(f"scope {scope!r} is not one of {SCOPES}")
        if key in self.parts or key in (ckpt.UNIVERSAL, "parts", ckpt.FILES):
            raise ValueError(f"checkpoint part key {key!r} is taken")
        self.parts[key] = Part(key, obj, scope, optional)

    def _of(self, scope: str) -> list[Part]:
        return [p for p in self.parts.values() if p.scope == scope]

    # ------------------------------------------------------------------ save

    def save(self, step: int, meta: dict, best: bool = False) -> Path:
        """Write every part for ``step`` with every rank (collective); returns the directory.

        ``meta``: more entries of state.json (variant, config, epoch, ...). ``best``: ``best``
        names this checkpoint afterwards.

        Raises:
            CheckpointError: a write failed on some rank (one line naming the file; the disk-full
                case says so); the partial directory is removed, the previous checkpoint stays.
        """
        tag = ckpt.tag_of(step)
        where = self.root / tag
        if (where / ckpt.COMPLETE).is_file():
            return where  # already saved at this step (e.g. stop right after a periodic save)
        self._phase(where, lambda: self._clear(where) if self.rank == 0 else None)
        self._phase(where, lambda: self._write_parts(where))
        names = ckpt.written_files(where)
        files: dict = {}
        for share in self._phase(where, lambda: ckpt.record_files(where, names[self.rank::self.world_size])):
            files.update(share)
        if self.rank == 0:
            state = {"format_version": FORMAT_VERSION, **meta, "step": step, "world_size": self.world_size,
                     "parts": {p.key: p.obj.state_dict() for p in self._of(JSON)},
                     ckpt.FILES: dict(sorted(files.items())), "saved": time.time()}
        self._phase(where, lambda: _write_json(where / ckpt.STATE, state) if self.rank == 0 else None)

        def mark() -> None:
            if self.rank == 0:
                ckpt.mark_complete(self.root, tag)
                if best:
                    ckpt.mark_best(self.root, tag)
                ckpt.prune(self.root, self.keep)

        self._phase(where, mark)
        return where

    def _clear(self, where: Path) -> None:
        """A directory of this tag without COMPLETE is a killed job's leftover: start it afresh."""
        if where.exists():
            shutil.rmtree(where)
        where.mkdir(parents=True)

    def _write_parts(self, where: Path) -> None:
        failed = None
        for part in self._of(SHARDED):  # collective: every rank saves every one, even after a failure
            try:
                part.obj.save_shards(where / part.key)
            except Exception as exc:  # noqa: BLE001 — raised after the other ranks' collectives
                failed = failed or exc
        if failed is not None:
            raise failed
        for part in self._of(SHARED):
            if self.rank == 0:
                state = part.obj.state_dict()
                if state is not None:
                    torch_save_atomic(state, where / part.file())
        for part in self._of(PER_RANK):
            torch_save_atomic(part.obj.state_dict(), where / part.file(self.rank))

    def _phase(self, where: Path, work: Callable[[], Any]) -> list:
        """Run ``work`` on every rank, then agree: if it failed anywhere, remove the partial
        checkpoint and raise the first rank's one line on every rank. Returns every rank's result."""
        try:
            outcome = ("ok", work())
        except Exception as exc:  # noqa: BLE001 — any failed write must stop all ranks together
            outcome = ("failed", write_failure(exc, where))
            log.debug("checkpoint write failed on rank %d", self.rank, exc_info=True)
        outcomes = self._gather(outcome)
        failed = [text for status, text in outcomes if status == "failed"]
        if failed:
            if self.rank == 0 and not (where / ckpt.COMPLETE).is_file():
                shutil.rmtree(where, ignore_errors=True)  # frees the space the partial checkpoint took
            self._barrier()
            intact = ckpt.newest_complete(self.root)
            raise CheckpointError(f"{failed[0]}; " + (f"checkpoint {intact} is intact" if intact else
                                                       "no checkpoint was written before") + f" in {self.root}")
        return [result for _, result in outcomes]

    # ------------------------------------------------------------------ resume

    def _set_aside(self, tags: list[str]) -> None:
        """Rename damaged checkpoints newer than the one resumed to ``<tag>.damaged`` (kept for
        inspection): the resumed run must be able to save those steps again, and neither
        ``latest`` nor pruning may count them as good."""
        for tag in tags:
            target = self.root / f"{tag}.damaged"
            n = 1
            while target.exists():
                target, n = self.root / f"{tag}.damaged-{n}", n + 1
            (self.root / tag).rename(target)
            log.warning("moved the damaged checkpoint %s to %s", tag, target.name)

    def select(self) -> ResumePoint | None:
        """The newest COMPLETE checkpoint whose state.json reads and whose files match their
        record (collective; every rank gets the same answer). Writes nothing.

        Returns:
            None when there is no COMPLETE checkpoint (a fresh start).

        Raises:
            CheckpointError: COMPLETE checkpoints exist but none is intact.
        """
        skipped, damaged, first = [], [], ""
        for tag in ckpt.resume_candidates(self.root):
            where = self.root / tag
            try:
                state = ckpt.read_state(where)
                ckpt.verify(where, state, (self.rank, self.world_size))
                problem = ""
            except CheckpointError as exc:
                state, problem = None, str(exc)
            problems = [p for p in self._gather(problem) if p]
            if not problems:
                if skipped and self.rank == 0:
                    log.warning("resuming from %s, the newest intact checkpoint", tag)
                return ResumePoint(tag, where, state, skipped, damaged)
            first = first or problems[0]
            line = f"checkpoint {tag} is damaged: {problems[0]}; falling back to the previous complete one"
            if self.rank == 0:
                log.warning("%s", line)
                print(f"warning: {line}", flush=True)
            skipped.append(line)
            damaged.append(tag)
        if skipped:
            raise CheckpointError(f"no intact checkpoint in {self.root} (newest: {first}); copy the run's "
                                  "checkpoints back or remove the directory to start over")
        return None

    def load(self, point: ResumePoint) -> None:
        """Restore every registered part from ``point`` (collective). On another world size the
        SHARDED parts are converted to DeepSpeed's universal format first (rank 0, into
        ``<tag>/universal/<key>``) and PER_RANK parts are re-seeded (``derive``).

        Raises:
            CheckpointError: a file cannot be loaded or a part does not fit (one line naming it).
        """
        where, resharded = point.where, point.world_size != self.world_size
        self.converted = []
        self._phase(where, lambda: self._set_aside(point.damaged) if self.rank == 0 else None)
        for part in self._of(SHARDED):
            source = where / part.key
            if resharded:
                out = where / ckpt.UNIVERSAL / part.key
                described = self._phase(where, lambda: part.obj.to_universal(source, out) if self.rank == 0 else None)
                self.converted.append(f"{part.key} ({described[0]})" if described[0] else part.key)
                source = out
            part.obj.load_shards(source, universal=resharded)
        for part in self._of(SHARED):
            path = where / part.file()
            if part.optional and not path.is_file():
                log.warning("%s is missing: %s starts afresh", path, part.key)
                part.obj.load_state_dict(None)
                continue
            _load_into(part, ckpt.load_torch(path, f" ({part.key})"), path)
        for part in self._of(PER_RANK):
            if resharded:
                part.obj.derive(point.step, self.rank, self.world_size)
            else:
                path = where / part.file(self.rank)
                _load_into(part, ckpt.load_torch(path, f" ({part.key})"), path)
        parts = point.state.get("parts", {})
        for part in self._of(JSON):
            # checkpoints written before parts existed kept some (the data cursor) at the top level
            saved = parts.get(part.key) if "parts" in point.state else point.state.get(part.key)
            if saved is None and not part.optional:
                raise CheckpointError(f"{where / ckpt.STATE} has no '{part.key}' state; resume from a checkpoint "
                                      "written by this version of hpc_gan")
            _load_into(part, saved, where / ckpt.STATE)


def _load_into(part: Part, state: Any, path: Path) -> None:
    try:
        part.obj.load_state_dict(state)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path} does not fit this run's {part.key} ({exc.__class__.__name__}: {first}); "
                              "resume from a checkpoint of this run") from None


class WriteFailed(Exception):
    """A write that failed inside a library's writer, with the file it was writing."""

    def __init__(self, filename: str | os.PathLike, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.filename, self.cause = str(filename), cause


def write_failure(exc: BaseException, where: Path) -> str:
    """One line for a failed checkpoint write: "no space left on device writing <file>" when the
    disk (or quota) is full, else "cannot write <file> (<error>)". torch's writers raise
    RuntimeError without errno, so little free space on ``where``'s file system counts as full."""
    filename = getattr(exc, "filename", None) or _newest_file(where) or where
    exc = exc.cause if isinstance(exc, WriteFailed) else exc
    full = disk_full(exc)
    if not full and isinstance(exc, (OSError, RuntimeError)):
        full = _free_bytes(where) < LOW_SPACE_BYTES
    if full:
        return f"no space left on device writing {filename}"
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"cannot write {filename} ({exc.__class__.__name__}: {first})"


def _newest_file(where: Path) -> Path | None:
    """The most recently modified file under ``where`` (the one being written when a writer
    that names no file failed)."""
    try:
        files = [p for p in where.rglob("*") if p.is_file()]
        return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None
    except OSError:
        return None


def _free_bytes(where: Path) -> int:
    path = where
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62


def _write_json(path: Path, state: dict) -> None:
    import json

    write_text_atomic(path, json.dumps(state, indent=1))


def _gather(obj: Any) -> list:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    from hpc_gan import dist as hdist

    hdist.barrier()


# ----------------------------------------------------------------------------------- parts


class EnginePart:
    """A DeepSpeed engine as a SHARDED part (its ZeRO shards, written by every rank)."""

    def __init__(self, engine: Any, name: str) -> None:
        self.engine, self.name = engine, name

    def save_shards(self, directory: Path) -> None:
        """DeepSpeed's collective save. A file write that fails (full disk) is held back until the
        save returns: raising inside it would leave this rank out of DeepSpeed's closing barrier
        while the others wait there, and the checkpointer's agreement could never line up."""
        writer, failures = self.engine.checkpoint_engine, []
        save = writer.save

        def holding_save(state_dict, path, *args, **kwargs):
            try:
                return save(state_dict, path, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 — re-raised below, after DeepSpeed's collectives
                failures.append(WriteFailed(path, exc))

        writer.save = holding_save
        try:
            self.engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)
        finally:
            del writer.save  # the class's method again
        if failures:
            raise failures[0]

    def load_shards(self, directory: Path, universal: bool = False) -> None:
        """Load shards (verified by :meth:`Checkpointer.select` before this call). For
        ``universal`` the engine must have been built with ``checkpoint.load_universal``."""
        if universal and not self.engine.load_universal_checkpoint():
            raise CheckpointError(f"the {self.name} engine was not built to load a universal checkpoint; "
                                  "this is a bug: the trainer sets checkpoint.load_universal on resharding")
        try:
            loaded, _ = self.engine.load_checkpoint(str(directory.parent), tag=directory.name,
                                                    load_lr_scheduler_states=False)
        except Exception as exc:  # noqa: BLE001 — deepspeed raises many types; the files were verified
            raise CheckpointError(f"{directory} could not be loaded ({exc.__class__.__name__}: "
                                  f"{(str(exc).splitlines() or [''])[0][:200]})") from None
        if loaded is None:
            raise CheckpointError(f"{directory} could not be loaded; resume from an older checkpoint")

    def to_universal(self, directory: Path, out: Path) -> str:
        """Convert this engine's ZeRO shards to DeepSpeed's universal checkpoint (fp32 weights and
        Adam moments per parameter) in ``out``; returns what it converted, e.g. "ZeRO-2, 2 ranks"."""
        import argparse
        import contextlib
        import io

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        shards = sorted(directory.glob("*optim_states.pt"))
        if out.exists():
            shutil.rmtree(out)  # a conversion left by a killed job: convert again from verified input
        args = argparse.Namespace(input_folder=str(directory), output_folder=str(out), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        chatter = io.StringIO()  # the converter prints progress bars; the job log gets one line instead
        os.environ.setdefault("TQDM_DISABLE", "1")
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal(args)
        return f"ZeRO shards of {len(shards)} ranks"


class RNGPart:
    """Each rank's RNG streams (Python, NumPy, torch, CUDA, the trainer's generator) as a
    PER_RANK part; on another world size they are seeded by
    :func:`hpc_gan.train.checkpoint.derived_rng_state` from (seed, step, rank, world size)."""

    def __init__(self, generator: Any, seed: int) -> None:
        self.generator, self.seed = generator, seed

    def state_dict(self) -> dict:
        return ckpt.rng_state(self.generator)

    def load_state_dict(self, state: dict) -> None:
        ckpt.set_rng_state(state, self.generator)

    def derive(self, step: int, rank: int, world_size: int) -> None:
        ckpt.derived_rng_state(self.seed, step, rank, world_size, self.generator)
