"""One place that turns launch environments into rank, world size and master address.

Ranks are started by one of four launchers, each describing the job in its own environment
variables. :func:`detect` reads them (a pure function of the mapping, so every launcher is unit
tested with a fake environment) and :func:`export` writes the torchrun names that
``torch.distributed``'s ``env://`` initialisation and ``deepspeed.init_distributed`` read.

====================  =====================================================================
launcher              recognised by
====================  =====================================================================
``torchrun``          ``RANK`` and ``WORLD_SIZE`` (torchrun, submitit's export, a user's own)
``slurm``             ``SLURM_PROCID`` (set by ``srun`` for each task, not by ``sbatch``)
``mpi``               ``PMI_RANK``/``PMI_SIZE`` (MPICH hydra) or ``OMPI_COMM_WORLD_*`` (Open MPI)
``single``            none of these: rank 0 of 1 on 127.0.0.1, any free port
====================  =====================================================================

The first row that matches wins, so ``torchrun`` started inside an ``srun`` step uses torchrun's
ranks. Under SLURM the master is the first host of the step's node list, expanded here without
``scontrol`` so every rank computes the same answer without communication, and the master port
is derived from ``SLURM_JOB_ID`` (so array tasks sharing a node get different ports).

Multi-host MPI: MPI's environment does not name the rank-0 host. ``detect`` uses
``MASTER_ADDR`` when it is exported and 127.0.0.1 when every rank is on one host; otherwise it
raises :class:`LaunchError`. Export ``MASTER_ADDR`` or ask MPI itself::

    env = detect(dict(os.environ, MASTER_ADDR=mpi_master_addr()))

Example:
    >>> env = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
    ...               "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    ...               "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"})
    >>> (env.rank, env.world_size, env.local_rank, env.local_world_size, env.master_addr, env.master_port)
    (5, 8, 1, 4, 'gpu07', 23456)
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from datetime import timedelta
from typing import Literal, Mapping, MutableMapping

from hpc_gan.errors import LaunchError

log = logging.getLogger(__name__)

Launcher = Literal["torchrun", "slurm", "mpi", "single"]

LOCALHOST = "127.0.0.1"
DEFAULT_PORT = 29500
# One process needs no one to find its store, so it lets the kernel pick a free port: two
# single-process runs on one machine (tests, a laptop) then never collide on 29500.
SINGLE_PORT = 0
# SLURM-derived ports: 20000 + job_id % 20000 stays below the usual ephemeral range (32768+),
# where the kernel hands out client ports that could already hold the one we want.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000

_TORCHRUN_REQUIRED = ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, ``0 <= rank < world_size``.
        world_size: number of processes in the job.
        local_rank: rank among the processes on this host (selects the GPU).
        local_world_size: number of processes on this host.
        master_addr: host name or address of rank 0, where the rendezvous store listens.
        master_port: TCP port of that store.
        launcher: ``"torchrun"``, ``"slurm"``, ``"mpi"`` or ``"single"``.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: Launcher


# --------------------------------------------------------------------------------------------
# Detection


def detect(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Read rank, world size and master address from a launcher's environment.

    Args:
        environ: the environment to read (default ``os.environ``); never modified.

    Returns:
        The :class:`DistEnv` of this process.

    Raises:
        LaunchError: a variable is not an integer, a rank is not below its world size, a world
            size is below 1, a SLURM node list or tasks-per-node string cannot be parsed, or an
            MPI job spans several hosts without ``MASTER_ADDR``. The message names the variable.
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return _from_torchrun(environ)
    if "SLURM_PROCID" in environ:
        return _from_slurm(environ)
    if "OMPI_COMM_WORLD_RANK" in environ or "PMI_RANK" in environ:
        return _from_mpi(environ)
    addr = _addr(environ, "MASTER_ADDR") if "MASTER_ADDR" in environ else LOCALHOST
    return DistEnv(0, 1, 0, 1, addr, _port(environ, "MASTER_PORT", SINGLE_PORT), "single")


def _from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    missing = [name for name in _TORCHRUN_REQUIRED if name not in environ]
    if missing:
        raise LaunchError(
            f"RANK and WORLD_SIZE are set (a torchrun-style launch) but {', '.join(missing)} "
            "is missing; export all of RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, "
            "MASTER_PORT, or unset RANK and WORLD_SIZE to let SLURM/MPI detection run"
        )
    rank, world = _rank_world(environ, "RANK", "WORLD_SIZE")
    local_rank, local_world = _rank_world(environ, "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    return DistEnv(rank, world, local_rank, local_world, _addr(environ, "MASTER_ADDR"),
                   _port(environ, "MASTER_PORT", DEFAULT_PORT), "torchrun")


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    world_name = "SLURM_NTASKS" if "SLURM_NTASKS" in environ else "SLURM_NPROCS"
    rank, world = _rank_world(environ, "SLURM_PROCID", world_name)
    # The step's node list and task layout, when present, describe exactly the ranks of this
    # srun; the job's may be larger (an srun on part of an allocation).
    list_name = _first_present(environ, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    hosts = _parse(expand_hostlist, environ, list_name)
    local_rank = _int(environ, "SLURM_LOCALID", default=0)
    local_world = _slurm_local_world(environ, world, len(hosts))
    if not 0 <= local_rank < local_world:
        raise LaunchError(f"SLURM_LOCALID={local_rank} is not below the {local_world} tasks on this node")
    port = _port(environ, "MASTER_PORT", None)
    if port is None:
        job_id = _int(environ, "SLURM_JOB_ID", default=None)
        port = DEFAULT_PORT if job_id is None else SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN
    return DistEnv(rank, world, local_rank, local_world, hosts[0], port, "slurm")


def _slurm_local_world(environ: Mapping[str, str], world: int, n_hosts: int) -> int:
    """Tasks on this node: the per-node list indexed by SLURM_NODEID, else an even split."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if name in environ:
            counts = _parse(expand_tasks_per_node, environ, name)
            node = _int(environ, "SLURM_NODEID", default=0)
            if not 0 <= node < len(counts):
                raise LaunchError(f"SLURM_NODEID={node} is outside {name}={environ[name]!r} ({len(counts)} nodes)")
            return counts[node]
    if "SLURM_NTASKS_PER_NODE" in environ:
        return _int(environ, "SLURM_NTASKS_PER_NODE", minimum=1)
    return -(-world // n_hosts)


def _from_mpi(environ: Mapping[str, str]) -> DistEnv:
    if "OMPI_COMM_WORLD_RANK" in environ:
        names = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                 "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")
    else:  # MPICH's hydra
        names = ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
    rank, world = _rank_world(environ, names[0], names[1])
    # Without the local variables (old launchers) the job is taken to run on one host.
    if names[2] in environ and names[3] in environ:
        local_rank, local_world = _rank_world(environ, names[2], names[3])
    else:
        local_rank, local_world = rank, world
    if "MASTER_ADDR" in environ:
        addr = _addr(environ, "MASTER_ADDR")
    elif local_world == world:
        addr = LOCALHOST
    else:
        raise LaunchError(
            f"MPI job on several hosts ({names[3]}={local_world} < {names[1]}={world}) and MASTER_ADDR "
            "is not set; export MASTER_ADDR=<host of rank 0> or use hpc_gan.dist.mpi_master_addr()"
        )
    return DistEnv(rank, world, local_rank, local_world, addr,
                   _port(environ, "MASTER_PORT", DEFAULT_PORT), "mpi")


# --------------------------------------------------------------------------------------------
# Validated reading of single variables


def _int(environ: Mapping[str, str], name: str, default: int | None = None, minimum: int | None = None) -> int | None:
    if name not in environ:
        return default
    text = environ[name]
    try:
        value = int(text.strip())
    except ValueError:
        raise LaunchError(f"{name}={text!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise LaunchError(f"{name}={value} must be at least {minimum}")
    return value


def _rank_world(environ: Mapping[str, str], rank_name: str, world_name: str) -> tuple[int, int]:
    if world_name not in environ:
        raise LaunchError(f"{rank_name} is set but {world_name} is missing")
    world = _int(environ, world_name, minimum=1)
    rank = _int(environ, rank_name, minimum=0)
    if rank >= world:
        raise LaunchError(f"{rank_name}={rank} is not below {world_name}={world}")
    return rank, world


def _port(environ: Mapping[str, str], name: str, default: int | None) -> int | None:
    port = _int(environ, name, default=default)
    if port is not None and not 0 <= port <= 65535:
        raise LaunchError(f"{name}={port} is not a TCP port (0-65535)")
    return port


def _addr(environ: Mapping[str, str], name: str) -> str:
    addr = environ[name].strip()
    if not addr:
        raise LaunchError(f"{name} is empty; set it to the host name or address of rank 0")
    return addr


def _first_present(environ: Mapping[str, str], names: tuple[str, ...]) -> str:
    for name in names:
        if name in environ:
            return name
    raise LaunchError(f"SLURM_PROCID is set but none of {', '.join(names)} is; is this an srun task?")


def _parse(parser, environ: Mapping[str, str], name: str) -> list:
    try:
        return parser(environ[name])
    except ValueError as exc:
        raise LaunchError(f"{name}={environ[name]!r}: {exc}") from None


# --------------------------------------------------------------------------------------------
# SLURM's compressed lists


_TASKS_ITEM = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def expand_tasks_per_node(text: str) -> list[int]:
    """Expand SLURM's tasks-per-node string into one count per node.

    Args:
        text: e.g. ``"4(x2)"``, ``"2,1"`` or ``"2(x3),1"``.

    Returns:
        e.g. ``[4, 4]``, ``[2, 1]``, ``[2, 2, 2, 1]``.

    Raises:
        ValueError: the string is empty or malformed, or a count is below 1.
    """
    counts: list[int] = []
    for item in text.strip().split(","):
        match = _TASKS_ITEM.match(item.strip())
        if not match:
            raise ValueError(f"cannot parse tasks-per-node item {item!r} (expected e.g. 4 or 4(x2))")
        count, repeat = int(match.group(1)), int(match.group(2) or 1)
        if count < 1 or repeat < 1:
            raise ValueError(f"tasks-per-node item {item!r} has a count below 1")
        counts.extend([count] * repeat)
    return counts


def expand_hostlist(text: str) -> list[str]:
    """Expand a SLURM host list into host names, in order.

    Zero padding follows the range's first bound (``n[008-010]`` → ``n008 n009 n010``), and
    several bracket groups in one name expand as a product (``r[1-2]n[1-2]`` → ``r1n1 r1n2 r2n1
    r2n2``), as ``scontrol show hostnames`` does.

    Args:
        text: e.g. ``"node1"``, ``"node[1-4]"``, ``"gpu[01,03-05],cpu7"``.

    Returns:
        e.g. ``["gpu01", "gpu03", "gpu04", "gpu05", "cpu7"]``.

    Raises:
        ValueError: empty list, unbalanced brackets, or a malformed or descending range.
    """
    hosts: list[str] = []
    for item in _split_top_level(text.strip()):
        hosts.extend(_expand_host(item))
    if not hosts:
        raise ValueError("empty host list")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split at commas that are not inside brackets: ``"a[1,2],b"`` → ``["a[1,2]", "b"]``."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError("nested brackets")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError("']' without '['")
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError("'[' without ']'")
    items.append(text[start:])
    if any(not item.strip() for item in items):
        raise ValueError("empty host name")
    return [item.strip() for item in items]


def _expand_host(item: str) -> list[str]:
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    prefix, body, rest = item[:open_at], item[open_at + 1:close_at], item[close_at + 1:]
    tails = _expand_host(rest) if rest else [""]
    return [prefix + number + tail for number in _expand_ranges(body) for tail in tails]


def _expand_ranges(body: str) -> list[str]:
    """``"01,03-05"`` → ``["01", "03", "04", "05"]``, keeping the first bound's width."""
    numbers: list[str] = []
    for part in body.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {part!r} in [{body}]")
        if not sep:
            numbers.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {part!r} in [{body}]")
        numbers.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return numbers


# --------------------------------------------------------------------------------------------
# Acting on the environment


def export(env: DistEnv, environ: MutableMapping[str, str] = os.environ) -> None:
    """Write the torchrun variables that ``env://`` and ``deepspeed.init_distributed`` read.

    Args:
        env: the detected environment.
        environ: where to write (default ``os.environ``).
    """
    environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )


def mpi_master_addr() -> str:
    """Rank 0's host name, broadcast over MPI (collective: every rank must call it).

    Returns:
        The host name of MPI rank 0, e.g. ``"node017"``.

    Raises:
        ImportError: mpi4py is not installed.
    """
    from mpi4py import MPI  # imported here: importing it initialises MPI

    comm = MPI.COMM_WORLD
    return comm.bcast(socket.gethostname() if comm.Get_rank() == 0 else None, root=0)


def default_backend() -> str:
    """``"nccl"`` when CUDA GPUs are visible, else ``"gloo"``."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(env: DistEnv, backend: str | None = None, timeout_s: float = 600) -> None:
    """Export ``env``, make GPU ``local_rank`` this rank's current device under NCCL and
    initialise torch.distributed through DeepSpeed (idempotent). :func:`shutdown` runs at exit.
    The ranks then exchange host and process id (:class:`hpc_gan.peers.Roster`, collective).

    DeepSpeed's MPI discovery is turned off: :func:`detect` already read the launcher, and the
    discovery would replace the master address with rank 0's ``hostname -I``.

    Args:
        env: from :func:`detect`.
        backend: ``"nccl"``, ``"gloo"``, ...; default :func:`default_backend`.
        timeout_s: collective timeout in seconds.

    Raises:
        RuntimeError / DistNetworkError from torch when the rendezvous fails or times out.
    """
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        return
    import deepspeed  # imported here: it is slow to import and pulls in the accelerator

    export(env)
    backend = backend or default_backend()
    if backend == "nccl":
        # One GPU per rank: object collectives and code that asks for the current device (the
        # evaluator, the trainers' verdicts and seeds) would otherwise all use GPU 0 of the node.
        import torch

        torch.cuda.set_device(env.local_rank)
    log.info("init_process_group: %s launcher, rank %d of %d, master %s:%d, backend %s",
             env.launcher, env.rank, env.world_size, env.master_addr, env.master_port, backend)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_s))
    atexit.register(shutdown)  # whatever the entry point, the group is destroyed before teardown
    from hpc_gan import peers  # imported here: it imports this module

    peers.Roster.gather(env.rank)  # hosts and pids of every rank, to name one that dies (hpc_gan.peers)


def join_process_group(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """This process's place in its job, joining the process group when the job has several ranks:
    the one start of every distributed command and job that is not a trainer (``hpc_gan
    evaluate``, ``hpc_gan tstr``, the submitted evaluation and downstream-test jobs).

    Args:
        environ: the launcher's environment (default ``os.environ``), read by :func:`detect`.

    Returns:
        The :class:`DistEnv` of this process; torch.distributed is initialised when its
        ``world_size`` is above 1 (one process needs no group: collectives are skipped there).

    Raises:
        LaunchError: from :func:`detect`.
    """
    env = detect(environ)
    if env.world_size > 1:
        init_process_group(env)
    return env


def shutdown() -> None:
    """Leave the process group (destroy it) if this process joined one; every entry point that
    joins one calls this before it exits, on success and on error.

    Why: a gloo process group left to the interpreter's teardown now and then aborts the process
    after it has printed its error line and chosen its exit status ("terminate called without an
    active exception", exit 134): measured 2 of 20 two-rank runs with torch 2.13, 0 of 30 with
    this call. Destroying it is local (no collective), so a rank may call it while others still
    wait in a collective (they then fail on the closed connection).
    """
    if _initialized():
        import torch.distributed as torch_dist

        torch_dist.destroy_process_group()


def _initialized() -> bool:
    import torch.distributed as torch_dist

    return torch_dist.is_available() and torch_dist.is_initialized()


def barrier() -> None:
    """Wait for every rank; a no-op when torch.distributed is not initialised (one process)."""
    if _initialized():
        import torch.distributed as torch_dist

        torch_dist.barrier()


def is_rank0() -> bool:
    """Whether this is global rank 0: from the process group if initialised, else from the environment."""
    if _initialized():
        import torch.distributed as torch_dist

        return torch_dist.get_rank() == 0
    return detect().rank == 0


# Variables through which torchrun, srun and mpiexec tell a process its rank.
LAUNCHER_ENV_PREFIXES = ("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "GROUP_RANK", "ROLE_", "TORCHELASTIC_",
                         "SLURM_", "PMI_", "OMPI_", "MPI_LOCAL", "HYDRA_")


def without_launcher_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """A copy of ``environ`` without any launcher's rank variables, for starting a new job from
    inside one (a test or benchmark may itself run under torchrun or srun)."""
    return {k: v for k, v in environ.items() if not k.startswith(LAUNCHER_ENV_PREFIXES)}


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (another user's counts; a zombie, dead
    but not yet reaped by its launcher, does not).

    Example:
        >>> process_alive(os.getpid())
        True
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # Linux: the state letter follows the parenthesised command name
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now on this machine, for a launcher's rendezvous (torchrun needs
    a real port: with 0 each rank would pick its own)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
