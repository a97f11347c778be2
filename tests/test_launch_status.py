"""launch/status.py: SLURM states from canned squeue/sacct output, run progress, the error-line rule."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_gan.cli import main
from hpc_gan.errors import LaunchError
from hpc_gan.launch import status

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parent.parent
SACCT = "--format=JobID,State,Elapsed,NodeList,ExitCode"


class FakeSlurm:
    """Answers squeue / sacct from canned text; None means 'squeue does not know the job'."""

    def __init__(self, squeue: str | None = None, sacct: str | Exception = "") -> None:
        self.squeue, self.sacct, self.calls = squeue, sacct, []

    def __call__(self, argv: list[str]) -> str:
        self.calls.append(argv)
        if argv[0] == "squeue":
            if self.squeue is None:  # what squeue does once the job has left the queue
                raise subprocess.CalledProcessError(1, argv, "", "slurm_load_jobs error: Invalid job id specified")
            return self.squeue
        if isinstance(self.sacct, Exception):
            raise self.sacct
        return self.sacct


def sacct_text(job: str, state: str, exit_code: str = "0:0", batch_state: str = "COMPLETED") -> str:
    return (f"{job}|{state}|00:10:00|node[1-4]|{exit_code}\n"
            f"{job}.batch|{batch_state}|00:10:00|node1|0:0\n"
            f"{job}.extern|COMPLETED|00:10:00|node[1-4]|0:0\n"
            f"{job}.0|{batch_state}|00:09:58|node[1-4]|0:0\n")


def write_run(run_dir: Path, steps=(10, 20), times=(1000.0, 1010.0), checkpoints=(10,), max_steps: int | None = 100,
              precision: str = "fp16", **extra) -> Path:
    """A run directory as the trainer leaves it: config.yaml, metrics.jsonl, COMPLETE checkpoints."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"variant: {run_dir.name}\ntrain:\n  max_steps: {max_steps or 'null'}\n")
    records = [{"step": s, "epoch": 0, "loss_critic": -1.5 + i, "loss_generator": 0.25, "wasserstein": 1.0,
                "penalty": 0.1, "patches_per_s": 12.5, "peak_memory_mb": 100.0, "loss_scale_critic": 65536.0,
                "loss_scale_generator": 32768.0, "skipped_steps": 0, "nonfinite_steps": 0, "lr_critic": 4e-4,
                "lr_generator": 2e-4, "precision": precision, "time": t, **extra}
               for i, (s, t) in enumerate(zip(steps, times))]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for step in checkpoints:
        where = run_dir / "checkpoints" / f"step-{step:08d}"
        where.mkdir(parents=True)
        (where / "COMPLETE").write_text("")
        (where / "state.json").write_text(json.dumps({"step": step}))
    return run_dir


def write_experiment(root: Path, jobs: dict, cluster: str = "slurm") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    entries = {variant: {"job_id": job_id, "run_dir": str(root / variant), "nodes": 4, "tasks_per_node": 1,
                         "stdout": str(root / "logs" / f"{job_id}_0_log.out"),
                         "stderr": str(root / "logs" / f"{job_id}_0_log.err"), "total_steps": 100}
               for variant, job_id in jobs.items()}
    record = {"cluster": cluster, "name": root.name, "submitted": "2026-11-23T23:59:00+00:00",
              "array_job_id": "123", "log_dir": str(root / "logs"), "jobs": entries}
    (root / "jobs.json").write_text(json.dumps(record))
    return root


# ------------------------------------------------------------------------------------ job state


@pytest.mark.parametrize("sacct, state, exit_code", [
    (sacct_text("123_0", "COMPLETED"), "COMPLETED", "0:0"),
    (sacct_text("123_0", "FAILED", "1:0", batch_state="FAILED"), "FAILED", "1:0"),
    (sacct_text("123_0", "CANCELLED by 0", "0:15", batch_state="CANCELLED"), "CANCELLED", "0:15"),
    (sacct_text("123_0", "TIMEOUT", "0:0", batch_state="CANCELLED"), "TIMEOUT", "0:0"),
    (sacct_text("123_0", "REQUEUED", "0:0"), "REQUEUED", "0:0"),
    (sacct_text("123_0", "OUT_OF_ME+", "0:125"), "OUT_OF_ME", "0:125"),
    # step lines first, and another state than the job's
    ("123_0.batch|FAILED|00:10:00|node1|1:0\n123_0|CANCELLED by 1000|00:10:00|node1|0:15\n", "CANCELLED", "0:15"),
])
def test_sacct_takes_the_job_line_not_its_steps(sacct, state, exit_code):
    fake = FakeSlurm(squeue=None, sacct=sacct)
    got = status.slurm_state("123_0", fake)
    assert (got["state"], got["exit_code"], got["elapsed"]) == (state, exit_code, "00:10:00")
    assert [call[0] for call in fake.calls] == ["squeue", "sacct"]
    assert fake.calls[1] == ["sacct", "-j", "123_0", SACCT, "-P", "-n"]


@pytest.mark.parametrize("squeue, state, nodes", [
    ("RUNNING|1:02:03|node[1-4]\n", "RUNNING", "node[1-4]"),
    ("PENDING|0:00|\n", "PENDING", ""),
    ("REQUEUED|0:00|\n", "REQUEUED", ""),
    ("COMPLETING|12:00|node1\n", "COMPLETING", "node1"),
])
def test_squeue_is_preferred_while_it_knows_the_job(squeue, state, nodes):
    fake = FakeSlurm(squeue=squeue, sacct=sacct_text("123_0", "COMPLETED"))
    got = status.slurm_state("123_0", fake)
    assert got == {"state": state, "elapsed": squeue.split("|")[1], "node_list": nodes}
    assert fake.calls == [["squeue", "-j", "123_0", "-h", "-o", "%T|%M|%N"]]


def test_empty_squeue_answer_falls_back_to_sacct():
    fake = FakeSlurm(squeue="", sacct=sacct_text("456", "COMPLETED"))
    assert status.slurm_state("456", fake)["state"] == "COMPLETED"


def test_pending_array_task_is_listed_under_its_array_pattern():
    fake = FakeSlurm(squeue=None, sacct="123_[0-3]|PENDING|00:00:00|None assigned|0:0\n")
    assert status.slurm_state("123_2", fake)["state"] == "PENDING"


@pytest.mark.parametrize("error, state", [
    (FileNotFoundError("sacct"), "UNKNOWN (no sacct)"),
    (subprocess.TimeoutExpired(["sacct"], 60), "UNKNOWN (sacct failed)"),
    (subprocess.CalledProcessError(1, ["sacct"]), "UNKNOWN (sacct failed)"),
])
def test_sacct_unavailable(error, state):
    def no_slurm(argv):
        raise FileNotFoundError(argv[0]) if argv[0] == "squeue" else error

    assert status.slurm_state("123_0", no_slurm) == {"state": state}


def test_sacct_without_the_job():
    assert status.slurm_state("9", FakeSlurm(squeue=None, sacct=""))["state"] == "UNKNOWN (not in sacct)"


# ------------------------------------------------------------------------------------ error line

TRACEBACK = """\
[2026-11-24 00:00:01] INFO hpc_gan.train: starting
UserWarning: nothing to worry about
Traceback (most recent call last):
  File "/x/hpc_gan/train/trainer.py", line 110, in fit
    result = train_iteration(...)
             ^^^^^^^^^^^^^^^^^^^^
  File "/x/torch/nn/modules/module.py", line 1, in _call_impl
    return forward_call(*args, **kwargs)
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB
Extra detail on a second message line
srun: error: node3: task 2: Exited with exit code 1
"""


@pytest.mark.parametrize("log, expected", [
    (TRACEBACK, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
    # chained: the exception that killed the job is the last one
    ("Traceback (most recent call last):\n  File 'a', line 1\nKeyError: 'x'\n\n"
     "During handling of the above exception, another exception occurred:\n\n"
     "Traceback (most recent call last):\n  File 'b', line 2\nhpc_gan.errors.ConfigError: bad key 'x'\n"
     "srun: error: task 0 failed\n", "hpc_gan.errors.ConfigError: bad key 'x'"),
    ("Traceback (most recent call last):\n  File 'a'\nValueError: a\n\n"
     "The above exception was the direct cause of the following exception:\n\n"
     "Traceback (most recent call last):\n  File 'b'\nRuntimeError: b\n", "RuntimeError: b"),
    # torch's per-rank prefix; another rank's lines interleave
    ("[rank0]: Traceback (most recent call last):\n[rank1]: Traceback (most recent call last):\n"
     "[rank0]:   File 'x', line 3, in f\n[rank1]:   File 'x', line 3, in f\n[rank1]: ValueError: rank 1\n"
     "[rank0]: RuntimeError: rank 0 died\n", "RuntimeError: rank 0 died"),
    # srun --label prefix
    ("0: Traceback (most recent call last):\n0:   File 'x'\n0: KeyboardInterrupt\n", "KeyboardInterrupt"),
    ("slurmstepd: error: *** JOB 123 ON node1 CANCELLED AT 2026-11-24T01:00:00 DUE TO TIME LIMIT ***\n",
     "slurmstepd: error: *** JOB 123 ON node1 CANCELLED AT 2026-11-24T01:00:00 DUE TO TIME LIMIT ***"),
    ("loading\n  error: hpc_gan.yaml: bad value\n", "error: hpc_gan.yaml: bad value"),
    ("ERROR: Unable to locate a modulefile for 'cuda/12'\n", "ERROR: Unable to locate a modulefile for 'cuda/12'"),
    ("RuntimeError: NCCL communicator was aborted\n", "RuntimeError: NCCL communicator was aborted"),
    # the first trigger wins: an error: line before a traceback
    ("srun: error: first\nTraceback (most recent call last):\n  f\nValueError: later\n", "srun: error: first"),
    # the log ends inside the traceback (job still writing it)
    ("Traceback (most recent call last):\n  File 'x', line 1\n", "Traceback (most recent call last):"),
    # no trigger: warnings, the word Error inside a sentence, environment variable names
    ("UserWarning: an Error occurred before\nNCCL_ASYNC_ERROR_HANDLING is deprecated\n"
     "submitit ERROR (2026) - fine\n", None),
    ("", None),
])
def test_error_line_rule(log, expected):
    assert status.error_line(log.splitlines(keepends=True)) == expected


# ------------------------------------------------------------------------------------ rows


def test_experiment_rows_progress_eta_checkpoint_and_error(tmp_path):
    exp = write_experiment(tmp_path / "exp1", {"c_sn_mp": "123_0", "sn": "123_1"})
    write_run(exp / "c_sn_mp", steps=(10, 20), times=(1000.0, 1010.0), checkpoints=(10, 20))
    write_run(exp / "sn", steps=(90, 100), times=(1000.0, 1020.0), checkpoints=(50, 100), precision="fp32")
    (exp / "logs" / "123_1_0_log.err").write_text(TRACEBACK)

    def slurm(argv):
        if argv[0] == "squeue":
            if argv[2] == "123_0":
                return "RUNNING|1:02:03|node[1-4]\n"
            raise subprocess.CalledProcessError(1, argv)
        return sacct_text("123_1", "FAILED", "1:0")

    running, failed = status.collect(exp, slurm)
    assert (running.variant, running.state, running.node_list, running.elapsed) == \
        ("c_sn_mp", "RUNNING", "node[1-4]", "1:02:03")
    assert (running.step, running.total_steps, running.checkpoint) == (20, 100, "step-00000020")
    assert running.eta_s == pytest.approx(80.0)  # 80 steps left at 1 step/s
    assert (running.loss_critic, running.loss_generator, running.patches_per_s) == (-0.5, 0.25, 12.5)
    assert running.error is None and not status.is_finished(running)
    assert (failed.state, failed.exit_code, failed.eta_s) == ("FAILED", "1:0", None)
    assert failed.error == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert status.is_finished(failed)

    table = status.render([running, failed]).splitlines()
    assert table[0].split()[:3] == ["VARIANT", "STATE", "JOB"]
    assert table[1].split() == ["c_sn_mp", "RUNNING", "123_0", "4", "node[1-4]", "1:02:03", "20/100", "-0.5000",
                                "0.2500", "12.5", "65536/32768", "-", "-", "1m20s", "step-00000020"]
    assert "FAILED" in table[2] and table[2].split()[10] == "-"  # no loss scale outside fp16
    assert table[3] == "    torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_dp_run_shows_the_epsilon_spent(tmp_path):
    exp = write_experiment(tmp_path / "exp", {"dp": "9_0"})
    write_run(exp / "dp", precision="fp32", epsilon=3.2581)
    (row,) = status.collect(exp, FakeSlurm(squeue="RUNNING|0:10|node1\n"))
    assert row.epsilon == 3.2581
    assert status.cells(row)[status.COLUMNS.index("EPSILON")] == "3.258"
    assert "EPSILON" in status.render([row]).splitlines()[0]


def test_newest_fid_from_the_evaluation_records(tmp_path):
    exp = write_experiment(tmp_path / "exp", {"sn": "9_0"})
    run = write_run(exp / "sn", steps=(10, 20), times=(1000.0, 1010.0), checkpoints=(10, 20))
    with (run / "metrics.jsonl").open("a") as handle:  # evaluations between and after the training records
        for step, fid in ((10, 80.5), (20, 41.23456)):
            handle.write(json.dumps({"step": step, "eval": {"fid": fid, "precision": 0.5}, "best_fid": 41.2,
                                     "time": 1010.5}) + "\n")
    (run / "checkpoints" / "best").write_text("step-00000020\n")
    (row,) = status.collect(exp, FakeSlurm(squeue="RUNNING|0:10|node1\n"))
    assert (row.step, row.loss_critic, row.eta_s) == (20, -0.5, pytest.approx(80.0))  # training records only
    assert (row.fid, row.fid_step, row.best_checkpoint) == (41.23456, 20, "step-00000020")
    assert status.cells(row)[status.COLUMNS.index("FID")] == "41.23"
    shown = json.loads(_json_of([row]))[0]
    assert (shown["fid"], shown["fid_step"], shown["best_checkpoint"]) == (41.23456, 20, "step-00000020")


def _json_of(rows) -> str:
    import io

    out = io.StringIO()
    status.show(rows, True, out)
    return out.getvalue()


def test_variant_not_started_yet(tmp_path):
    exp = write_experiment(tmp_path / "exp", {"gp": "7_0"})
    (row,) = status.collect(exp, FakeSlurm(squeue="PENDING|0:00|\n"))
    assert (row.state, row.step, row.total_steps, row.checkpoint, row.error) == ("PENDING", None, 100, None, None)
    assert status.cells(row)[5] == "-/100"


def test_run_directory_alone_has_no_job_state(tmp_path):
    run = write_run(tmp_path / "sn", max_steps=None)
    fake = FakeSlurm()
    (row,) = status.collect(run, fake)
    assert (row.state, row.job_id, row.step, row.total_steps) == (None, None, 20, None)
    assert fake.calls == [] and status.cells(row)[1] == "-" and status.cells(row)[5] == "20/?"


def test_run_directory_inside_an_experiment_shows_its_job(tmp_path):
    exp = write_experiment(tmp_path / "exp", {"sn": "123_1"})
    write_run(exp / "sn", checkpoints=(100,))
    (row,) = status.collect(exp / "sn", FakeSlurm(squeue=None, sacct=sacct_text("123_1", "COMPLETED")))
    assert (row.variant, row.job_id, row.state, row.eta_s) == ("sn", "123_1", "COMPLETED", None)


def test_directory_of_runs_without_jobs_json(tmp_path):
    write_run(tmp_path / "exp" / "sn")
    write_run(tmp_path / "exp" / "gp")
    assert [row.variant for row in status.collect(tmp_path / "exp", FakeSlurm())] == ["gp", "sn"]


def test_local_cluster_state_from_the_run_directory(tmp_path):
    exp = write_experiment(tmp_path / "exp", {"gp": "4001", "sn": "4002", "sn_mp": "4003"}, cluster="local")
    write_run(exp / "gp", steps=(90, 100), checkpoints=(100,))
    write_run(exp / "sn", steps=(10, 20), times=(1000.0, 1010.0))
    write_run(exp / "sn_mp", steps=(10, 20), times=(1000.0, 1010.0))
    fake = FakeSlurm()
    rows = status.collect(exp, fake, now=1010.0 + status.LOCAL_RECENT_S)
    assert [row.state for row in rows] == ["COMPLETED", "RUNNING", "RUNNING"]
    rows = status.collect(exp, fake, now=1011.0 + status.LOCAL_RECENT_S)
    assert [row.state for row in rows] == ["COMPLETED", "UNKNOWN", "UNKNOWN"]
    assert fake.calls == []  # no scheduler to ask


def test_metrics_tail_skips_a_line_being_written(tmp_path):
    run = write_run(tmp_path / "sn")
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 30, "loss_cri')
    assert [r["step"] for r in status.last_records(run / "metrics.jsonl")] == [10, 20]


@pytest.mark.parametrize("seconds, text", [(None, "-"), (59.6, "1m00s"), (3725, "1h02m"), (90000, "1d01h")])
def test_duration(seconds, text):
    assert status.duration(seconds) == text


# ------------------------------------------------------------------------------------ bad input


def test_missing_path(tmp_path):
    with pytest.raises(LaunchError, match="does not exist"):
        status.collect(tmp_path / "nope")


def test_neither_experiment_nor_run(tmp_path):
    (tmp_path / "logs").mkdir()
    with pytest.raises(LaunchError, match="neither an experiment directory"):
        status.collect(tmp_path)


def test_damaged_jobs_json(tmp_path):
    (tmp_path / "jobs.json").write_text("{not json")
    with pytest.raises(LaunchError, match="jobs.json"):
        status.collect(tmp_path)


# ------------------------------------------------------------------------------------ watch and CLI


def test_watch_redraws_until_every_job_has_finished(tmp_path):
    exp = write_experiment(tmp_path / "exp", {"sn": "5_0"})
    write_run(exp / "sn")
    answers = iter(["RUNNING|0:10|node1\n", "RUNNING|0:20|node1\n", "COMPLETING|0:30|node1\n"])

    def slurm(argv):  # three answers from squeue, then the job has left the queue and sacct knows it
        if argv[0] == "sacct":
            return sacct_text("5_0", "COMPLETED")
        answer = next(answers, None)
        if answer is None:
            raise subprocess.CalledProcessError(1, argv)
        return answer

    sleeps, out = [], io.StringIO()
    assert status.watch(exp, 7, runner=slurm, out=out, sleep=sleeps.append) == 0
    assert sleeps == [7, 7, 7] and out.getvalue().count("VARIANT") == 4
    assert "COMPLETED" in out.getvalue().splitlines()[-1]


def test_watch_stops_quietly_on_ctrl_c(tmp_path):
    write_run(tmp_path / "sn")

    def interrupt(_seconds):
        raise KeyboardInterrupt

    out = io.StringIO()
    assert status.watch(tmp_path / "sn", 5, as_json=True, out=out, sleep=interrupt) == 0
    assert json.loads(out.getvalue().splitlines()[0])[0]["step"] == 20


def test_cli_json_and_one_line_errors(tmp_path, capsys):
    run = write_run(tmp_path / "sn")
    assert main(["status", str(run), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["variant"], row["step"], row["checkpoint"], row["state"]) == ("sn", 20, "step-00000010", None)
    assert main(["status", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "does not exist" in err


def test_script_wrapper(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "launch/status.py"), str(tmp_path / "missing")],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


def _result(logs: Path, job_id: str, task: int, outcome: str) -> None:
    import pickle

    (logs / f"{job_id}_{task}_result.pkl").write_bytes(pickle.dumps((outcome, "Traceback ..." if outcome == "error"
                                                                     else {"status": "completed"})))


def test_a_failed_local_job_is_failed_at_once_not_running_for_ten_minutes(tmp_path):
    """Before: RUNNING until its last metrics record was LOCAL_RECENT_S old."""
    import os
    import socket

    exp = write_experiment(tmp_path / "exp", {"gp": "4001", "sn": "4002", "sn_mp": "4003", "dp": str(os.getpid())},
                           cluster="local")
    record = json.loads((exp / "jobs.json").read_text())
    for job in record["jobs"].values():
        job["nodes"], job["tasks_per_node"], job["host"] = 1, 2, socket.gethostname()  # local: one node
    (exp / "jobs.json").write_text(json.dumps(record))
    for variant in ("gp", "sn", "sn_mp", "dp"):
        write_run(exp / variant, steps=(10, 20), times=(1000.0, 1010.0))
    logs = exp / "logs"
    _result(logs, "4001", 0, "success")  # a rank failed, its partner finished: FAILED
    _result(logs, "4001", 1, "error")
    (logs / "4001_1_log.err").write_text("error: rank 1: the state holds non-finite values\n")
    _result(logs, "4002", 0, "success")  # both tasks finished
    _result(logs, "4002", 1, "success")
    # 4003: no results and no such process (killed); dp: this test's own pid, alive, no results yet
    dead = 4003
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
        except PermissionError:
            dead += 1
    record["jobs"]["sn_mp"]["job_id"] = str(dead)
    (exp / "jobs.json").write_text(json.dumps(record))
    rows = status.collect(exp, FakeSlurm(), now=1011.0)
    assert [row.state for row in rows] == ["FAILED", "COMPLETED", "FAILED", "RUNNING"]
    assert rows[0].error == "error: rank 1: the state holds non-finite values"
    assert all(status.is_finished(row) for row in rows[:3])
