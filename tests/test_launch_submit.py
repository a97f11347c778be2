"""launch/submit.py without a cluster: SLURM parameters (golden files), dry run, refusals.

Golden files live in tests/golden/slurm/; `UPDATE_GOLDEN=1 pytest tests/test_launch_submit.py`
rewrites them after a deliberate change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import assert_one_line_error
from hpc_gan.cli import main
from hpc_gan.config import load_config
from hpc_gan.launch.slurm_params import slurm_parameters

pytestmark = pytest.mark.unit
GOLDEN = Path(__file__).parent / "golden" / "slurm"


@pytest.mark.parametrize("name, variant, cluster, overrides, array", [
    ("c_sn_mp_4_nodes", "c_sn_mp", "gpu_node", ["cluster.nodes=4", "cluster.partition=gpu", "cluster.account=lab"], 1),
    ("paper_four_array", "sn", "gpu_node", ["cluster.qos=high", "cluster.array_parallelism=2"], 4),
    ("smoke_cpu", "sn", "local", [], 1),
])
def test_slurm_parameters_golden(name, variant, cluster, overrides, array):
    params = slurm_parameters(load_config(variant, cluster=cluster, overrides=overrides), "hpc_gan-exp", array)
    path = GOLDEN / f"{name}.json"
    text = json.dumps(params, indent=2, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def _submit(*argv):
    return main(["submit", *argv])




@pytest.fixture
def base(packed, tmp_path):
    """Arguments common to the tests: real shards, a private output root, local cluster."""
    return ["--set", f"data.root={packed}", "--set", f"output_root={tmp_path / 'runs'}", "--cluster", "local",
            "--profile", "smoke"]


def test_dry_run_prints_config_deepspeed_and_sbatch(base, capsys):
    assert _submit("--variant", "c_sn_mp,sn", *base, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "# ---- c_sn_mp: resolved config" in out and "critic_norm: spectral" in out
    assert '"gradient_clipping": 0.0' in out
    assert "#SBATCH --array=0-1%2" in out and "#SBATCH --signal=USR2@" in out and "#SBATCH --requeue" in out
    assert "srun" in out


def test_dry_run_of_dp_says_it_uses_no_deepspeed(base, capsys):
    assert _submit("--variant", "dp", *base, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "# ---- dp: no DeepSpeed: DP-SGD critic with Opacus across 1 rank(s), fp32" in out
    assert "DeepSpeed generator config" not in out and "#SBATCH --requeue" in out


@pytest.mark.parametrize("argv, words", [
    (["--variant", "snmp"], ["unknown variant 'snmp'", "valid variants:", "c_sn_mp"]),
    (["--variant", "sn", "--nodes", "0"], ["--nodes", "must be at least 1"]),
    (["--variant", "sn", "--nodes", "4"], ["--cluster local", "--nodes 1"]),
    (["--variant", "sn", "--profile", "tiny"], ["unknown profile 'tiny'", "smoke"]),
    (["--variant", "sn", "--set", "train.precision=fp16"], ["fp16 needs GPUs", "--gpus-per-node"]),
    (["--variant", "sn,sn"], ["names a variant twice"]),
])
def test_bad_input_is_one_line_and_submits_nothing(base, tmp_path, capsys, argv, words):
    assert _submit(*base, *argv) == 2
    assert_one_line_error(capsys, *words)
    assert not (tmp_path / "runs").exists()


def test_missing_manifest(tmp_path, capsys):
    assert _submit("--variant", "sn", "--cluster", "local", "--set", f"data.root={tmp_path / 'nowhere'}") == 2
    assert_one_line_error(capsys, "does not exist", "pack")


def _fake_checkpoint(run_dir: Path, variant: str, world_size: int | None = None) -> None:
    from hpc_gan.train import checkpoint as ckpt

    where = run_dir / "checkpoints" / ckpt.tag_of(10)
    where.mkdir(parents=True)
    (where / ckpt.STATE).write_text(json.dumps({"variant": variant, "step": 10, "world_size": world_size}))
    ckpt.mark_complete(run_dir / "checkpoints", ckpt.tag_of(10))


def test_existing_checkpoints_are_refused(base, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "run" / "sn"
    _fake_checkpoint(run_dir, "gp")
    assert _submit("--variant", "sn", *base) == 2
    assert_one_line_error(capsys, "holds checkpoints of variant 'gp'", "--overwrite")
    (run_dir / "checkpoints" / "step-00000010" / "state.json").write_text(json.dumps({"variant": "sn"}))
    assert _submit("--variant", "sn", *base) == 2
    assert_one_line_error(capsys, "already holds checkpoints", "--resume")
    assert _submit("--variant", "sn", *base, "--resume", "--overwrite") == 2
    assert_one_line_error(capsys, "exclude each other")
    assert (run_dir / "checkpoints" / "latest").exists()  # nothing was deleted


def test_resume_with_another_number_of_ranks_says_it_converts(base, tmp_path):
    import argparse
    import shutil

    from hpc_gan.launch.cli_submit import add_arguments
    from hpc_gan.launch.submit import check_run_dirs, plan_runs

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    runs = plan_runs(parser.parse_args(["--variant", "sn,dp", *base, "--resume"]), "local")
    for run in runs:
        _fake_checkpoint(run.cfg.run_dir, run.variant, world_size=run.cfg.cluster.nodes * run.cfg.cluster.tasks_per_node)
    assert check_run_dirs(runs[:1], True, False) == []  # same number of ranks: nothing to say
    for run in runs:
        shutil.rmtree(run.cfg.run_dir / "checkpoints")
        _fake_checkpoint(run.cfg.run_dir, run.variant, world_size=4)
    notes = check_run_dirs(runs[:1], True, False)
    assert len(notes) == 1 and "sn: checkpoint step-00000010 was written by 4 ranks, this job has 1" in notes[0]
    assert "universal format" in notes[0]
    from hpc_gan.errors import LaunchError

    with pytest.raises(LaunchError, match="dp variant cannot resume on 1"):
        check_run_dirs(runs[1:], True, False)


def test_slurm_without_sbatch(base, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert _submit("--variant", "sn", "--cluster", "slurm") == 2
    assert_one_line_error(capsys, "no 'sbatch'")


def test_tstr_job_needs_the_real_volumes(base, capsys):
    assert _submit("--variant", "sn", *base, "--job", "tstr") == 2
    assert_one_line_error(capsys, "--job tstr needs --images and --labels")


def test_evaluation_jobs_need_a_trained_run(base, capsys):
    assert _submit("--variant", "sn", *base, "--job", "evaluate") == 2
    assert_one_line_error(capsys, "no consolidated generator", "train it first")


# ------------------------------------------------------------------------------ --wait


SUBMITIT_FAILURE = """Job (task=1) failed during processing with trace:
----------------------
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/submitit/core/submission.py", line 55, in process_job
    result = delayed.result()
RuntimeError: training failed with exit status 2; the error line is in this task's log

----------------------
You can check full logs with 'job.stderr(1)' and 'job.stdout(1)'or at paths:
  - {logs}/4242_1_log.err
  - {logs}/4242_1_log.out"""


class _FailedLocalJob:
    """What wait_for sees of a failed 2-task submitit job: results() raises, paths per task."""

    def __init__(self, logs: Path) -> None:
        from submitit.core.utils import JobPaths

        self.logs, self.num_tasks = logs, 2
        self.paths = JobPaths(logs, "4242", 0)
        self._tasks = [JobPaths(logs, "4242", task) for task in range(2)]

    def task(self, task: int):
        return type("Task", (), {"paths": self._tasks[task]})()

    def results(self):
        from submitit.core.utils import FailedJobError

        raise FailedJobError(SUBMITIT_FAILURE.format(logs=self.logs))


def test_wait_prints_one_well_formed_failed_line_with_the_jobs_own_error(tmp_path, capsys):
    """Before: 'sn: FAILED (- <path>/4242_1_log.out)', the last line of submitit's message."""
    from hpc_gan.launch.submit import PlannedRun, wait_for

    logs = tmp_path / "exp" / "logs"
    logs.mkdir(parents=True)
    (logs / "4242_0_log.err").write_text("Traceback (most recent call last):\n  File 'x'\nRuntimeError: [gloo] "
                                         "Connection closed by peer [127.0.0.1]:4711\n")
    (logs / "4242_1_log.err").write_text("some warning\nerror: rank 1: train.betas=1.0,0.9 is out of range: each value "
                                         "must be < 1.0\nTraceback (most recent call last):\nRuntimeError: training "
                                         "failed with exit status 2\n")
    run = PlannedRun("sn", None, tmp_path / "config.yaml")
    assert wait_for([_FailedLocalJob(logs)], [run]) == 1
    assert capsys.readouterr().out == ("sn: FAILED (error: rank 1: train.betas=1.0,0.9 is out of range: each value "
                                       "must be < 1.0)\n")
    for log in logs.iterdir():  # no logs to read: the exception line of the relayed traceback
        log.unlink()
    assert wait_for([_FailedLocalJob(logs)], [run]) == 1
    assert capsys.readouterr().out == ("sn: FAILED (RuntimeError: training failed with exit status 2; the error "
                                       "line is in this task's log)\n")
