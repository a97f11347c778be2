"""In-training evaluation on 2 ranks equals the same evaluation on 1 rank (same generator
weights, same fixed latents), and a rerun from the cached real statistics equals the first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import torchrun

pytestmark = pytest.mark.multiprocess
SCRIPT = str(Path(__file__).parent / "mp" / "eval_ranks.py")
FIGURES = ("fid", "precision", "recall", "density", "coverage", "vessel_fraction_ks", "contrast", "contrast_real")


def _evaluate(smoke_shards, work: Path, nproc: int) -> dict:
    work.mkdir()
    done = torchrun(SCRIPT, str(smoke_shards), str(work), str(work / "report.json"), nproc=nproc)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads((work / "report.json").read_text())


def test_two_ranks_equal_one_rank(smoke_shards, tmp_path):
    one = _evaluate(smoke_shards, tmp_path / "one", 1)
    two = _evaluate(smoke_shards, tmp_path / "two", 2)
    assert two["world_size"] == 2 and two["same_on_every_rank"]
    for report in (one, two):
        first, cached = report["results"]
        for key in FIGURES:
            assert first[key] == pytest.approx(cached[key], rel=1e-9, abs=1e-12), key
    a, b = one["results"][0], two["results"][0]
    assert a["n"] == b["n"] == 7 and a["fid"] > 0 and a["contrast"] is not None
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-5)  # batched convolutions round differently
    for key in FIGURES[1:]:
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
