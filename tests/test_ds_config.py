"""The two DeepSpeed config dicts (hpc_gan.train.ds_config), compared with stored golden files.

Each golden file ``tests/golden/ds_config/<case>.json`` holds ``{"generator": ..., "critic": ...}``
for one variant on 4 ranks, written with ``json.dumps(..., sort_keys=True, indent=2)``. After an
intended change to the configs, regenerate them and review the diff::

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_ds_config.py
    git diff tests/golden/ds_config
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hpc_gan.config import load_config, resolve_precision
from hpc_gan.errors import ConfigError
from hpc_gan.train.ds_config import critic_config, generator_config

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).resolve().parent / "golden" / "ds_config"
WORLD_SIZE = 4

# case name -> (variant, cuda, overrides)
CASES = {
    "gp_cpu": ("gp", False, []),
    "sn_mp_cpu": ("sn_mp", False, []),
    "sn_mp_cuda": ("sn_mp", True, []),
    "c_sn_mp_cuda": ("c_sn_mp", True, []),
    "xl_sn_mp_cuda": ("xl_sn_mp", True, []),
    "xl_sn_mp_offload_cuda": ("xl_sn_mp", True, ["train.offload_optimizer=true"]),
}


def both(variant: str, cuda: bool, overrides=(), world_size: int = WORLD_SIZE) -> dict:
    cfg = load_config(variant, overrides=overrides)
    return {"generator": generator_config(cfg, world_size, cuda), "critic": critic_config(cfg, world_size, cuda)}


def dump(configs: dict) -> str:
    return json.dumps(configs, sort_keys=True, indent=2) + "\n"


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_matches_golden_file(case):
    variant, cuda, overrides = CASES[case]
    text = dump(both(variant, cuda, overrides))
    path = GOLDEN / f"{case}.json"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} missing; run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{case} differs from {path}; UPDATE_GOLDEN=1 rewrites it after review"


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_clipping_is_off_in_every_config(case):
    variant, cuda, overrides = CASES[case]
    for config in both(variant, cuda, overrides).values():
        assert config["gradient_clipping"] == 0.0


def test_batch_sizes_follow_world_size():
    configs = both("sn", False, world_size=3)
    for config in configs.values():
        assert config["train_micro_batch_size_per_gpu"] == 4
        assert config["gradient_accumulation_steps"] == 1
        assert config["train_batch_size"] == 12


def test_per_engine_zero_stage_and_offload():
    cfg = load_config("xl_sn_mp", overrides=["train.offload_optimizer=true"])
    gen, crit = generator_config(cfg, 2, True), critic_config(cfg, 2, True)
    assert gen["zero_optimization"]["stage"] == 3 and crit["zero_optimization"]["stage"] == 2
    assert gen["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert critic_config(cfg, 2, False)["zero_optimization"]["offload_optimizer"]["pin_memory"] is False
    assert gen["zero_force_ds_cpu_optimizer"] is False


def test_offload_on_a_stage_1_engine_is_left_out_and_needs_some_stage_2():
    cfg = load_config("c_sn_mp", overrides=["train.offload_optimizer=true"])   # generator 2, critic 1
    assert "offload_optimizer" in generator_config(cfg, 1, True)["zero_optimization"]
    assert "offload_optimizer" not in critic_config(cfg, 1, True)["zero_optimization"]
    assert "zero_force_ds_cpu_optimizer" not in critic_config(cfg, 1, True)
    with pytest.raises(ConfigError, match="offload_optimizer=true needs ZeRO stage 2"):
        generator_config(load_config("sn", overrides=["train.offload_optimizer=true"]), 1, True)


@pytest.mark.parametrize("precision, cuda, expected", [
    ("auto", True, "fp16"), ("auto", False, "bf16"), ("fp16", True, "fp16"),
    ("bf16", False, "bf16"), ("bf16", True, "bf16"), ("fp32", False, "fp32"), ("fp32", True, "fp32"),
])
def test_resolve_precision(precision, cuda, expected):
    train = load_config("sn", overrides=[f"train.precision={precision}"]).train
    assert resolve_precision(train, cuda) == expected


def test_fp16_on_cpu_raises_with_the_fix():
    cfg = load_config("sn", overrides=["train.precision=fp16"])
    message = ("train.precision=fp16 needs CUDA GPUs (DeepSpeed refuses fp16 on CPU); "
               "use bf16 or fp32 on CPU")
    with pytest.raises(ConfigError) as info:
        resolve_precision(cfg.train, cuda=False)
    assert str(info.value) == message
    for build in (generator_config, critic_config):
        with pytest.raises(ConfigError, match="needs CUDA GPUs"):
            build(cfg, 1, False)


def test_precision_sections():
    cfg = load_config("sn", overrides=["train.precision=fp16", "train.initial_loss_scale_power=12"])
    fp16 = critic_config(cfg, 1, True)["fp16"]
    assert fp16 == {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 1000,
                    "hysteresis": 2, "min_loss_scale": 1}
    bf16 = generator_config(load_config("sn_mp"), 1, False)
    assert bf16["bf16"] == {"enabled": True} and "fp16" not in bf16
    fp32 = generator_config(load_config("gp"), 1, True)
    assert "fp16" not in fp32 and "bf16" not in fp32


def test_the_two_dicts_are_distinct_objects():
    cfg = load_config("c_sn_mp")
    gen, crit = generator_config(cfg, 4, True), critic_config(cfg, 4, True)
    before = json.dumps(crit, sort_keys=True)
    for key in gen:
        if isinstance(gen[key], dict):
            assert gen[key] is not crit.get(key)
    gen["fp16"]["initial_scale_power"] = 3
    gen["zero_optimization"]["stage"] = 3
    gen["train_batch_size"] = 1
    assert json.dumps(crit, sort_keys=True) == before
    assert generator_config(cfg, 4, True)["fp16"]["initial_scale_power"] == 16   # no shared state


def test_critic_zero_3_is_refused():
    cfg = load_config("xl_sn_mp")
    cfg.train.zero_stage_critic = 3          # the config loader bounds it; bypass that here
    with pytest.raises(ConfigError, match="zero_stage_critic=3"):
        critic_config(cfg, 1, True)
    assert generator_config(cfg, 1, True)["zero_optimization"]["stage"] == 3


def test_world_size_below_one_is_refused():
    with pytest.raises(ConfigError, match="world_size=0"):
        generator_config(load_config("gp"), 0, False)
