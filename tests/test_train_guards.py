"""hpc_gan.train.guards: finiteness of weights and buffers, the divergence bound, the stop line;
their call sites in consolidation, sampling and the metrics log (no DeepSpeed)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hpc_gan.models.resnet3d import state_dict_sha256

from hpc_gan import config
from hpc_gan.cli import main
from hpc_gan.models import Generator
from hpc_gan.train import checkpoint as ckpt
from hpc_gan.train import guards
from hpc_gan.train.consolidate import consolidate, load_generator
from hpc_gan.train.metrics import MetricsLogger, progress_line

pytestmark = pytest.mark.unit
PATCH = (16, 16, 16)


# ------------------------------------------------------------------------------ finiteness


def test_first_nonfinite_names_the_first_bad_tensor_and_what_is_wrong():
    named = [("a", torch.ones(3)), ("steps", torch.tensor([5])), ("b", torch.tensor([1.0, math.nan, math.inf])),
             ("c", torch.tensor([math.inf]))]
    assert guards.first_nonfinite(named) == ("b", "nan/inf in 2 of 3 values")
    assert guards.first_nonfinite([("x", torch.tensor([-math.inf, 0.0]))]) == ("x", "inf in 1 of 2 values")
    assert guards.first_nonfinite([("a", torch.ones(2)), ("n", torch.tensor([7]))]) is None
    assert guards.first_nonfinite([("empty", torch.empty(0))]) is None


def test_module_tensors_cover_buffers_and_zero3_partitions():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        module[1].running_var.fill_(math.inf)  # finite weights, infinite buffer: what lr 1e12 left in checkpoints
    assert guards.first_nonfinite(guards.module_tensors("generator", module)) == \
        ("generator.1.running_var", "inf in 2 of 2 values")
    placeholder = torch.nn.Parameter(torch.empty(0))
    placeholder.ds_tensor = torch.tensor([math.nan])  # ZeRO-3: the local partition holds the values
    module[0].weight = placeholder
    assert guards.first_nonfinite(guards.module_tensors("g", module))[0] == "g.0.weight"


def test_check_finite_is_one_line_and_agree_without_a_group_is_local():
    with pytest.raises(guards.NonFiniteStateError) as info:
        guards.check_finite([("bn.running_var", torch.tensor([math.inf]))], "file 'g.pt'", "pick another")
    assert str(info.value) == "file 'g.pt' holds non-finite values: 'bn.running_var' has inf in 1 of 1 values; " \
                              "pick another"
    assert guards.agree_nonfinite([("w", torch.tensor([math.nan]))], rank=3) == "'w' has nan in 1 of 1 values (rank 3)"
    assert guards.agree_nonfinite([("w", torch.ones(1))], rank=0) is None


# ------------------------------------------------------------------------------ divergence


def test_data_diameter_is_the_farthest_two_patches_can_be():
    assert guards.data_diameter((32, 32, 16)) == pytest.approx(torch.dist(torch.ones(2 * 32 * 32 * 16),
                                                                          -torch.ones(2 * 32 * 32 * 16)).item())


def test_divergence_needs_consecutive_windows_and_resets():
    guard = guards.DivergenceGuard((32, 32, 16), lipschitz=100, max_running_var=1e6, windows=3)
    bound = 100 * guards.data_diameter((32, 32, 16))
    assert guard.observe(0.99 * bound, 1.0) is None and not guard.suspect  # within bounds
    assert guard.observe(-1.01 * bound, 1.0) is None and guard.suspect    # |W|, either sign
    assert guard.observe(None, 1.0) is None and guard.streak == 2         # a window without a finite step
    assert guard.observe(1.0, 1.0) is None and not guard.suspect           # back in bounds: the streak restarts
    for _ in range(2):
        assert guard.observe(1.0, 2e6) is None
    assert guard.observe(1.0, math.inf) == "a generator BatchNorm running_var = inf > 1e+06 " \
                                           "(train.divergence_max_running_var)"
    assert guard.observe(1e13, 1.0).startswith("|W| = 1e+13 > 36203.87")


def test_divergence_bounds_can_be_turned_off():
    guard = guards.DivergenceGuard((32, 32, 16), lipschitz=0, max_running_var=0, windows=1)
    assert guard.observe(1e30, 1e30) is None
    assert guard.observe(math.nan, 1.0) is not None  # a NaN W is never "in bounds"


def test_the_bounds_are_configurable_documented_and_explained(capsys):
    cfg = config.load_config("sn", overrides=["train.divergence_lipschitz=10", "train.divergence_windows=2",
                                              "train.divergence_max_running_var=1e8"])
    assert (cfg.train.divergence_lipschitz, cfg.train.divergence_windows, cfg.train.divergence_max_running_var) == \
        (10.0, 2, 1e8)
    assert config.load_config("sn").train.divergence_max_running_var == guards.FP16_MAX ** 2
    assert main(["config", "--explain"]) == 0
    out = capsys.readouterr().out
    for key in ("train.divergence_lipschitz", "train.divergence_max_running_var", "train.divergence_windows"):
        assert key in out


def test_stop_message_names_the_last_good_checkpoint_only_when_there_is_one(tmp_path):
    root = tmp_path / "checkpoints"
    none = guards.stop_message("losses were not finite for 3 consecutive steps", 5, "fp32", root)
    assert none == ("training stopped at step 5: losses were not finite for 3 consecutive steps; no checkpoint was "
                    "written before it (start again); lower train.lr_critic and train.lr_generator")
    assert "fp32" not in none.split("steps;")[1]  # no "use fp32" for an fp32 run
    where = root / ckpt.tag_of(10)
    where.mkdir(parents=True)
    (where / ckpt.STATE).write_text(json.dumps({"step": 10}))
    ckpt.mark_complete(root, ckpt.tag_of(10))
    named = guards.stop_message("x", 12, "bf16", root)
    assert f"the last good checkpoint is {root / 'step-00000010'} (a resume continues from it)" in named
    assert named.endswith("lower train.lr_critic and train.lr_generator or use train.precision=fp32")


# ------------------------------------------------------------------------------ metrics


def test_a_window_without_a_finite_step_logs_null_not_zero(tmp_path, capsys):
    metrics = MetricsLogger(tmp_path, rank=0, world_size=1, total_steps=10, log_every=5, tensorboard=False)
    metrics.flush(5, 0, {})
    metrics.add({"loss_critic": 1.0, "loss_generator": 2.0, "wasserstein": 3.0, "penalty": 0.5}, 2)
    metrics.flush(10, 0, {})
    first, second = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [first[k] for k in ("loss_critic", "loss_generator", "wasserstein", "penalty")] == [None] * 4
    assert second["wasserstein"] == 3.0 and metrics.last_means["wasserstein"] == 3.0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("step 5/10 ep 0 | D - G - W - GP - |")
    assert progress_line(first | {"epsilon": None}, 10).split("|")[1].strip() == "D - G - W - eps -"


# ------------------------------------------------------------------------------ consolidate and sample


def _dp_checkpoint(run_dir, step: int, poison: str | None = None):
    """A COMPLETE checkpoint in the DP trainer's format (whole weights, no ZeRO shards)."""
    root = run_dir / "checkpoints"
    where = root / ckpt.tag_of(step)
    where.mkdir(parents=True)
    torch.manual_seed(0)
    state = Generator(8, 16, PATCH).state_dict()
    if poison:
        state[poison] = torch.full_like(state[poison], math.inf)
    buffers = {k: v for k, v in state.items() if "running" in k or "num_batches" in k}
    torch.save({"model": {k: v for k, v in state.items() if k not in buffers}}, where / "dp_generator.pt")
    torch.save(buffers, where / ckpt.BUFFERS)
    cfg = config.to_dict(config.load_config("sn", "smoke", overrides=["model.latent_dim=8", "model.ngf=16",
                                                                       "model.patch_shape=16,16,16"]))
    (where / ckpt.STATE).write_text(json.dumps({"step": step, "variant": "sn", "trainer": "dp", "config": cfg}))
    ckpt.mark_complete(root, ckpt.tag_of(step))
    return where


def test_consolidate_refuses_infinite_running_variances_and_names_them(tmp_path):
    _dp_checkpoint(tmp_path, 2)
    good = consolidate(tmp_path)
    assert load_generator(good)[1]["step"] == 2
    _dp_checkpoint(tmp_path, 4, poison="net.2.2.running_var")
    with pytest.raises(guards.NonFiniteStateError, match=r"checkpoint '.*step-00000004' holds non-finite values: "
                       r"'net.2.2.running_var' has inf in 8 of 8 values; it cannot be consolidated; pick an earlier "
                       r"--tag \(complete ones: step-00000002, step-00000004\)"):
        consolidate(tmp_path)
    assert not (tmp_path / "consolidated" / "generator-step-00000004.pt").exists()


def test_sampling_refuses_a_consolidated_file_with_infinite_buffers(tmp_path, capsys):
    _dp_checkpoint(tmp_path, 2)
    path = consolidate(tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["net.0.running_var"][0] = math.inf  # e.g. written by an older version
    payload["state_dict_sha256"] = state_dict_sha256(payload["state_dict"])  # a consistent digest: not damage
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(guards.NonFiniteStateError, match="'net.0.running_var' has inf in 1 of"):
        load_generator(bad)
    assert main(["sample", str(bad), "--n", "2", "--out", str(tmp_path / "samples")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "net.0.running_var" in err
    assert not (tmp_path / "samples").exists()
