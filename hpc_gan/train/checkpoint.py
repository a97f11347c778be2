"""Checkpoint layout, markers, integrity records and safe loading (no DeepSpeed, no trainer).

Layout of ``<run_dir>/checkpoints/`` (what :class:`hpc_gan.train.checkpointer.Checkpointer`
writes; one file or directory per registered part)::

    step-00000300/
        generator/          DeepSpeed ZeRO shards of the generator engine (every rank writes its own)
        critic/             same for the critic engine
        rank-00000.pt ...   each rank's RNG states (Python, NumPy, torch, the trainer's generator)
        generator_buffers.pt  BatchNorm running statistics averaged over ranks (rank 0)
        generator_ema.pt    the generator's moving average when train.ema_decay > 0 (rank 0)
        dp_generator.pt     the dp variant instead of generator/ and critic/ (rank 0): network and
        dp_critic.pt        Adam state of each, whole; dp_noise.pt the noise RNG and secret seeds
        state.json          step, epoch, the JSON parts (data cursor, metrics position), variant,
                            resolved config, manifest hash, world size, and ``files``: the size and
                            SHA-256 of every other file above
        COMPLETE            written by rank 0 after a barrier: the checkpoint is whole
        universal/          made on resume by another number of ranks (DeepSpeed universal format)
    latest                  name of the newest COMPLETE checkpoint, replaced atomically
    best                    name of the COMPLETE checkpoint with the lowest in-training FID (written
                            only when train.eval_every > 0), replaced atomically; pruning keeps it

**Trusted input.** Resume, ``consolidate`` and ``pull`` read only files whose size and SHA-256
match ``state.json``'s record, and read the project's own files with
``torch.load(weights_only=True)`` (no code runs while loading them). DeepSpeed's loaders (ZeRO
shards, ``zero_to_fp32``, universal conversion) unpickle with ``weights_only=False``: the digest
check before them is what keeps a swapped or crafted shard from running code, so a checkpoint
directory is trusted exactly as far as the ``state.json`` beside it is. Checkpoints written
before records existed are loaded with a warning.

A checkpoint without COMPLETE (a job killed while saving) is ignored on resume and deleted by
the next pruning. torch and NumPy are imported only where needed, so the monitoring tools that
read checkpoints stay quick to start.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

from hpc_gan.errors import CheckpointError
from hpc_gan.io import file_sha256, write_text_atomic

COMPLETE = "COMPLETE"
LATEST = "latest"
BEST = "best"
STATE = "state.json"
BUFFERS = "generator_buffers.pt"
EMA = "generator_ema.pt"
UNIVERSAL = "universal"
FILES = "files"  # state.json key: {relative path: {"size": bytes, "sha256": hex}}
_TAG = re.compile(r"^step-(\d{8})$")
log = logging.getLogger(__name__)


class DamagedCheckpointError(CheckpointError):
    """One file of a checkpoint is missing, truncated or altered (``path`` names it)."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def tag_of(step: int) -> str:
    return f"step-{step:08d}"


def step_of(tag: str) -> int:
    match = _TAG.match(tag)
    if not match:
        raise CheckpointError(f"'{tag}' is not a checkpoint tag (step-NNNNNNNN)")
    return int(match.group(1))


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def complete_tags(root: str | os.PathLike) -> list[str]:
    """COMPLETE checkpoint tags under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if _TAG.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags)


def newest_complete(root: str | os.PathLike) -> str | None:
    """The tag to resume from: ``latest`` if it names a COMPLETE checkpoint, else the newest one."""
    candidates = resume_candidates(root)
    return candidates[0] if candidates else None


def resume_candidates(root: str | os.PathLike) -> list[str]:
    """COMPLETE tags in the order resume tries them: the one ``latest`` names, then newest first."""
    root = Path(root)
    tags = complete_tags(root)[::-1]
    pointer = root / LATEST
    if pointer.is_file():
        tag = pointer.read_text(errors="replace").strip()
        if tag in tags:
            tags.remove(tag)
            tags.insert(0, tag)
    return tags


def read_state(checkpoint_dir: str | os.PathLike) -> dict:
    """The state.json of one checkpoint; DamagedCheckpointError if it is missing or not JSON."""
    path = Path(checkpoint_dir) / STATE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise DamagedCheckpointError(f"{path} is missing: '{checkpoint_dir}' is not a complete checkpoint",
                                     path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DamagedCheckpointError(f"{path} is damaged ({exc}); resume from an older checkpoint", path) from None
    if not isinstance(state, dict):
        raise DamagedCheckpointError(f"{path} is not a checkpoint state (a JSON object)", path)
    return state


def mark_complete(root: Path, tag: str) -> None:
    """Rank 0, after every rank has written: COMPLETE, then the ``latest`` pointer."""
    write_text_atomic(root / tag / COMPLETE, "")
    write_text_atomic(root / LATEST, tag + "\n")


def mark_best(root: Path, tag: str) -> None:
    """Rank 0, after :func:`mark_complete` of ``tag``: ``best`` names it (lowest FID so far)."""
    write_text_atomic(root / BEST, tag + "\n")


def best_tag(root: str | os.PathLike) -> str | None:
    """The tag ``best`` names, if that checkpoint is COMPLETE; else None."""
    pointer = Path(root) / BEST
    tag = pointer.read_text(errors="replace").strip() if pointer.is_file() else ""
    return tag if tag and _TAG.match(tag) and (Path(root) / tag / COMPLETE).is_file() else None


def prune(root: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` COMPLETE checkpoints (and the one ``best`` names), and
    incomplete ones older than them."""
    keep_tags = complete_tags(root)[-keep:]
    oldest_kept = keep_tags[0] if keep_tags else None
    best = best_tag(root)
    removed = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not _TAG.match(path.name) or path.name in keep_tags or path.name == best:
            continue
        if (path / COMPLETE).is_file() or (oldest_kept and path.name < oldest_kept):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


# ----------------------------------------------------------------------------------- integrity


def written_files(where: Path) -> list[str]:
    """Files of a checkpoint that its record covers (relative, sorted): all but state.json,
    COMPLETE and a universal/ conversion made later."""
    names = []
    for path in sorted(where.rglob("*")):
        rel = path.relative_to(where).as_posix()
        if path.is_file() and rel not in (STATE, COMPLETE) and not rel.startswith(UNIVERSAL + "/"):
            names.append(rel)
    return names


def record_files(where: Path, names: list[str]) -> dict[str, dict]:
    """``{name: {"size", "sha256"}}`` of files under ``where``."""
    return {name: {"size": (where / name).stat().st_size, "sha256": file_sha256(where / name)} for name in names}


def check_files(where: Path, files: dict[str, dict], names: list[str] | None = None, digests: bool = True) -> None:
    """Compare files with their record (all, or ``names``); sizes of all first (cheap), then
    digests (unless ``digests`` is False).

    Raises:
        DamagedCheckpointError: naming the first file that is missing, has another size or SHA-256.
    """
    names = sorted(files) if names is None else names
    for name in names:
        path, want = where / name, files[name]
        if not path.is_file():
            raise DamagedCheckpointError(f"{path} is missing (recorded {want['size']} bytes)", path)
        size = path.stat().st_size
        if size != want["size"]:
            raise DamagedCheckpointError(f"{path} has {size} bytes, {want['size']} were written (truncated or "
                                         "replaced)", path)
    for name in names if digests else []:
        path, want = where / name, files[name]
        digest = file_sha256(path)
        if digest != want["sha256"]:
            raise DamagedCheckpointError(f"{path} has SHA-256 {digest}, {want['sha256']} was written (damaged)", path)


def verify(where: Path, state: dict, share: tuple[int, int] = (0, 1)) -> None:
    """Check this rank's share (rank, world size) of a checkpoint's recorded files.

    Files are dealt round-robin in name order, so ranks hash in parallel. Files present but not
    recorded (other than a later ``universal/``) are refused too: nothing unvouched is loaded.

    Raises:
        DamagedCheckpointError: a file differs from its record, or is not recorded.
    """
    files = state.get(FILES)
    if files is None:
        if share[0] == 0:
            log.warning("%s records no file digests (written by an older hpc_gan): loaded unverified", where / STATE)
        return
    extra = sorted(set(written_files(where)) - set(files))
    if extra:
        raise DamagedCheckpointError(f"{where / extra[0]} is not among the files {where / STATE} records (added "
                                     "after the checkpoint was written)", where / extra[0])
    rank, world = share
    check_files(where, files, sorted(files)[rank::world])


def inventory(root: str | os.PathLike, deep: bool = True) -> list[dict]:
    """One row per checkpoint under ``root`` (oldest first) for ``hpc_gan checkpoints``.

    Rows: ``tag``, ``step``, ``world_size``, ``bytes``, ``files``, ``complete``, ``latest``,
    ``best``, ``integrity`` ("ok", "unverified" without records, "incomplete", or the problem).
    ``deep=False`` compares sizes only (no hashing).
    """
    root = Path(root)
    latest = (root / LATEST).read_text(errors="replace").strip() if (root / LATEST).is_file() else None
    best = best_tag(root)
    rows = []
    for where in sorted(p for p in root.iterdir() if p.is_dir() and _TAG.match(p.name)) if root.is_dir() else []:
        complete = (where / COMPLETE).is_file()
        row = {"tag": where.name, "step": step_of(where.name), "world_size": None, "complete": complete,
               "latest": where.name == latest, "best": where.name == best,
               "bytes": sum((where / n).stat().st_size for n in written_files(where)), "files": 0}
        try:
            state = read_state(where)
            row["world_size"], row["files"] = state.get("world_size"), len(state.get(FILES) or {})
            if not complete:
                row["integrity"] = "incomplete (no COMPLETE)"
            elif state.get(FILES) is None:
                row["integrity"] = "unverified (no records)"
            else:
                files = state[FILES]
                if deep:
                    verify(where, state)
                else:
                    check_files(where, files, digests=False)
                row["integrity"] = "ok"
        except DamagedCheckpointError as exc:
            row["integrity"] = "incomplete (no COMPLETE)" if not complete else f"DAMAGED: {exc}"
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------- loading


def load_torch(path: Path, what: str = "") -> object:
    """``torch.load(weights_only=True)`` of one of the project's own files, on the CPU.

    Only tensors, numbers, strings and containers load (no code runs); the NumPy types in RNG
    states of checkpoints written before they were stored as tensors are allowed as well.

    Raises:
        DamagedCheckpointError: missing, truncated, damaged, or holding other objects.
    """
    import numpy as np
    import torch

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    legacy = [np.dtype, np.ndarray, type(np.dtype(np.uint32)), multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(legacy):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DamagedCheckpointError(f"{path} is missing{what}", path) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError... for damaged files
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise DamagedCheckpointError(f"{path} cannot be read{what} ({exc.__class__.__name__}: {first})", path) from None


def rng_state(generator) -> dict:
    """Python, NumPy, torch (and CUDA) RNG states plus the trainer's own ``torch.Generator``, as
    tensors, ints and tuples only (so the file loads with ``weights_only=True``)."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state(), "trainer": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, generator) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["trainer"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def derived_rng_state(seed: int, step: int, rank: int, world_size: int, generator) -> None:
    """Seed every RNG stream of a rank that has no saved state (resume on another number of
    ranks): Python, NumPy, torch and the trainer's generator from one NumPy ``SeedSequence`` of
    (seed, step, rank, world size) — deterministic, distinct per rank and per resume point."""
    import numpy as np
    import torch

    words = np.random.SeedSequence([seed, step, rank, world_size, 0x5EED]).generate_state(4, dtype=np.uint64)
    python, numpy_seed, torch_seed, trainer = (int(w) & (2**63 - 1) for w in words)
    random.seed(python)
    np.random.seed(numpy_seed % 2**32)
    torch.manual_seed(torch_seed)
    generator.manual_seed(trainer)
