"""In-training evaluation on 2 ranks equals the same evaluation on 1 rank (same generator
weights, same fixed latents), and a rerun from the cached real statistics equals the first; a
short DeepSpeed run (ZeRO-3 generator) writes evaluation records and a best pointer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import torchrun

pytestmark = pytest.mark.multiprocess
SCRIPT = str(Path(__file__).parent / "mp" / "eval_ranks.py")
TRAIN_SCRIPT = str(Path(__file__).parent / "mp" / "train_scenarios.py")
FIGURES = ("fid", "precision", "recall", "density", "coverage", "vessel_fraction_ks", "contrast", "contrast_real",
           "dice", "dice_real")


def _evaluate(smoke_shards, work: Path, nproc: int, segmenters: Path | None = None) -> dict:
    (work / "eval_cache").mkdir(parents=True)
    for segmenter in segmenters.glob("segmenter-*.pt") if segmenters else ():  # trained once (seconds)
        shutil.copy(segmenter, work / "eval_cache")
    done = torchrun(SCRIPT, str(smoke_shards), str(work), str(work / "report.json"), nproc=nproc)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads((work / "report.json").read_text())


def test_two_ranks_equal_one_rank(smoke_shards, tmp_path):
    one = _evaluate(smoke_shards, tmp_path / "one", 1)
    two = _evaluate(smoke_shards, tmp_path / "two", 2, segmenters=tmp_path / "one" / "eval_cache")
    assert two["world_size"] == 2 and two["same_on_every_rank"]
    for report in (one, two):
        first, cached = report["results"]
        for key in FIGURES:
            assert first[key] == pytest.approx(cached[key], rel=1e-9, abs=1e-12), key
    a, b = one["results"][0], two["results"][0]
    assert a["n"] == b["n"] == 7 and a["fid"] > 0 and a["contrast_real"] is not None and a["dice"] is not None
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-5)  # batched convolutions round differently
    for key in FIGURES[1:]:
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key


def test_short_deepspeed_run_writes_eval_records_and_best_pointer(smoke_shards, tmp_path):
    done = torchrun(TRAIN_SCRIPT, str(smoke_shards), str(tmp_path), "evaluation")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "eval | FID" in done.stdout
    result = json.loads((tmp_path / "report.json").read_text())["evaluation"]
    evals = [r for r in result["records"] if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(r["eval"]["n"] == 9 and r["eval"]["fid"] > 0 for r in evals)
    best = min(evals, key=lambda r: r["eval"]["fid"])
    assert result["best"] == f"step-{best['step']:08d}" and evals[-1]["best_fid"] == best["eval"]["fid"]
    assert result["complete"] == sorted({result["best"], "step-00000006"})  # keep 1, plus the best
    assert result["best"] in Path(result["consolidated"]).name
