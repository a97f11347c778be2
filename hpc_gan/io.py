"""Files that readers never see half-written, and file digests.

Every writer of a file that another process (a resuming job, a reader on another node, a user
after a crash or a full disk) may open goes through :func:`atomic_path`: the data is written to a
hidden temporary name in the same directory, flushed and fsynced, then renamed over the target
(``os.replace`` is atomic within one file system). A failure at any point removes the temporary
and leaves the previous file untouched.

Example:
    >>> with atomic_path("runs/a/metrics.json") as tmp:   # doctest: +SKIP
    ...     tmp.write_text("{}")
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

CHUNK = 1 << 22  # 4 MiB reads for digests


def temporary_name(path: str | os.PathLike) -> Path:
    """Hidden name beside ``path`` unique to this process: ``dir/.name.<pid>.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a directory's) data to the storage device."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to ``path``.

    Args:
        path: the final file; its parent directories are created.
        mode: permission bits of the final file.

    Raises:
        Whatever the body raises (e.g. ``OSError`` ENOSPC on a full disk); the temporary is
        removed and an existing ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (with a final newline) atomically; returns the path."""
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically; returns the path."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def savez_atomic(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """``numpy.savez`` of name -> array to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **{name: np.asarray(a) for name, a in arrays.items()})
    return Path(path)


def file_sha256(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    """SHA-256 hex digest of a file, read in 4 MiB chunks.

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file that a killed job may have been appending to.

    A last line that does not parse (the job died mid-write, e.g. ``{"step": 15, "loss_cri``) is
    dropped; so is any other line that does not parse (logged), since one damaged record must
    not make the whole log unreadable. A missing file has no records.

    Returns:
        The parsed JSON objects, in file order.
    """
    import logging

    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    records, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif number < len(lines) - (lines[-1] == ""):  # not the torn tail: say so
            bad.append(number)
    if bad:
        logging.getLogger(__name__).warning("%s: skipped %d line(s) that are not JSON objects (first: line %d)",
                                            path, len(bad), bad[0])
    return records
