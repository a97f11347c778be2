"""Checkpoints written by all ranks together, marked COMPLETE last, found again on resume.

Layout of ``<run_dir>/checkpoints/``::

    step-00000300/
        generator/          DeepSpeed ZeRO shards of the generator engine (every rank writes its own)
        critic/             same for the critic engine
        rank-00000.pt ...   each rank's RNG states (Python, NumPy, torch, the trainer's generator)
        generator_buffers.pt  BatchNorm running statistics averaged over ranks (rank 0)
        generator_ema.pt    the generator's moving average when train.ema_decay > 0 (rank 0;
                            hpc_gan.train.ema: fp32 parameters, a copy of the averaged statistics)
        dp_state.pt         instead of generator/ and critic/ for the dp variant (rank 0): both
                            networks, both Adam states, the noise RNG, the critic step count
        state.json          step, epoch, data cursor, variant, resolved config, manifest hash, world size
        COMPLETE            written by rank 0 after a barrier: the checkpoint is whole
    latest                  name of the newest COMPLETE checkpoint, replaced atomically
    best                    name of the COMPLETE checkpoint with the lowest in-training FID (written
                            only when train.eval_every > 0), replaced atomically; pruning keeps it

A checkpoint without COMPLETE (a job killed while saving) is ignored on resume and deleted by
the next pruning. torch and NumPy are imported only where RNG states are handled, so the
monitoring tools that read checkpoints stay quick to start.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

from hpc_gan.errors import CheckpointError
from hpc_gan.io import write_text_atomic

COMPLETE = "COMPLETE"
LATEST = "latest"
BEST = "best"
STATE = "state.json"
BUFFERS = "generator_buffers.pt"
EMA = "generator_ema.pt"
DP_STATE = "dp_state.pt"
_TAG = re.compile(r"^step-(\d{8})$")


def tag_of(step: int) -> str:
    return f"step-{step:08d}"


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
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (root / tag / COMPLETE).is_file():
            return tag
    tags = complete_tags(root)
    return tags[-1] if tags else None


def read_state(checkpoint_dir: str | os.PathLike) -> dict:
    """The state.json of one checkpoint; CheckpointError if it is missing or not JSON."""
    path = Path(checkpoint_dir) / STATE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: '{checkpoint_dir}' is not a complete checkpoint") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is damaged ({exc}); resume from an older checkpoint") from None


def rng_state(generator) -> dict:
    """Python, NumPy, torch (and CUDA) RNG states plus the trainer's own ``torch.Generator``."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "trainer": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, generator) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["trainer"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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
    tag = pointer.read_text().strip() if pointer.is_file() else ""
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
