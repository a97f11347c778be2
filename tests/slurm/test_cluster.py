"""Sanity of the test cluster itself, through submitit as the launcher uses it: jobs span distinct
nodes, sacct reports real final states, a failure comes back as an exception, and a signalled job
checkpoints and is requeued (both by scancel --signal and by sbatch --signal before its time limit).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit
from submitit.core.utils import FailedJobError

pytestmark = pytest.mark.slurm

# submitit pickles job functions with cloudpickle, by reference unless told otherwise; a job's
# python cannot import this test module (it is not on its sys.path), so send its code by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

FINAL_STATES_WAIT_S = 30.0  # slurmdbd records a job's end asynchronously, after its result is back


@pytest.fixture
def executor(slurm_cluster, slurm_workdir, request) -> submitit.AutoExecutor:
    """An executor that submits to the test cluster, logging under this test's own folder."""
    ex = submitit.AutoExecutor(folder=slurm_workdir / request.node.name / "%j", cluster="slurm")
    ex.update_parameters(timeout_min=5, slurm_partition=slurm_cluster.partition)
    return ex


def wait_done(job: submitit.Job, timeout_s: float) -> None:
    """Wait for a job's result (bounded, unlike job.result()); cancel it and fail on timeout."""
    deadline = time.monotonic() + timeout_s
    while not job.done(force_check=True):
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} not done after {timeout_s:.0f} s (state {job.state}); "
                        f"logs in {job.paths.folder}")
        time.sleep(0.5)


def sacct_state(job_id: str) -> str:
    """The job's final state as accounting records it, e.g. 'COMPLETED' or 'FAILED'."""
    deadline = time.monotonic() + FINAL_STATES_WAIT_S
    while True:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"],
                             capture_output=True, text=True, check=True).stdout
        state = ",".join(sorted(set(out.split())))
        unfinished = state in ("", "PENDING", "RUNNING", "COMPLETING", "REQUEUED")
        if not unfinished or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def where_am_i() -> dict:
    env = submitit.JobEnvironment()
    return {"host": socket.gethostname(), "node": os.environ.get("SLURMD_NODENAME"),
            "rank": env.global_rank, "world": env.num_tasks}


def fail_on_purpose() -> None:
    raise ValueError("expected failure")


class SleepUntilSignalled(submitit.helpers.Checkpointable):
    """First run: say it is running (so its signal handler is installed), then sleep until the
    signal arrives. submitit calls checkpoint() and requeues; the requeued run returns at once."""

    def __call__(self, started: str, requeued: bool = False) -> tuple[str, str]:
        if requeued:
            return "resumed", os.environ.get("SLURM_RESTART_COUNT", "0")
        Path(started).touch()
        time.sleep(300)
        return "never signalled", "0"

    def checkpoint(self, started: str, requeued: bool = False) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, started, requeued=True)


def test_four_node_job_runs_on_four_hosts_and_completes(slurm_cluster, executor):
    executor.update_parameters(nodes=slurm_cluster.nodes, tasks_per_node=1)
    job = executor.submit(where_am_i)
    wait_done(job, timeout_s=60)

    results = job.results()  # one per task
    assert sorted(r["rank"] for r in results) == list(range(slurm_cluster.nodes))
    assert {r["world"] for r in results} == {slurm_cluster.nodes}
    assert sorted(r["host"] for r in results) == slurm_cluster.hostnames
    assert all(r["host"] == r["node"] for r in results), results
    assert sacct_state(job.job_id) == "COMPLETED"


def test_failing_job_raises_and_is_recorded_failed(executor):
    job = executor.submit(fail_on_purpose)
    wait_done(job, timeout_s=60)

    with pytest.raises(FailedJobError, match="expected failure"):
        job.result()
    assert sacct_state(job.job_id) == "FAILED"


def wait_for_file(path: Path, job: submitit.Job, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} did not start within {timeout_s:.0f} s (state {job.state})")
        time.sleep(0.2)


def test_preempted_job_checkpoints_and_is_requeued(executor, slurm_workdir, request):
    started = slurm_workdir / f"{request.node.name}.started"
    job = executor.submit(SleepUntilSignalled(), str(started))
    wait_for_file(started, job, timeout_s=60)

    # what a preempting scheduler does: signal the job's steps with submitit's USR2
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    wait_done(job, timeout_s=90)  # the requeued job is held for cred_expire (10 s) first

    assert job.result() == ("resumed", "1")
    assert sacct_state(job.job_id) == "COMPLETED"


def test_signal_before_time_limit_requeues(executor, slurm_workdir, request):
    # slurmctld checks time limits every 30 s and signals a job once at most delay + 30 s are left:
    # with a 1-minute limit and a 20-s delay, 10-40 s after the start. (A delay of 30 s or more
    # would signal at the first check, possibly before submitit has installed its handler.)
    started = slurm_workdir / f"{request.node.name}.started"
    executor.update_parameters(timeout_min=1, slurm_signal_delay_s=20)
    job = executor.submit(SleepUntilSignalled(), str(started))
    wait_for_file(started, job, timeout_s=60)

    wait_done(job, timeout_s=120)

    assert job.result() == ("resumed", "1")
    assert sacct_state(job.job_id) == "COMPLETED"
