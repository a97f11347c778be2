"""Resume on another number of ranks (issue 14): a checkpoint written by 1 rank resumes on 2 and
one written by 2 resumes on 1, through DeepSpeed's universal checkpoint conversion. Generator
ZeRO 1, 2, 3 and critic ZeRO 1, 2 are covered across the two directions; the gathered fp32
master weights and Adam moments right after loading equal those that were saved, training goes
on with finite losses, and the job log says what was converted.

Three torchrun launches (tests/mp/reshard_scenarios.py): 1 rank writes, 2 ranks resume and
write, 1 rank resumes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import torchrun

pytestmark = pytest.mark.multiprocess
SCRIPT = str(Path(__file__).parent / "mp" / "reshard_scenarios.py")
RUNS = {"a": (1, 1, 1, 2), "c": (2, 2, 1, 2), "b": (3, 2, 2, 1)}  # name: (ZeRO G, ZeRO D, written by, resumed on)


@pytest.fixture(scope="module")
def work(smoke_shards, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("reshard")
    logs = {}
    for nproc, actions in ((1, "write:a:1:1:2,write:c:2:2:2"), (2, "resume:a:1:1:4,resume:c:2:2:4,write:b:3:2:2"),
                           (1, "resume:b:3:2:4")):
        done = torchrun(SCRIPT, str(smoke_shards), str(work), actions, nproc=nproc)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        logs[actions] = done.stdout
    return {"dir": work, "stdout": "\n".join(logs.values())}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_optimizer_states_after_conversion_equal_the_saved_ones(work, name):
    g, d, before, after = RUNS[name]
    saved = torch.load(work["dir"] / f"{name}-{before}.pt", weights_only=True)
    loaded = torch.load(work["dir"] / f"{name}-resumed-{after}.pt", weights_only=True)
    assert set(saved) == set(loaded) and any(k.endswith("exp_avg_sq") for k in saved)
    assert any(float(v.abs().sum()) > 0 for k, v in saved.items() if k.endswith("exp_avg"))  # moments were there
    for key in saved:
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_training_continues_with_finite_losses_and_the_data_position(work, name):
    g, d, before, after = RUNS[name]
    report = json.loads((work["dir"] / f"{name}-resumed-{after}.json").read_text())
    assert report["saved_world_size"] == before and report["resumed_at"] == 2 and report["step"] == 4
    assert len(report["losses"]) == 2 and all(math.isfinite(v) for pair in report["losses"] for v in pair)
    # 2 steps of batch 2 on `before` ranks, then 2 on `after` ranks: the same epoch, nothing re-read
    assert report["data"]["epoch"] == 0 and report["data"]["read"] == 2 * 2 * before + 2 * 2 * after


def test_the_log_says_what_was_converted(work):
    lines = [line for line in work["stdout"].splitlines() if "DeepSpeed's universal format" in line]
    assert len(lines) == 3
    assert any("written by 1 ranks, this job has 2: converted generator (ZeRO shards of 1 ranks), critic" in line
               for line in lines)
    assert any("written by 2 ranks, this job has 1" in line and "RNG streams seeded" in line for line in lines)
