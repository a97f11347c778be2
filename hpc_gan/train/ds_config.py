"""The DeepSpeed config dicts of the two engines, as pure functions of the run config.

Each engine gets its own, freshly built dict: DeepSpeed keeps a reference to the dict it is
given, and one dict shared by both engines would apply one engine's settings to the other.
The optimizers are not described here: the trainer hands each engine a client
``torch.optim.Adam`` (lr ``train.lr_generator`` / ``train.lr_critic``, ``train.betas``).

The dicts are compared with stored files in ``tests/golden/ds_config/``; a change here shows
up there as a diff to review.

Example:
    >>> cfg = load_config("c_sn_mp")
    >>> generator_config(cfg, world_size=4, cuda=True)["zero_optimization"]
    {'stage': 2}
    >>> critic_config(cfg, world_size=4, cuda=True)["fp16"]["initial_scale_power"]
    16
"""

from __future__ import annotations

from typing import Literal

from hpc_gan.config import RunConfig, TrainConfig, resolve_precision
from hpc_gan.errors import ConfigError

Engine = Literal["generator", "critic"]

# The trainer prints its own progress; DeepSpeed's periodic lines would interleave with it.
STEPS_PER_PRINT = 1_000_000_000
# fp16 dynamic loss scaling: halve the scale after `hysteresis` consecutive overflows, double it
# after `window` steps without one (DeepSpeed's defaults, written out so the goldens show them).
LOSS_SCALE_WINDOW = 1000
LOSS_SCALE_HYSTERESIS = 2
MIN_LOSS_SCALE = 1


def generator_config(cfg: RunConfig, world_size: int, cuda: bool) -> dict:
    """DeepSpeed config of the generator engine.

    Args:
        cfg: the run config (``cfg.train`` is read).
        world_size: number of ranks (data-parallel, one engine replica each).
        cuda: whether the ranks run on CUDA GPUs.

    Returns:
        A new dict, e.g. for ``c_sn_mp`` on 4 GPUs: ``train_batch_size`` 16, ZeRO stage 2, fp16
        with dynamic loss scaling, ``gradient_clipping`` 0.0.

    Raises:
        ConfigError: fp16 without CUDA, offload without any ZeRO-2/3 engine, or world_size < 1.
    """
    return _engine_config(cfg, "generator", world_size, cuda)


def critic_config(cfg: RunConfig, world_size: int, cuda: bool) -> dict:
    """DeepSpeed config of the critic engine (as :func:`generator_config`).

    Raises:
        ConfigError: as :func:`generator_config`, and ``train.zero_stage_critic`` 3: ZeRO-3
            releases weights that the gradient penalty's double backward still needs.
    """
    if cfg.train.zero_stage_critic >= 3:
        raise ConfigError(
            f"train.zero_stage_critic={cfg.train.zero_stage_critic}: the critic cannot use ZeRO-3 (the "
            "gradient penalty's double backward needs weights ZeRO-3 has released); use 1 or 2"
        )
    return _engine_config(cfg, "critic", world_size, cuda)


def _engine_config(cfg: RunConfig, engine: Engine, world_size: int, cuda: bool) -> dict:
    train = cfg.train
    if world_size < 1:
        raise ConfigError(f"world_size={world_size}: must be at least 1")
    stage = train.zero_stage_generator if engine == "generator" else train.zero_stage_critic
    config = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": train.batch_size * world_size,
        # DeepSpeed 0.19.8 clips gradients to norm 1.0 unless told otherwise
        # (GRADIENT_CLIPPING_DEFAULT); WGAN-GP's recipe has no clipping, and a clipped critic
        # step silently differs from the paper's (seen: the update came out x0.136).
        "gradient_clipping": 0.0,
        # The trainer passes client torch.optim.Adam optimizers, which ZeRO calls "untested".
        "zero_allow_untested_optimizer": True,
        "zero_optimization": _zero_section(train, stage, cuda),
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if "offload_optimizer" in config["zero_optimization"]:
        # ZeRO-Offload refuses a client optimizer other than DeepSpeedCPUAdam unless told that
        # the (slower) torch Adam stepping on CPU is intended.
        config["zero_force_ds_cpu_optimizer"] = False
    config.update(_precision_section(train, cuda))
    return config


def _zero_section(train: TrainConfig, stage: int, cuda: bool) -> dict:
    if train.offload_optimizer and max(train.zero_stage_generator, train.zero_stage_critic) < 2:
        raise ConfigError(
            "train.offload_optimizer=true needs ZeRO stage 2 or 3 on at least one engine; "
            "set train.zero_stage_generator=2 (or 3)"
        )
    section: dict = {"stage": stage}
    if train.offload_optimizer and stage >= 2:
        # Pinned host memory speeds up the GPU<->CPU copies; there is nothing to pin for on CPU.
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    return section


def _precision_section(train: TrainConfig, cuda: bool) -> dict:
    precision = resolve_precision(train, cuda)
    if precision == "fp16":
        # loss_scale 0 = dynamic. Each engine has its own scaler (the original code shared one).
        return {
            "fp16": {
                "enabled": True,
                "loss_scale": 0,
                "initial_scale_power": train.initial_loss_scale_power,
                "loss_scale_window": LOSS_SCALE_WINDOW,
                "hysteresis": LOSS_SCALE_HYSTERESIS,
                "min_loss_scale": MIN_LOSS_SCALE,
            }
        }
    if precision == "bf16":
        return {"bf16": {"enabled": True}}
    return {}
