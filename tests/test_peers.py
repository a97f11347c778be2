"""hpc_gan.peers: which rank is gone, from exit records and process ids (no process group)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from hpc_gan.dist import process_alive
from hpc_gan import peers

pytestmark = pytest.mark.unit
HERE = socket.gethostname()


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_lost_peer_errors_are_told_from_other_runtime_errors():
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:43180. This is typically caused by a remote worker crashing.")
    assert peers.is_lost_peer(gloo)
    assert peers.is_lost_peer(RuntimeError("Read error [10.0.0.2]:1234: Connection reset by peer"))
    assert not peers.is_lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not peers.is_lost_peer(ValueError("Connection closed by peer"))


def test_a_dead_process_on_this_host_is_named_with_host_and_pid(tmp_path):
    dead = _dead_pid()
    roster = peers.Roster(0, [(HERE, os.getpid()), (HERE, dead), (HERE, os.getpid())], tmp_path / "r")
    line = roster.lost_peer_line(RuntimeError("Connection closed by peer"), grace_s=0)
    assert line == (f"rank 1 (host {HERE}, pid {dead}) is gone: its process ended without an error line (killed? "
                    "out of memory? see its log); this rank stops too")
    assert (tmp_path / "r" / "rank-00000.json").is_file()  # others learn that rank 0 was alive


def test_a_rank_that_stopped_with_its_own_error_is_quoted(tmp_path):
    stopped = peers.Roster(1, [(HERE, os.getpid()), ("node2", 2)], tmp_path / "r")
    stopped.record_exit("error", "data.root '/x' has no manifest.json")
    survivor = peers.Roster(0, stopped.ranks, tmp_path / "r")
    assert survivor.gone(grace_s=0) == ["rank 1 (host node2, pid 2) stopped: data.root '/x' has no manifest.json"]


def test_another_host_without_a_record_is_named_after_the_grace_period(tmp_path):
    roster = peers.Roster(0, [(HERE, os.getpid()), ("node2", 99), ("node3", 98)], tmp_path / "r")
    peers.Roster(2, roster.ranks, roster.records).record_exit("lost peer")  # node3's rank is alive
    sleeps = []
    assert roster.gone(grace_s=0.3, sleep=sleeps.append) == [
        "rank 1 (host node2, pid 99) stopped answering and left no exit record (killed, or its node failed? see its "
        "log on node2)"]


def test_nothing_known_says_so_in_one_line(tmp_path):
    roster = peers.Roster(0, [(HERE, os.getpid()), (HERE, os.getpid())], tmp_path / "r")  # the peer still runs
    line = roster.lost_peer_line(RuntimeError("Connection closed by peer\n[127.0.0.1]:1"), grace_s=0)
    assert line.startswith("lost contact with another rank (Connection closed by peer [127.0.0.1]:1) and could not "
                           "tell which") and "\n" not in line


def test_process_alive_counts_a_zombie_as_dead():
    assert process_alive(os.getpid()) and not process_alive(_dead_pid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(200):  # exited but not reaped: a zombie
        if open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
            break
        __import__("time").sleep(0.05)
    assert not process_alive(child.pid)
    child.wait()


def test_lost_peer_message_needs_a_gathered_roster(monkeypatch, tmp_path):
    lost = RuntimeError("Connection closed by peer [127.0.0.1]:1")
    monkeypatch.setattr(peers, "_current", None)
    assert peers.lost_peer_message(lost) is None  # never joined a group: not ours to explain
    roster = peers.Roster.gather(0)  # without a process group: this rank alone
    assert peers.current() is roster and roster.ranks == [(HERE, os.getpid())] and roster.records is None
    roster.keep_records(tmp_path)
    assert roster.records == tmp_path / "ranks" / roster.token
    assert peers.lost_peer_message(RuntimeError("shape mismatch")) is None
    assert peers.lost_peer_message(lost).startswith("rank 0: lost contact with another rank")
