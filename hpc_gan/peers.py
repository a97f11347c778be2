"""Which rank died: when a collective fails because a peer is gone, the survivors say who.

Without this, every surviving rank of a job whose rank 1 was killed (``kill -9``, the kernel's
out-of-memory killer, a node failure) printed gloo's raw traceback (``Connection closed by peer
[10.0.0.2]:41235``) and no rank named the dead one. Now:

* when they join the process group (:func:`hpc_gan.dist.init_process_group`, so in every entry
  point: training, evaluation, the downstream test, the jobs) the ranks exchange host and process
  id (:meth:`Roster.gather`, one ``all_gather_object``); the exchange also agrees on a token that
  names this job's records;
* the trainer keeps exit records in its run directory (:meth:`Roster.keep_records`; a file system
  every rank sees, as checkpoints need): a rank that stops on its own writes its one error line to
  ``<run_dir>/ranks/<token>/rank-00001.json`` (:meth:`Roster.record_exit`);
* a rank whose collective fails (:func:`is_lost_peer`) records that it is alive, then names the
  ranks that are gone (:meth:`Roster.lost_peer_line`): a rank on this host whose process no longer
  exists is gone for certain; a rank that wrote an exit record stopped with the line it recorded;
  a rank on another host that has written no record within ``grace_s`` seconds has stopped
  answering (without records, i.e. outside training, only same-host deaths can be named). The
  survivor prints one line (``python -m hpc_gan.train``, and ``hpc_gan`` commands through
  :func:`lost_peer_message`), e.g.
  ``error: rank 0: rank 1 (host node2, pid 4711) is gone: its process ended without an error line
  (killed? out of memory? see its log); this rank stops too``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from hpc_gan.dist import process_alive
from hpc_gan.io import write_text_atomic

# What torch's gloo and NCCL backends say when a peer's connection breaks or it stops answering.
LOST_PEER_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
                     "Socket Timeout", "Timed out", "timed out", "NCCL communicator was aborted",
                     "ProcessGroupGloo", "ProcessGroupNCCL", "DistNetworkError")


_current: Roster | None = None  # set by Roster.gather


def is_lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another rank is gone or not answering."""
    dist_error = getattr(dist, "DistError", ())
    if dist_error and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in LOST_PEER_MARKERS)


@dataclass
class Roster:
    """Every rank's host and process id, and where this job's exit records go (None: nowhere)."""

    rank: int
    ranks: list[tuple[str, int]]  # (host, pid) by rank
    records: Path | None = None
    token: str = ""

    @classmethod
    def gather(cls, rank: int) -> "Roster":
        """Collective: exchange (host, pid) with every rank (this rank only, without a process
        group); the result is also what :func:`current` returns from now on."""
        global _current
        mine = (socket.gethostname(), os.getpid(), time.time_ns())
        everyone = [mine]
        if dist.is_available() and dist.is_initialized():
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        token = f"{everyone[0][2]:x}"  # rank 0's: the same name on every rank, a new one per job
        _current = cls(rank, [(host, pid) for host, pid, _ in everyone], token=token)
        return _current

    def keep_records(self, run_dir: str | os.PathLike) -> None:
        """Exchange exit records under ``run_dir/ranks/<token>/`` (a directory every rank sees)."""
        self.records = Path(run_dir) / "ranks" / (self.token or "job")

    def _path(self, rank: int) -> Path:
        return self.records / f"rank-{rank:05d}.json"

    def record_exit(self, status: str, line: str = "") -> None:
        """Leave this rank's exit record (``status`` e.g. "error", "lost peer"); never raises."""
        if self.records is None:
            return
        try:
            self.records.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self._path(self.rank), json.dumps({"status": status, "line": line, "time": time.time()}))
        except OSError:
            pass

    def _record(self, rank: int) -> dict | None:
        if self.records is None:
            return None
        try:
            return json.loads(self._path(rank).read_text())
        except (OSError, ValueError):
            return None

    def gone(self, grace_s: float = 3.0, sleep=time.sleep) -> list[str]:
        """What is known of the ranks that are gone, one phrase each (see the module docstring)."""
        here = socket.gethostname()
        deadline = time.monotonic() + grace_s
        while True:
            found, waiting, expired = [], False, time.monotonic() >= deadline
            for rank, (host, pid) in enumerate(self.ranks):
                if rank == self.rank:
                    continue
                who = f"rank {rank} (host {host}, pid {pid})"
                record = self._record(rank)
                if record and record.get("status") == "error":
                    found.append(f"{who} stopped: {record.get('line') or 'with an error'}")
                elif record:
                    continue  # alive when it lost a peer itself
                elif host == here and not process_alive(pid):
                    found.append(f"{who} is gone: its process ended without an error line (killed? out of "
                                 f"memory? see its log)")
                elif host != here and self.records is not None:
                    waiting = True
                    if expired:
                        found.append(f"{who} stopped answering and left no exit record (killed, or its node "
                                     f"failed? see its log on {host})")
            if found or not waiting or expired:
                return found
            sleep(0.2)

    def lost_peer_line(self, exc: BaseException, grace_s: float = 3.0) -> str:
        """The survivor's one line (without ``error: rank N:``) after :func:`is_lost_peer`."""
        self.record_exit("lost peer")
        gone = self.gone(grace_s)
        if gone:
            return "; ".join(gone) + "; this rank stops too"
        reason = " ".join(str(exc).split())[:200]
        return f"lost contact with another rank ({reason}) and could not tell which; see the other ranks' logs"


def current() -> Roster | None:
    """The roster this process gathered when it joined its process group, if it did."""
    return _current


def lost_peer_message(exc: BaseException) -> str | None:
    """``"rank 0: rank 1 (host ...) is gone: ..."`` when ``exc`` is a lost peer and this process
    joined a group (:func:`current`), else None (then ``exc`` is some other error)."""
    if _current is None or not is_lost_peer(exc):
        return None
    return f"rank {_current.rank}: {_current.lost_peer_line(exc)}"
