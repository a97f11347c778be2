"""launch/submit.py on a real SLURM cluster (tests/slurm/cluster.sh): multi-node DeepSpeed, the
dp variant on two nodes, arrays, time limit -> checkpoint -> requeue -> resume."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slurm


def submit(workdir: Path, shards: Path, name: str, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "launch/submit.py"), "--profile", "smoke", "--cluster", "slurm",
           "--name", name, "--set", f"data.root={shards}", "--set", f"output_root={workdir}", "--wait", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def sacct_state(job_id: str, timeout: float = 30.0) -> str:
    """The job's own line (not .batch/.extern); slurmdbd is updated a little after the job ends."""
    end = time.time() + timeout
    state = ""
    while time.time() < end:
        out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "--format=JobID,State"],
                             capture_output=True, text=True).stdout
        rows = [line.split("|") for line in out.splitlines() if line.split("|")[0] == job_id]
        state = rows[-1][1].split()[0] if rows else ""  # "CANCELLED by 0" -> "CANCELLED"
        if state and state not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED"):
            return state
        time.sleep(1)
    return state


def jobs(workdir: Path, name: str) -> dict:
    return json.loads((workdir / name / "jobs.json").read_text())["jobs"]


def metrics(run_dir: str) -> list[dict]:
    """The training records (evaluation records left out)."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval" not in r]


@pytest.fixture(scope="module")
def shards(smoke_shards, slurm_workdir) -> Path:
    """The smoke shards, copied where every node (and the job's user) can read them."""
    import shutil

    target = slurm_workdir / "shards"
    if not target.exists():
        shutil.copytree(smoke_shards, target)
    return target


def test_c_sn_mp_on_four_nodes(slurm_workdir, shards):
    done = submit(slurm_workdir, shards, "four", "--variant", "c_sn_mp", "--nodes", "4", "--tasks-per-node", "1",
                  "--set", "train.max_steps=6", "--set", "train.log_every=3")
    assert done.returncode == 0, done.stdout + done.stderr
    job = jobs(slurm_workdir, "four")["c_sn_mp"]
    log = Path(job["stdout"]).read_text()
    assert "variant c_sn_mp | world size 4 (slurm)" in log
    nodes = subprocess.run(["sacct", "-j", job["job_id"], "-X", "-n", "-P", "--format=NodeList"],
                           capture_output=True, text=True).stdout.split()
    assert nodes and nodes[0] == "node[1-4]"
    run_dir = Path(job["run_dir"])
    assert (run_dir / "checkpoints" / "step-00000006" / "COMPLETE").exists()
    assert list((run_dir / "consolidated").glob("generator-step-00000006.pt"))
    assert sacct_state(job["job_id"]) == "COMPLETED"


def test_dp_on_two_nodes(slurm_workdir, shards):
    """The dp variant (Opacus' data-parallel route, no DeepSpeed) under srun on two nodes."""
    done = submit(slurm_workdir, shards, "private", "--variant", "dp", "--nodes", "2", "--tasks-per-node", "1",
                  "--set", "train.max_steps=3", "--set", "train.log_every=1")
    assert done.returncode == 0, done.stdout + done.stderr
    job = jobs(slurm_workdir, "private")["dp"]
    log = Path(job["stdout"]).read_text()
    assert "variant dp (DP-SGD critic, Opacus, no DeepSpeed) | world size 2 (slurm)" in log
    records = metrics(job["run_dir"])
    assert [r["critic_steps"] for r in records] == [5, 10, 15] and 0 < records[0]["epsilon"] < records[-1]["epsilon"]
    assert list((Path(job["run_dir"]) / "consolidated").glob("generator-step-00000003.pt"))
    assert sacct_state(job["job_id"]) == "COMPLETED"


def test_two_variants_are_one_array(slurm_workdir, shards):
    done = submit(slurm_workdir, shards, "array", "--variant", "sn,gp", "--nodes", "1", "--tasks-per-node", "2",
                  "--set", "train.max_steps=4")
    assert done.returncode == 0, done.stdout + done.stderr
    entries = jobs(slurm_workdir, "array")
    array_ids = {entry["job_id"].split("_")[0] for entry in entries.values()}
    assert len(array_ids) == 1 and sorted(e["job_id"].split("_")[1] for e in entries.values()) == ["0", "1"]
    for entry in entries.values():
        assert metrics(entry["run_dir"])[-1]["step"] == 4
        assert sacct_state(entry["job_id"]) == "COMPLETED"


def test_time_limit_checkpoint_requeue_resume(slurm_workdir, shards):
    """A 1-minute limit with the signal 20 s before it: interrupted, requeued, resumed, finished.

    slurmctld checks time limits every 30 s, so the signal comes 10-40 s after each start: a run
    trains at most ~28 s (after ~12 s of start-up). On a quiet machine that is as much as 800
    steps (seen: a single run finished them before the signal), so 1600 steps make at least one
    requeue certain. Up to 30 requeues leave room for a machine slowed by other work (each run
    then trains less).
    """
    steps = 1600
    done = submit(slurm_workdir, shards, "requeue", "--variant", "sn", "--nodes", "1", "--tasks-per-node", "1",
                  "--time", "1", "--set", "cluster.signal_delay_s=20", "--set", "cluster.max_requeues=30",
                  "--set", f"train.max_steps={steps}", "--set", "train.log_every=50",
                  "--set", "train.checkpoint_every=100000", timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    job = jobs(slurm_workdir, "requeue")["sn"]
    records = metrics(job["run_dir"])
    assert [r["step"] for r in records] == list(range(50, steps + 1, 50))  # one continuous log
    err = Path(job["stderr"]).read_text()
    assert "received SIGUSR2" in err and "resumed from step-" in Path(job["stdout"]).read_text()
    assert sacct_state(job["job_id"]) == "COMPLETED"


def _status(experiment: Path):
    from hpc_gan.launch.status import collect

    return {row.variant: row for row in collect(experiment)}


def test_scancel_shows_cancelled(slurm_workdir, shards):
    cmd = [sys.executable, str(REPO / "launch/submit.py"), "--profile", "smoke", "--cluster", "slurm", "--name",
           "cancel", "--variant", "sn", "--set", f"data.root={shards}", "--set", f"output_root={slurm_workdir}",
           "--set", "train.max_steps=100000"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = jobs(slurm_workdir, "cancel")["sn"]["job_id"]
    end = time.time() + 60
    while _status(slurm_workdir / "cancel")["sn"].state != "RUNNING" and time.time() < end:
        time.sleep(1)
    subprocess.run(["scancel", job_id], check=True)
    assert sacct_state(job_id) == "CANCELLED"
    end = time.time() + 30  # squeue may still say COMPLETING while the ranks are being killed
    while (state := _status(slurm_workdir / "cancel")["sn"].state) == "COMPLETING" and time.time() < end:
        time.sleep(1)
    assert state == "CANCELLED"


def test_failing_job_shows_its_error_line(slurm_workdir, packed):
    """16x16x16 shards with the smoke profile's 32x32x16 model: the trainer refuses at start."""
    import shutil

    wrong = slurm_workdir / "wrong_shards"
    if not wrong.exists():
        shutil.copytree(packed, wrong)
    done = submit(slurm_workdir, wrong, "fails", "--variant", "sn")
    assert done.returncode == 1 and "sn: FAILED" in done.stdout
    job_id = jobs(slurm_workdir, "fails")["sn"]["job_id"]
    assert sacct_state(job_id) == "FAILED"
    row = _status(slurm_workdir / "fails")["sn"]
    assert row.state == "FAILED"
    assert "holds (16, 16, 16) patches but model.patch_shape is (32, 32, 16)" in row.error
