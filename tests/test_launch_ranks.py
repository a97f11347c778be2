"""Ranks started on this machine end with the job's own error line (issue 13.6): the project's
launcher (``python -m hpc_gan.train --nproc-per-node N``) prints the failed rank's line last, and
plain torchrun's failure table quotes it (each rank records it with errors.print_error)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as Failure

import pytest

from hpc_gan.dist import free_port, without_launcher_env
from hpc_gan.errors import print_error

REPO = Path(__file__).resolve().parent.parent

BETAS = "error: rank {rank}: train.betas=1.0,0.9 is out of range: each value must be < 1.0"


def _env() -> dict[str, str]:
    return without_launcher_env() | {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}


@pytest.mark.unit
def test_print_error_records_the_line_for_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    print_error("error: rank 1: bad")
    assert capsys.readouterr().err == "error: rank 1: bad\n" and not list(tmp_path.iterdir())
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    print_error("error: rank 1: bad")
    assert json.loads((tmp_path / "error.json").read_text())["message"] == "error: rank 1: bad"


@pytest.mark.multiprocess
@pytest.mark.timeout(200)
def test_the_jobs_own_line_is_the_last_thing_a_user_reads(tmp_path):
    argv = [sys.executable, "-m", "hpc_gan.train", "--nproc-per-node", "2", "--variant", "sn", "--profile", "smoke",
            "--set", "train.betas=1.0,0.9", "--set", f"output_root={tmp_path}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=tmp_path, env=_env())
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1] in (BETAS.format(rank=0), BETAS.format(rank=1)), done.stderr  # the first to fail
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr


@pytest.mark.multiprocess
@pytest.mark.timeout(200)
def test_plain_torchrun_quotes_the_ranks_line_in_its_failure_table(tmp_path):
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
            "-m", "hpc_gan.train", "--variant", "sn", "--profile", "smoke", "--set", "train.betas=1.0,0.9"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=tmp_path, env=_env())
    assert done.returncode != 0
    assert "traceback : error: rank " in done.stderr and "each value must be < 1.0" in done.stderr, done.stderr
    assert "To enable traceback see" not in done.stderr  # what the table said before


@pytest.mark.unit
def test_the_reported_failure_is_the_earliest_with_its_own_line():


    from hpc_gan.launch.ranks import _cause

    stopped = Failure(message="Signal 15 (SIGTERM) received by PID 7", timestamp=100, exitcode=-15)
    own = Failure(message="error: rank 1: bad", timestamp=101, exitcode=2)
    assert _cause({0: stopped, 1: own}) == (1, own)  # rank 0 was stopped because rank 1 failed
    structured = Failure(message={"message": "error: rank 2: worse"}, timestamp=99, exitcode=2)
    assert _cause({0: stopped, 1: own, 2: structured})[0] == 2
    assert _cause({3: stopped, 0: Failure(message="Signal 9", timestamp=100, exitcode=-9)})[0] == 0


@pytest.mark.unit
def test_a_rank_stopped_by_the_agent_after_its_line_does_not_hide_the_user_error_status():
    """Rank 0 wrote its line first but the agent's SIGTERM ended it (status -15); rank 1 exited 2
    with the same kind of line: the job's status is 2, not the generic 1 (seen in a make test run)."""
    from hpc_gan.launch.ranks import _exit_status

    first = Failure(message={"message": BETAS.format(rank=0)}, timestamp=100, exitcode=-15)
    second = Failure(message={"message": BETAS.format(rank=1)}, timestamp=101, exitcode=2)
    assert _exit_status(first, {0: first, 1: second}) == 2
    killed = Failure(message="Signal 9 (SIGKILL) received by PID 7", timestamp=100, exitcode=-9)
    assert _exit_status(killed, {0: killed}) == 1
