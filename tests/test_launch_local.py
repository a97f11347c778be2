"""The user's path on one machine: launch/submit.py --cluster local for training, then the
evaluation and downstream-test jobs on the trained run (submitit's local executor)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_gan.dist import without_launcher_env

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.multiprocess


def _submit(shards: Path, out: Path, *argv: str, variant: str = "sn") -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "launch/submit.py"), "--variant", variant, "--profile", "smoke", "--cluster",
           "local", "--name", "exp", "--set", f"data.root={shards}", "--set", f"output_root={out}", "--wait", *argv]
    env = without_launcher_env()
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)


def test_train_then_evaluate_then_downstream_test(smoke_shards, tmp_path):
    done = _submit(smoke_shards, tmp_path, "--tasks-per-node", "1", "--set", "train.max_steps=4")
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "exp" / "sn"
    assert list((run / "consolidated").glob("generator-step-00000004.pt"))

    done = _submit(smoke_shards, tmp_path, "--tasks-per-node", "2", "--job", "evaluate", "--n-samples", "16")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["world_size"] == 2 and report["n"]["generated"] == 15  # 15 real training patches

    nifti = smoke_shards.parent / "nifti"
    done = _submit(smoke_shards, tmp_path, "--tasks-per-node", "1", "--job", "tstr", "--tstr-real",
                   "--tstr-steps", "2", "--images", str(nifti / "images"), "--labels", str(nifti / "labels"),
                   "--masks", str(nifti / "masks"))
    assert done.returncode == 0, done.stdout + done.stderr
    sources = [row["source"] for d in (run / "tstr", tmp_path / "exp" / "tstr_real")
               for row in csv.DictReader((d / "scores.csv").open())]
    assert sources == ["sn", "real"]


def test_dp_variant_trains_on_two_ranks_and_its_report_states_epsilon(smoke_shards, tmp_path):
    """The dp variant through the same launcher: Opacus' data-parallel route on 2 local tasks,
    consolidation at the end, then sampling + evaluation; epsilon travels into the report."""
    import torch

    done = _submit(smoke_shards, tmp_path, "--tasks-per-node", "2", "--set", "train.max_steps=3", variant="dp")
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "exp" / "dp"
    generator = run / "consolidated" / "generator-step-00000003.pt"
    privacy = torch.load(generator, weights_only=True)["privacy"]
    assert privacy["critic_steps"] == 15 and privacy["sample_rate"] == 4 / 15 and privacy["epsilon"] > 0

    done = _submit(smoke_shards, tmp_path, "--tasks-per-node", "1", "--job", "evaluate", "--n-samples", "16",
                   variant="dp")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["privacy"] == privacy
    assert f"epsilon = {privacy['epsilon']:.4g}" in (run / "eval" / "report.md").read_text()
