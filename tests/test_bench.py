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
