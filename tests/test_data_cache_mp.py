"""The node-local cache on 2 ranks of one node (gloo): built once, read by both; fp32 training
on it equals training on the shards (tests/mp/cache_ranks.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import half_exact_copy, torchrun

pytestmark = pytest.mark.multiprocess
SCRIPT = str(Path(__file__).parent / "mp" / "cache_ranks.py")


@pytest.fixture(scope="module")
def report(smoke_shards, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("cache_mp")
    data = half_exact_copy(smoke_shards, work / "half_exact")
    done = torchrun(SCRIPT, str(data), str(work))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    found = json.loads((work / "report.json").read_text())
    found["left_over"] = sorted(p.name for d in ("node", "node2") if (work / d).is_dir() for p in (work / d).iterdir())
    return found


def test_one_rank_builds_the_store_and_both_read_it(report):
    ranks = report["open"]
    assert sorted(r["built"] for r in ranks) == [False, True]
    assert {r["type"] for r in ranks} == {"CachedPatchDataset"} and len({r["store"] for r in ranks}) == 1
    assert ranks[0]["digest"] == ranks[1]["digest"]


def test_fp32_training_on_the_float16_cache_equals_training_on_the_shards(report):
    run = report["training"]
    assert run["types"] == ["ShardedPatchDataset", "CachedPatchDataset"]
    assert run["generator_moved"] > 0
    assert run["generator_equal"] and run["critic_equal"]


def test_the_store_is_removed_when_the_job_ends(report):
    assert report["left_over"] == []
