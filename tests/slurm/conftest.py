"""The SLURM tier: a real single-host Slurm cluster (``tests/slurm/cluster.sh``) for the session.

Every test collected from this directory is marked ``slurm``. Tests that need the cluster ask for
``slurm_cluster`` (started once per session, stopped at its end) and put submitit logs and run
directories under ``slurm_workdir`` (readable and writable by every node and every user).

The tier skips itself unless it runs as root with ``sbatch`` or ``apt-get`` available (cluster.sh
installs Debian's packages when missing). Where it can run, a cluster that does not start is a
test failure, not a skip: CI machines have root and apt, so a failed start is a real problem.

Environment knobs (besides cluster.sh's own ``HPC_GAN_SLURM_*``):
    HPC_GAN_SLURM_START_TIMEOUT  seconds allowed for ``cluster.sh start`` (default 180)
    HPC_GAN_SLURM_KEEP=1         leave the cluster running after the session (to iterate on tests)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CLUSTER_SH = HERE / "cluster.sh"
# The same defaults as cluster.sh: both must name the same directory and cluster shape.
CLUSTER_DIR = Path(os.environ.get("HPC_GAN_SLURM_DIR", "/var/tmp/hpc_gan-slurm"))
START_TIMEOUT_S = float(os.environ.get("HPC_GAN_SLURM_START_TIMEOUT", "180"))
STOP_TIMEOUT_S = 120.0
KEEP_RUNNING = os.environ.get("HPC_GAN_SLURM_KEEP") == "1"
REFUSED = 3  # cluster.sh's exit status when it finds a SLURM configuration it did not write


@dataclass(frozen=True)
class SlurmCluster:
    """What the tests may rely on: every node idle at the start, ``sacct`` working."""

    nodes: int
    cpus_per_node: int
    partition: str
    dir: Path

    @property
    def hostnames(self) -> list[str]:
        """``hostname`` inside a job on node i prints ``node{i}``."""
        return [f"node{i}" for i in range(1, self.nodes + 1)]


def pytest_collection_modifyitems(config, items):
    # This hook sees the whole session's items: mark only those collected from this directory.
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.slurm)


def _why_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "SLURM tier needs root: tests/slurm/cluster.sh starts Slurm's daemons and jobs run as root"
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        return "SLURM tier needs Slurm installed (sbatch) or apt-get to install Debian's packages"
    return None


def _run_cluster_sh(*args: str, timeout_s: float) -> tuple[int, str]:
    """Run cluster.sh in its own process group; on timeout kill the group (apt-get, waits).

    The daemons it starts call setsid, so they survive the kill and ``stop`` can find them.
    Returns (exit status, combined output); the status is -1 after a timeout.
    """
    proc = subprocess.Popen(["bash", str(CLUSTER_SH), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -1, out + f"\n(cluster.sh {' '.join(args)} killed after {timeout_s:.0f} s)"


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _without_log_prefix(text: str) -> str:
    """cluster.sh's lines without their '[hpc_gan-slurm 12:00:00] ' prefix, on one line."""
    return " ".join(line.split("] ", 1)[-1] for line in text.splitlines())


# Several pytest sessions may share this machine (and so the one cluster). Each session holds a
# lease file named by its pid; the last one to leave stops the cluster.
@contextlib.contextmanager
def _sessions_locked():
    sessions = CLUSTER_DIR / "sessions"
    sessions.mkdir(parents=True, exist_ok=True)
    with open(sessions / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield sessions


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _other_live_sessions(sessions: Path) -> list[int]:
    others = []
    for lease in sessions.glob("[0-9]*"):
        pid = int(lease.name)
        if pid == os.getpid():
            continue
        if _pid_alive(pid):
            others.append(pid)
        else:
            lease.unlink(missing_ok=True)  # a session that crashed
    return others


def _leave_and_stop_if_last(sessions: Path) -> str:
    (sessions / str(os.getpid())).unlink(missing_ok=True)
    if KEEP_RUNNING:
        return "HPC_GAN_SLURM_KEEP=1: cluster left running"
    others = _other_live_sessions(sessions)
    if others:
        return f"cluster left running for the pytest sessions with pids {others}"
    status, out = _run_cluster_sh("stop", timeout_s=STOP_TIMEOUT_S)
    return out if status == 0 else f"cluster.sh stop failed ({status}):\n{_tail(out)}"


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-host SLURM cluster (node1..node4, accounting on) for the whole session."""
    reason = _why_unavailable()
    if reason:
        pytest.skip(reason)
    with _sessions_locked() as sessions:
        (sessions / str(os.getpid())).touch()
        status, out = _run_cluster_sh("start", timeout_s=START_TIMEOUT_S)
        if status != 0:
            stopped = _leave_and_stop_if_last(sessions)  # a partial start leaves daemons behind
            if status == REFUSED:
                pytest.skip("SLURM tier: " + _without_log_prefix(_tail(out, 2)))
            pytest.fail(f"`bash tests/slurm/cluster.sh start` failed ({status}); daemon logs in "
                        f"{CLUSTER_DIR}/log. Its output:\n{_tail(out)}\n{_tail(stopped, 5)}", pytrace=False)
    try:
        yield SlurmCluster(
            nodes=int(os.environ.get("HPC_GAN_SLURM_NODES", "4")),
            cpus_per_node=int(os.environ.get("HPC_GAN_SLURM_CPUS", "4")),
            partition=os.environ.get("HPC_GAN_SLURM_PARTITION", "debug"),
            dir=CLUSTER_DIR,
        )
    finally:
        with _sessions_locked() as sessions:
            print("\n" + _tail(_leave_and_stop_if_last(sessions), 3))


@pytest.fixture(scope="session")
def slurm_workdir(slurm_cluster, request) -> Path:
    """A directory for this session's submitit logs and run directories that every node and
    every user can read and write (the nodes share this machine's filesystem).

    Removed at the end of a session without failures; kept (and its path printed) otherwise.
    ``cluster.sh stop --purge`` removes all of them.
    """
    parent = slurm_cluster.dir / "work"
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"session-{os.getpid()}-", dir=parent))
    path.chmod(0o777)
    yield path
    if request.session.testsfailed:
        print(f"\nSLURM test logs kept in {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)
