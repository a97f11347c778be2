"""The dp variant on 2 ranks (gloo, CPU): Opacus' DPDDP route equals one process on the union of
the ranks' samples, ranks stay identical, epsilon is accounted at the global rate, resume is
exact and the consolidated generator is the trained one (tests/mp/dp_scenarios.py, one launch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import torchrun
from hpc_gan.privacy.accounting import epsilon

pytestmark = pytest.mark.multiprocess
SCRIPT = str(Path(__file__).parent / "mp" / "dp_scenarios.py")


@pytest.fixture(scope="module")
def report(smoke_shards, tmp_path_factory) -> dict:
    pytest.importorskip("opacus")
    work = tmp_path_factory.mktemp("dp_mp")
    done = torchrun(SCRIPT, str(smoke_shards), str(work))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads((work / "report.json").read_text())


def test_two_ranks_step_like_one_process_on_the_union(report):
    parity = report["parity"]
    assert parity["moved_over_lr"] > 0.5                  # the step moved the weights (Adam: ~lr per weight)
    assert parity["max_diff_over_lr"] < 1e-3, parity      # clip each, sum over ranks, noise once == one process


def test_ranks_hold_identical_networks(report):
    assert report["training"]["critic_spread"] == 0.0
    assert report["training"]["generator_spread"] == 0.0


def test_epsilon_is_accounted_at_the_global_rate(report):
    run = report["training"]
    assert run["sample_rate"] == pytest.approx(4 / 15)     # batch 2 x 2 ranks of 15 patches
    for record in run["straight"]:
        expected = epsilon(0.5, run["sample_rate"], record["critic_steps"], run["delta"])
        assert record["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert [r["critic_steps"] for r in run["straight"]] == [5, 10, 15, 20]


def test_resume_on_two_ranks_is_exact(report):
    def losses(records):
        return [(r["step"], r["loss_critic"], r["loss_generator"], r["epsilon"]) for r in records]

    assert losses(report["training"]["split"]) == losses(report["training"]["straight"])


def test_consolidated_generator_is_the_trained_one(report):
    run = report["training"]
    assert run["consolidated_diff"] < 1e-6
    assert run["consolidated_privacy"]["epsilon"] == pytest.approx(run["straight"][-1]["epsilon"])
    assert run["consolidated_privacy"]["sample_rate"] == pytest.approx(4 / 15)


def test_secret_sampling_seed_is_shared_by_all_ranks(report):
    seeds = report["training"]["secret_seeds"]
    assert len(seeds) == 2 and seeds[0] == seeds[1]
