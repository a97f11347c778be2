"""Rules that live in one place (issue 15.5): the precision resolver, the trainer route of a
(non-)private run, and the manifest of packed and generated shard directories."""

from __future__ import annotations

import pytest

from hpc_gan.config import load_config, resolve_precision
from hpc_gan.errors import ConfigError, LaunchError

pytestmark = pytest.mark.unit


def test_a_plan_may_describe_fp16_without_cuda_the_trainer_may_not():
    from hpc_gan.train.plan import plan_precision

    cfg = load_config("sn", overrides=["train.precision=fp16"])
    assert plan_precision(cfg, cuda=False) == "fp16"
    assert resolve_precision(cfg.train, False, refuse_fp16=False) == "fp16"
    with pytest.raises(ConfigError, match="needs CUDA GPUs"):
        resolve_precision(cfg.train, False)


def test_submission_refuses_fp16_without_gpus_through_the_same_resolver():
    from hpc_gan.launch.submit import check_precision

    cfg = load_config("sn", overrides=["train.precision=fp16"])
    with pytest.raises(LaunchError) as info:
        check_precision(cfg, "local")
    assert str(info.value) == ("variant sn: train.precision=fp16 needs GPUs (DeepSpeed refuses fp16 on CPU); "
                               "add --gpus-per-node N or use --set train.precision=bf16")
    check_precision(load_config("sn", overrides=["train.precision=fp16", "cluster.gpus_per_node=4"]), "slurm")


def test_each_trainer_refuses_the_other_route():
    from hpc_gan.train.trainer import check_trainer_route

    dp, sn = load_config("dp"), load_config("sn")
    check_trainer_route(dp, dp_sgd=True)
    check_trainer_route(sn, dp_sgd=False)
    with pytest.raises(ConfigError, match="DPTrainer, not by the DeepSpeed trainer"):
        check_trainer_route(dp, dp_sgd=False)
    with pytest.raises(ConfigError, match="privacy.enabled=true"):
        check_trainer_route(sn, dp_sgd=True)


def test_one_manifest_builder_for_packed_and_generated_patches():
    from hpc_gan.data.manifest import REQUIRED_KEYS, build_manifest

    common = dict(patch_shape=(8, 8, 4), spacing=(0.5, 0.5, 0.8000001), has_mask=False, normalisation={},
                  sampling={}, compression="lzf", splits={}, sources={})
    packed, generated = build_manifest(**common, orientation="RAS"), build_manifest(**common)
    assert packed["orientation"] == "RAS" and "orientation" not in generated
    assert list(packed)[:9] == ["format", "format_version", "tool_version", "created", "patch_shape", "channels",
                                "has_mask", "spacing", "orientation"]
    assert packed["patch_shape"] == [8, 8, 4] and packed["spacing"] == [0.5, 0.5, 0.8]
    assert all(key in generated for key in REQUIRED_KEYS)
