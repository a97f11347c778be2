"""The two-engine trainer on 2 ranks (gloo, CPU, smoke profile): ZeRO x precision, exact resume,
spectral-norm sync, parity with plain PyTorch, consolidation, generator EMA.

All scenarios run in one torchrun launch (tests/mp/train_scenarios.py): importing DeepSpeed in
two processes on two cores costs more than the training itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import torchrun
from hpc_gan.errors import CheckpointError

pytestmark = pytest.mark.multiprocess
SCRIPT = str(Path(__file__).parent / "mp" / "train_scenarios.py")


@pytest.fixture(scope="module")
def report(smoke_shards, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("train_mp")
    done = torchrun(SCRIPT, str(smoke_shards), str(work), "matrix,resume,sn_sync,parity,consolidation,nonfinite,stop_signal")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads((work / "report.json").read_text())


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero_stages_and_precisions_train(report, stage, precision):
    run = report["matrix"][f"zero{stage}_{precision}"]
    record = run["record"]
    assert record["step"] == 3 and record["precision"] == precision
    for key in ("loss_critic", "loss_generator", "wasserstein", "penalty", "patches_per_s"):
        assert math.isfinite(record[key])
    assert run["moved"] > 1e-5  # the generator's weights changed


def test_zero3_with_offload_and_checkpointing_trains_like_zero1(report):
    run = report["matrix"]["zero3_offload_checkpointing"]
    assert run["record"]["step"] == 3 and run["moved"] > 1e-5
    reference = report["matrix"]["zero1_fp32"]["record"]
    for key in ("loss_critic", "loss_generator"):
        assert abs(run["record"][key] - reference[key]) <= 1e-4 * max(1.0, abs(reference[key]))


def test_zero_stages_agree_in_fp32(report):
    losses = {report["matrix"][f"zero{s}_fp32"]["record"]["loss_critic"] for s in (1, 2, 3)}
    assert max(losses) - min(losses) < 1e-4 * max(abs(v) for v in losses)


def test_resume_is_exact(report):
    straight, split = report["resume"]["straight"], report["resume"]["split"]
    assert [row[0] for row in split] == [1, 2, 3, 4, 5, 6]  # one continuous log, no duplicate steps
    assert split == straight


def test_spectral_norm_vectors_identical_on_all_ranks(report):
    assert report["sn_sync"]["checks"] == 5 * 8  # 5 steps x 4 convs x (u, v)
    assert report["sn_sync"]["max_diff"] == 0.0


@pytest.mark.parametrize("stage", [1, 2])
def test_one_iteration_equals_plain_pytorch(report, stage):
    """Reference: plain PyTorch on both ranks' batches with the ranks' latents and penalty weights."""
    result = report["parity"][f"zero{stage}"]
    assert result["steps"] == 2
    # DeepSpeed's default gradient clipping (norm 1.0) gives losses ~1e-3 and params ~3 here
    assert result["losses"] < 2e-5, result          # relative, both networks, both steps
    assert result["params_over_lr"] < 0.2, result   # Adam amplifies rounding noise of tiny gradients


def test_consolidated_generator_matches_trained(report):
    assert report["consolidation"]["max_diff"] < 1e-6 and report["consolidation"]["step"] == 4


def test_consolidated_file_loads_weights_only_and_rejects_damage(report, tmp_path):
    from hpc_gan.train.consolidate import load_generator

    path = Path(report["consolidation"]["file"])
    payload = torch.load(path, weights_only=True)
    assert payload["variant"] == "sn" and payload["model"]["patch_shape"] == [32, 32, 16]
    assert any("running_mean" in k for k in payload["state_dict"])
    with pytest.raises(CheckpointError, match="holds variant 'sn', not 'c_sn_mp'"):
        load_generator(path, variant="c_sn_mp")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        load_generator(cut)
    copy = tmp_path / path.name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    (tmp_path / (path.name + ".sha256")).write_text((path.parent / (path.name + ".sha256")).read_text())
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        load_generator(copy)


def test_nonfinite_losses_stop_the_run_and_keep_the_last_good_checkpoint(report):
    result = report["nonfinite"]
    assert "not finite for 3 consecutive steps" in result["message"] and result["step"] == 5
    assert result["complete"] == ["step-00000002"] and result["latest"] == "step-00000002"


def test_stop_signal_on_one_rank_stops_all_at_one_step_with_a_checkpoint(report):
    ranks = report["stop_signal"]["ranks"]
    assert ranks[0] == ranks[1] and ranks[0][1] is True   # same step, both know they must requeue
    assert report["stop_signal"]["latest"] == f"step-{ranks[0][0]:08d}"
    assert ranks[0][0] < 20


@pytest.fixture(scope="module")
def ema_report(smoke_shards, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("train_mp_ema")
    done = torchrun(SCRIPT, str(smoke_shards), str(work), "ema")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads((work / "report.json").read_text())["ema"]


def test_generator_ema_same_on_every_rank_exact_on_resume_and_consolidated(ema_report):
    assert ema_report["steps"] == [5, 5, 5]
    assert ema_report["rank_spread"] == {"zero1": 0.0, "zero1_resumed": 0.0, "zero3": 0.0}
    assert [row[0] for row in ema_report["split"]] == [1, 2, 3, 4, 5, 6]
    assert ema_report["split"] == ema_report["straight"]
    assert ema_report["resume_max_diff"] == 0.0                    # bit-identical in fp32
    assert ema_report["zero3_vs_zero1"] < 1e-5
    assert ema_report["ema_vs_raw"] > 1e-6                          # an average, not the raw weights
    assert ema_report["consolidated_weights"] == "ema" and ema_report["consolidated_max_diff"] == 0.0
