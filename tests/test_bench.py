"""The benchmark scripts still run (their figures are read by people, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.unit
def test_data_loader_benchmark_quick_run():
    done = subprocess.run([sys.executable, str(REPO / "bench/data_loader.py"), "--quick"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["shards_patches_per_s"] > 0 and result["baseline_patches_per_s"] > 0
    assert set(result["packing"]) == {"lzf", "gzip", "none", "blosc"}


@pytest.mark.multiprocess
def test_train_step_benchmark_runs():
    done = subprocess.run([sys.executable, str(REPO / "bench/train_step.py"), "--steps", "2", "--rounds", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["trainer_step_ms"] > 0 and result["bare_step_ms"] > 0


@pytest.mark.multiprocess
def test_dp_step_benchmark_runs():
    pytest.importorskip("opacus")
    done = subprocess.run([sys.executable, str(REPO / "bench/dp_step.py"), "--steps", "1", "--rounds", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["dp_iteration_ms"] > 0 and result["plain_iteration_ms"] > 0 and result["n_critic"] == 5


@pytest.mark.multiprocess
def test_convergence_benchmark_quick_run(tmp_path):
    """Phantoms -> shards -> 2 local ranks through the launcher -> every checkpoint evaluated."""
    done = subprocess.run([sys.executable, str(REPO / "bench/convergence.py"), "--quick", "--png",
                           str(tmp_path / "curve.png")], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    rows = result["checkpoints"]
    assert [r["step"] for r in rows] == [100, 200]
    for row in rows:
        assert row["fid"] > 0 and row["fid_heldout"] > 0 and row["fid_ratio"] == row["fid"] / row["fid_heldout"]
        assert row["k"] == 5 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert 0 <= row["vessel_fraction_ks"] <= 1 and row["agreement_dice_real"] > 0
        assert 0 < row["train_seconds"] < result["train_wall_seconds"] + 1
    assert set(result["best_within_budget"]["meets"]) == {"fid_ratio", "precision", "recall", "vessel_fraction_ks",
                                                           "agreement_dice_ratio"}
    assert result["in_training_eval"]["records"] >= 1 and result["in_training_eval"]["seconds"] > 0
    assert (tmp_path / "curve.png").stat().st_size > 10_000
