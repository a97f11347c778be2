"""Files and directories that readers never see half-written, output-path checks, file digests.

Every writer of a file that another process (a resuming job, a reader on another node, a user
after a crash or a full disk) may open goes through :func:`atomic_path`: the data is written to a
hidden temporary name in the same directory, flushed and fsynced, then renamed over the target
(``os.replace`` is atomic within one file system). A failure at any point removes the temporary
and leaves the previous file untouched.

Whole output directories (a packed dataset, a sample set, an evaluation report) are built
beside their target by :func:`staged_directory` and swapped in only when complete, and every
command checks its output path first with :func:`check_output_path`.

Example:
    >>> with atomic_path("runs/a/metrics.json") as tmp:   # doctest: +SKIP
    ...     tmp.write_text("{}")
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

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


# --------------------------------------------------------------------------------------------
# Output paths: checked before any work, and whole directories replaced only when complete


def check_output_path(path: str | os.PathLike, flag: str, kind: str = "directory") -> Path:
    """Refuse an output path that cannot be written, before any work is done.

    One check for every command's output (``pack --out``, ``make-phantoms --out``, ``sample
    --out``, ``evaluate --out``, ``consolidate --out``, ``pull --dest``, ``output_root``): the
    path must not be of the other kind, must not lie under a file, and the directory it will be
    written in (the path itself when it is an existing directory, otherwise its nearest existing
    ancestor; for a directory also the parent, where :func:`staged_directory` builds it) must be
    writable.

    Args:
        path: the output.
        flag: how the user named it, for the message, e.g. ``"--out"`` or ``"output_root"``.
        kind: ``"directory"`` or ``"file"``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputError: one line naming the path, what is wrong and the fix.
    """
    from hpc_gan.errors import OutputError

    path = Path(path)
    if kind == "directory" and path.exists() and not path.is_dir():
        raise OutputError(f"{flag} '{path}' is a file, not a directory; give a directory path")
    if kind == "file" and path.is_dir():
        raise OutputError(f"{flag} '{path}' is a directory; give a file path (e.g. '{path / 'generator.pt'}')")
    ancestor = path.parent.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{flag} '{path}' lies under '{ancestor}', which is a file; choose another path")
    places = [ancestor] + ([path] if kind == "directory" and path.is_dir() else [])
    for place in places:
        if not os.access(place, os.W_OK | os.X_OK):
            raise OutputError(f"{flag} '{path}': no permission to write in '{place}'; choose a writable location")
    return path


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk or the quota is full (ENOSPC, EDQUOT, also when HDF5 reports
    it only in its message)."""
    text = str(exc)
    return isinstance(exc, OSError) and (exc.errno in DISK_FULL or "No space left" in text or "Disk quota" in text)


def write_error(exc: OSError, what: str) -> Exception:
    """One-line :class:`~hpc_gan.errors.OutputError` for an ``OSError`` raised while writing ``what``.

    A full disk (ENOSPC, also when HDF5 reports it only in its message) and a full quota
    (EDQUOT) are named as such; anything else keeps its system message.
    """
    from hpc_gan.errors import OutputError

    text = str(exc)
    if disk_full(exc):
        reason = "no space left on device" if exc.errno != errno.EDQUOT else "disk quota exceeded"
        return OutputError(f"{reason} writing {what}; free space or choose another output, then run again")
    return OutputError(f"cannot write {what}: {exc.strerror or text}")


def _mode_from_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike, owned: Callable[[str], bool] = lambda name: True,
                     last: tuple[str, ...] = ()) -> Iterator[Path]:
    """Build a directory's new content beside it; put it in place only when the body succeeds.

    The body writes into a hidden staging directory ``.<name>.staging-XXXX`` in the same parent
    (so the final moves are renames on one file system). On success the target's *owned*
    entries (those ``owned(name)`` says this writer produces) are moved into a hidden
    ``.<name>.old-XXXX`` directory, the staged entries are renamed into the target, and the old
    ones are deleted; entries the writer does not own (a user's notes, a cache) stay in place. A
    missing target is created by renaming the staging directory itself (atomic). On any failure
    (an error, a full disk, Ctrl-C) the staging directory is removed and the target is untouched;
    a failure during the swap moves the old entries back.

    Args:
        target: the output directory, e.g. ``data/shards``.
        owned: whether an existing entry name belongs to the previous output and is replaced.
        last: entry names moved out first and in last (e.g. ``manifest.json``): a reader that
            sees one sees a complete directory.

    Yields:
        The staging directory to write into.

    Example:
        >>> with staged_directory("data/shards", owned=lambda n: n.endswith(".h5")) as stage:  # doctest: +SKIP
        ...     write_shards(stage)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        os.chmod(stage, _mode_from_umask())
        yield stage
        if not target.exists():
            os.rename(stage, target)
        else:
            _swap_contents(stage, target, owned, last)
        fsync_path(target.parent)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _ordered(names: list[str], last: tuple[str, ...], reverse: bool) -> list[str]:
    ordered = sorted(names, key=lambda n: (n in last, n))
    return ordered[::-1] if reverse else ordered


def _swap_contents(stage: Path, target: Path, owned: Callable[[str], bool], last: tuple[str, ...]) -> None:
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for name in _ordered([p.name for p in target.iterdir() if owned(p.name)], last, reverse=True):
            os.rename(target / name, old / name)
            moved_out.append(name)
        for name in _ordered([p.name for p in stage.iterdir()], last, reverse=False):
            if (target / name).exists():  # an entry the writer does not own has the new entry's name
                from hpc_gan.errors import OutputError

                raise OutputError(f"'{target / name}' is in the way of the new output; move it away and run again")
            os.rename(stage / name, target / name)
            moved_in.append(name)
    except BaseException:
        for name in reversed(moved_in):
            os.rename(target / name, stage / name)
        for name in reversed(moved_out):
            os.rename(old / name, target / name)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def set_aside(paths: list[str | os.PathLike]) -> Iterator[list[Path]]:
    """Move directories out of the way for a body that recreates them; delete them only if it succeeds.

    For outputs that are not written in one place at once (``submit --overwrite`` writes a run's
    config, then the job is accepted by the scheduler): each existing path is renamed to a
    hidden ``.<name>.old-XXXX`` beside it. If the body succeeds the old directories are
    deleted; if it fails, whatever the body created under the paths is removed and the old
    directories are renamed back, so a refused submission loses nothing.

    Yields:
        The paths set aside (those that existed).
    """
    moved: list[tuple[Path, Path]] = []
    try:
        for path in map(Path, paths):
            if path.exists():
                aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.rename(path, aside / path.name)
                moved.append((path, aside))
        yield [path for path, _ in moved]
    except BaseException:
        for path, aside in reversed(moved):
            shutil.rmtree(path, ignore_errors=True)
            os.rename(aside / path.name, path)
            shutil.rmtree(aside, ignore_errors=True)
        raise
    for _, aside in moved:
        shutil.rmtree(aside, ignore_errors=True)
