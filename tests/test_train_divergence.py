"""A diverging run stops with one accurate line and keeps no diverged checkpoint (issue 13.7):
real training in one process (``python -m hpc_gan.train``, smoke profile, fp32)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_gan.dist import without_launcher_env

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]


def _train(shards: Path, out: Path, lr: str, *sets: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "hpc_gan.train", "--variant", "sn", "--profile", "smoke"]
    for item in (f"data.root={shards}", f"output_root={out}", f"train.lr_critic={lr}", f"train.lr_generator={lr}",
                 "train.max_steps=40", "train.log_every=5", "train.eval_every=0", "train.image_every=0", *sets):
        argv += ["--set", item]
    env = without_launcher_env() | {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=280, cwd=REPO, env=env)


def test_finite_divergence_stops_the_run_without_a_diverged_checkpoint(smoke_shards, tmp_path):
    """lr 1e6: losses ~1e13 but finite. Before: exit 0, checkpoints with running_var ~7e27."""
    done = _train(smoke_shards, tmp_path, "1e6", "train.checkpoint_every=5")
    assert done.returncode == 2, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert re.match(r"error: rank 0: training stopped at step \d+: \|W\| = \S+ > 36203.87 ", last), last
    assert "for 3 consecutive logging " \
        "windows; no checkpoint was written before it (start again); lower train.lr_critic and " \
        "train.lr_generator" in last, last
    assert "fp32" not in last and "last good checkpoint" not in last
    run = tmp_path / "run" / "sn"
    assert not list((run / "checkpoints").glob("step-*"))  # every window was out of bounds: nothing saved


def test_infinite_buffers_are_never_saved(smoke_shards, tmp_path):
    """lr 1e12: a BatchNorm running_var overflows while the losses stay finite. Before: kept
    checkpoints held inf running variances and still consolidated and sampled."""
    done = _train(smoke_shards, tmp_path, "1e12", "train.checkpoint_every=2")
    assert done.returncode == 2, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "training stopped at step 2: the state holds non-finite values ('generator." in last, last
    assert "running_var' has inf" in last and "so step-00000002 was not written" in last, last
    run = tmp_path / "run" / "sn"
    assert not list((run / "checkpoints").glob("step-*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").exists() else []
    assert all(r["loss_critic"] is None or isinstance(r["loss_critic"], float) for r in records)
