"""Launch environments → rank, world size, master address (hpc_gan.dist).

Unit tests feed :func:`detect` fake environments of each launcher. The multiprocess tests start
two real ranks, under ``mpiexec -n 2`` (MPICH from the venv) and under torchrun, and all-reduce
a tensor over gloo through :func:`init_process_group`.

The first DeepSpeed process group on a machine JIT-builds DeepSpeed's shared-memory comm op
(about 80 s on 2 cores, cached in ~/.cache/torch_extensions); a cold cache can exceed the
multiprocess tests' 120 s limit once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_gan import dist
from hpc_gan.dist import DistEnv, detect, expand_hostlist, expand_tasks_per_node, export
from hpc_gan.errors import LaunchError

REPO = Path(__file__).resolve().parent.parent

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node1", "MASTER_PORT": "29400"}
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
         "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_TASKS_PER_NODE": "4(x2)",
         "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
HYDRA = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
OMPI = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}


def fields(env: DistEnv) -> tuple:
    return (env.rank, env.world_size, env.local_rank, env.local_world_size, env.master_addr,
            env.master_port, env.launcher)


# --------------------------------------------------------------------------------------------
# Each launcher


@pytest.mark.unit
def test_torchrun_variables_are_used_as_given():
    assert fields(detect(TORCHRUN)) == (3, 8, 1, 2, "node1", 29400, "torchrun")


@pytest.mark.unit
def test_torchrun_partial_variables_name_what_is_missing():
    with pytest.raises(LaunchError, match="LOCAL_WORLD_SIZE, MASTER_ADDR"):
        detect({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "1"})


@pytest.mark.unit
def test_slurm_step_master_is_first_host_and_port_from_job_id():
    assert fields(detect(SLURM)) == (5, 8, 1, 4, "gpu07", 20000 + 123456 % 20000, "slurm")


@pytest.mark.unit
def test_slurm_master_port_variable_wins_over_job_id():
    assert detect({**SLURM, "MASTER_PORT": "31000"}).master_port == 31000


@pytest.mark.unit
def test_slurm_step_nodelist_wins_over_job_nodelist():
    env = {**SLURM, "SLURM_STEP_NODELIST": "gpu08", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_NTASKS": "4", "SLURM_PROCID": "1", "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "4"}
    assert detect(env).master_addr == "gpu08"
    del env["SLURM_STEP_NODELIST"]
    assert detect(env).master_addr == "gpu07"


@pytest.mark.unit
@pytest.mark.parametrize("variables, node, expected", [
    ({"SLURM_TASKS_PER_NODE": "2,1"}, "1", 1),
    ({"SLURM_TASKS_PER_NODE": "2(x2),1"}, "1", 2),
    ({"SLURM_NTASKS_PER_NODE": "3"}, "0", 3),
    ({}, "0", 2),                       # no layout: 5 tasks over 3 hosts, rounded up
])
def test_slurm_local_world_size_from_each_tasks_per_node_form(variables, node, expected):
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "5", "SLURM_LOCALID": "0", "SLURM_NODEID": node,
           "SLURM_JOB_NODELIST": "n[1-3]", **variables}
    assert detect(env).local_world_size == expected


@pytest.mark.unit
def test_slurm_without_job_id_or_port_uses_default_port():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_ID"}
    assert detect(env).master_port == dist.DEFAULT_PORT


@pytest.mark.unit
def test_mpich_hydra_on_one_host_uses_localhost():
    assert fields(detect(HYDRA)) == (1, 2, 1, 2, "127.0.0.1", 29500, "mpi")


@pytest.mark.unit
def test_open_mpi_uses_exported_master_addr_across_hosts():
    env = detect({**OMPI, "MASTER_ADDR": "n01", "MASTER_PORT": "12345"})
    assert fields(env) == (2, 4, 0, 2, "n01", 12345, "mpi")


@pytest.mark.unit
def test_multi_host_mpi_without_master_addr_is_refused():
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        detect(OMPI)


@pytest.mark.unit
def test_mpi_without_local_variables_assumes_one_host():
    assert fields(detect({"PMI_RANK": "0", "PMI_SIZE": "3"})) == (0, 3, 0, 3, "127.0.0.1", 29500, "mpi")


@pytest.mark.unit
def test_no_launcher_is_a_single_process():
    env = detect({})
    assert fields(env) == (0, 1, 0, 1, "127.0.0.1", dist.SINGLE_PORT, "single")
    assert detect({"MASTER_PORT": "4000"}).master_port == 4000


@pytest.mark.unit
def test_without_launcher_env_drops_every_launchers_rank_variables():
    environ = {**TORCHRUN, "SLURM_PROCID": "1", "PMI_RANK": "0", "OMPI_COMM_WORLD_RANK": "2", "PATH": "/bin",
               "HOME": "/root"}
    assert dist.without_launcher_env(environ) == {"PATH": "/bin", "HOME": "/root"}


@pytest.mark.unit
def test_detect_reads_os_environ_by_default(monkeypatch):
    for name in set(os.environ) - set(dist.without_launcher_env()):
        monkeypatch.delenv(name)
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("PMI_SIZE", "1")
    assert detect().launcher == "mpi"
    assert dist.is_rank0()


# --------------------------------------------------------------------------------------------
# Precedence


@pytest.mark.unit
def test_torchrun_inside_srun_wins_over_slurm():
    assert detect({**SLURM, **HYDRA, **TORCHRUN}).launcher == "torchrun"


@pytest.mark.unit
def test_slurm_wins_over_mpi_inside_srun():
    assert detect({**SLURM, **HYDRA}).launcher == "slurm"


@pytest.mark.unit
def test_sbatch_batch_script_without_srun_is_not_a_slurm_step():
    batch_script = {k: v for k, v in SLURM.items() if k != "SLURM_PROCID"}
    assert detect(batch_script).launcher == "single"
    assert detect({**batch_script, **HYDRA}).launcher == "mpi"


# --------------------------------------------------------------------------------------------
# Errors name the variable


@pytest.mark.unit
@pytest.mark.parametrize("variables, message", [
    ({**TORCHRUN, "RANK": "8"}, "RANK=8 is not below WORLD_SIZE=8"),
    ({**TORCHRUN, "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
    ({**TORCHRUN, "RANK": "-1"}, "RANK=-1 must be at least 0"),
    ({**TORCHRUN, "LOCAL_RANK": "two"}, "LOCAL_RANK='two' is not an integer"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ({**TORCHRUN, "MASTER_ADDR": " "}, "MASTER_ADDR is empty"),
    ({**SLURM, "SLURM_PROCID": "8"}, "SLURM_PROCID=8 is not below SLURM_NTASKS=8"),
    ({**SLURM, "SLURM_NTASKS": "x"}, "SLURM_NTASKS='x' is not an integer"),
    ({**SLURM, "SLURM_LOCALID": "4"}, "SLURM_LOCALID=4 is not below the 4 tasks"),
    ({**SLURM, "SLURM_STEP_NODELIST": "gpu[07-08"}, "SLURM_STEP_NODELIST='gpu\\[07-08'"),
    ({**SLURM, "SLURM_STEP_TASKS_PER_NODE": "4(2)"}, "SLURM_STEP_TASKS_PER_NODE='4\\(2\\)'"),
    ({**SLURM, "SLURM_NODEID": "2"}, "SLURM_NODEID=2 is outside"),
    ({k: v for k, v in SLURM.items() if "NODELIST" not in k}, "SLURM_STEP_NODELIST"),
    ({"PMI_RANK": "2", "PMI_SIZE": "2"}, "PMI_RANK=2 is not below PMI_SIZE=2"),
    ({"PMI_RANK": "0"}, "PMI_SIZE is missing"),
    ({**OMPI, "OMPI_COMM_WORLD_SIZE": "1.5"}, "OMPI_COMM_WORLD_SIZE='1.5' is not an integer"),
])
def test_inconsistent_values_raise_launch_error_naming_the_variable(variables, message):
    with pytest.raises(LaunchError, match=message):
        detect(variables)


# --------------------------------------------------------------------------------------------
# SLURM's compressed lists


@pytest.mark.unit
@pytest.mark.parametrize("text, hosts", [
    ("node1", ["node1"]),
    ("node[1-4]", ["node1", "node2", "node3", "node4"]),
    ("gpu[01,03-05]", ["gpu01", "gpu03", "gpu04", "gpu05"]),
    ("gpu[01,03-05],cpu7", ["gpu01", "gpu03", "gpu04", "gpu05", "cpu7"]),
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("n[008-010]", ["n008", "n009", "n010"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("node[1-2]-ib", ["node1-ib", "node2-ib"]),
    ("vm", ["vm"]),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.unit
@pytest.mark.parametrize("text", ["", "a[1-2", "a]1[", "a[2-1]", "a[x]", "a[1-]", "a,,b", "a[[1]]"])
def test_expand_hostlist_rejects_malformed_lists(text):
    with pytest.raises(ValueError):
        expand_hostlist(text)


@pytest.mark.unit
@pytest.mark.parametrize("text, counts", [
    ("4", [4]), ("4(x2)", [4, 4]), ("2,1", [2, 1]), ("2(x3),1", [2, 2, 2, 1]), (" 1(x1) ", [1]),
])
def test_expand_tasks_per_node(text, counts):
    assert expand_tasks_per_node(text) == counts


@pytest.mark.unit
@pytest.mark.parametrize("text", ["", "4(2)", "x", "0", "2(x0)", "4(x2"])
def test_expand_tasks_per_node_rejects_malformed(text):
    with pytest.raises(ValueError):
        expand_tasks_per_node(text)


# --------------------------------------------------------------------------------------------
# Acting on the environment


@pytest.mark.unit
def test_export_writes_the_torchrun_variables_and_round_trips():
    env = detect(SLURM)
    environ: dict[str, str] = {}
    export(env, environ)
    assert environ == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                       "MASTER_ADDR": "gpu07", "MASTER_PORT": str(env.master_port)}
    assert fields(detect(environ))[:6] == fields(env)[:6]


@pytest.mark.unit
def test_helpers_work_without_a_process_group(monkeypatch):
    monkeypatch.setattr(dist, "_initialized", lambda: False)
    monkeypatch.setattr(dist, "detect", lambda: detect({}))
    dist.barrier()
    assert dist.is_rank0()
    monkeypatch.setattr(dist, "detect", lambda: detect(TORCHRUN))
    assert not dist.is_rank0()


@pytest.mark.unit
def test_nccl_makes_the_local_rank_gpu_current_before_initialising(monkeypatch):
    """On a node with several GPUs every rank must not default to GPU 0 (object collectives and
    the evaluator use the current device)."""
    import deepspeed
    import torch

    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)  # whatever ran before in this process
    monkeypatch.setattr(dist, "export", lambda env: None)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: calls.append(("init", kwargs["dist_backend"])))
    env = detect(TORCHRUN)
    dist.init_process_group(env, backend="nccl")
    assert calls == [("set_device", env.local_rank), ("init", "nccl")]
    calls.clear()
    dist.init_process_group(env, backend="gloo")
    assert calls == [("init", "gloo")]


# --------------------------------------------------------------------------------------------
# Two real ranks

RANK_SCRIPT = """
import os, sys
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch, torch.distributed as td
from hpc_gan import dist
env = dist.detect()
dist.init_process_group(env, backend="gloo", timeout_s=60)
t = torch.tensor([float(env.rank + 1)])
td.all_reduce(t)
dist.barrier()
assert td.get_world_size() == env.world_size == 2, (td.get_world_size(), env)
assert td.get_rank() == env.rank
assert t.item() == 3.0, t
print(f"OK rank={env.rank} launcher={env.launcher} master={env.master_addr}:{env.master_port}", flush=True)
td.destroy_process_group()
"""



def _clean_env() -> dict[str, str]:
    """This environment minus any launcher's variables (the test may itself run under one)."""
    env = dist.without_launcher_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["DS_ACCELERATOR"] = "cpu"
    return env


def _run_two_ranks(command: list[str], env: dict[str, str]) -> None:
    start = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert output.count("OK rank=") == 2, output[-4000:]
    print(f"{command[0]}: two ranks in {time.monotonic() - start:.1f} s")


@pytest.mark.multiprocess
@pytest.mark.timeout(130)
def test_two_ranks_under_mpiexec(tmp_path):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        found = shutil.which("mpiexec")
        if found is None:
            pytest.skip("mpiexec not found next to the Python executable or on PATH (pip install mpich)")
        mpiexec = Path(found)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = _clean_env()
    env["MASTER_PORT"] = str(dist.free_port())
    _run_two_ranks([str(mpiexec), "-n", "2", sys.executable, str(script)], env)


@pytest.mark.multiprocess
@pytest.mark.timeout(130)
def test_two_ranks_under_torchrun(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(dist.free_port()), str(script)]
    _run_two_ranks(command, _clean_env())


ERROR_EXIT_SCRIPT = """
import os, sys
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch, torch.distributed as td
from hpc_gan import dist
env = dist.detect()
dist.init_process_group(env, backend="gloo", timeout_s=60)
t = torch.ones(1)
td.all_reduce(t)
print(f"error: rank {env.rank}: a user error after joining the group", file=sys.stderr, flush=True)
sys.exit(2)
"""


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_a_rank_that_exits_after_joining_the_group_never_aborts(tmp_path):
    """Leaving the gloo group to interpreter teardown aborted about 1 rank-exit in 20 with
    "terminate called without an active exception" (exit 134); init_process_group now registers
    its destruction at exit. 12 two-rank launches: each rank must exit with its own status, 2."""
    script = tmp_path / "rank.py"
    script.write_text(ERROR_EXIT_SCRIPT)
    env = _clean_env()
    failures = []
    for attempt in range(12):
        port = str(dist.free_port())
        ranks = [subprocess.Popen([sys.executable, str(script)], cwd=REPO, stderr=subprocess.PIPE, text=True,
                                  env={**env, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                       "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
                 for r in (0, 1)]
        for rank, proc in enumerate(ranks):
            _, err = proc.communicate(timeout=120)
            if proc.returncode != 2 or "terminate called" in err:
                failures.append(f"launch {attempt} rank {rank}: exit {proc.returncode}: {err.strip()[-300:]}")
    assert not failures, failures
