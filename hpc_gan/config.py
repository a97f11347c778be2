"""Typed run configuration: YAML files composed with ``--set a.b=value`` overrides.

A run is described by one :class:`RunConfig`. It is built by layering, each later layer
overriding the earlier ones key by key (paths relative to the config directory,
``hpc_gan/configs/`` inside the package unless ``HPC_GAN_CONFIG_DIR`` names another)::

    configs/base.yaml  <-  configs/variants/<variant>.yaml  <-  configs/profiles/<profile>.yaml
                       <-  configs/clusters/<cluster>.yaml  <-  --set a.b=value ...

Every field is declared once below with its type, default, documentation and allowed range.
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the field
and the fix, so a typo in a YAML file or on the command line fails before a job is submitted.

Example:
    >>> cfg = load_config("sn_mp", profile="smoke", overrides=["train.batch_size=2"])
    >>> cfg.model.patch_shape, cfg.train.batch_size
    ((32, 32, 16), 2)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hpc_gan.errors import ConfigError

CONFIG_DIR_ENV = "HPC_GAN_CONFIG_DIR"
# Shipped inside the package (hpc_gan/configs/) so that a wheel installed anywhere has them.
PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def opt(default: Any, doc: str, *, min: float | None = None, max: float | None = None,
        below: float | None = None) -> Any:
    """Declare a config field with its documentation, optional inclusive bounds ``min``/``max``
    and an optional exclusive upper bound ``below`` (every item of a tuple is checked)."""
    meta = {"doc": doc, "min": min, "max": max, "below": below}
    if isinstance(default, (list, dict)):
        raise TypeError("mutable defaults are not allowed in config fields")
    return field(default=default, metadata=meta)


Precision = Literal["auto", "fp16", "bf16", "fp32"]
CriticNorm = Literal["instance", "spectral", "group", "none"]


@dataclass
class ModelConfig:
    """Generator and critic sizes (architecture in DESIGN.md)."""

    latent_dim: int = opt(128, "Size of the generator's input z ~ N(0, I).", min=1)
    ngf: int = opt(512, "Generator width: channels after the first Linear (halved 3 times).", min=8)
    ndf: int = opt(512, "Critic width: channels of its last convolution.", min=8)
    patch_shape: tuple[int, int, int] = opt(
        (128, 128, 64), "Patch size in voxels, NIfTI axis order (x, y, z); each divisible by 16.", min=16
    )
    critic_norm: CriticNorm = opt(
        "instance", "Critic normalisation: instance (gp), spectral (sn*), group (dp), none."
    )
    label_threshold: float = opt(
        0.5, "Threshold on the generated label channel (after mapping tanh to [0, 1]).", min=0.0, max=1.0
    )

    def validate(self) -> None:
        for axis, size in zip("xyz", self.patch_shape):
            if size % 16:
                raise ConfigError(
                    f"model.patch_shape {self.patch_shape}: the {axis} size {size} is not divisible by 16 "
                    "(the critic halves it 4 times); pick e.g. 32,32,16 or 128,128,64"
                )
        for name in ("ngf", "ndf"):
            if getattr(self, name) % 8:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be divisible by 8")


@dataclass
class TrainConfig:
    """Optimisation, precision, ZeRO and checkpointing of the two-engine trainer."""

    batch_size: int = opt(4, "Patches per rank per step (the paper: 4 on one GPU).", min=1)
    epochs: int = opt(100, "Passes over the training patches.", min=1)
    max_steps: int = opt(0, "Stop after this many generator steps; 0 = run all epochs.", min=0)
    n_critic: int = opt(1, "Critic steps per generator step.", min=1)
    lr_critic: float = opt(4e-4, "Adam learning rate of the critic.", min=0.0)
    lr_generator: float = opt(2e-4, "Adam learning rate of the generator.", min=0.0)
    betas: tuple[float, float] = opt(
        (0.0, 0.9), "Adam betas for both networks; each in [0, 1) as torch.optim.Adam requires.", min=0.0, below=1.0
    )
    gp_weight: float = opt(10.0, "Gradient-penalty weight lambda; 0 disables the penalty.", min=0.0)
    gp_mode: Literal["per_sample", "batch"] = opt(
        "per_sample",
        "per_sample: standard WGAN-GP (one interpolation weight and one gradient norm per example). "
        "batch: the original code's penalty (one weight and one norm for the whole batch), for "
        "reproducing its numbers only.",
    )
    weight_clip: float = opt(0.0, "Clip critic weights to +-this after each step; 0 = off (dp: 0.01).", min=0.0)
    precision: Precision = opt(
        "fp32", "fp16 (dynamic loss scaling, CUDA only), bf16, fp32, or auto = fp16 on CUDA, bf16 on CPU."
    )
    zero_stage_generator: int = opt(1, "DeepSpeed ZeRO stage of the generator engine.", min=1, max=3)
    zero_stage_critic: int = opt(
        1, "ZeRO stage of the critic engine (3 is impossible: the penalty's double backward).", min=1, max=2
    )
    offload_optimizer: bool = opt(False, "Keep optimizer states in CPU memory (ZeRO-2/3 only).")
    activation_checkpointing: bool = opt(
        False, "Recompute block activations in backward to save memory: the generator's upsample+conv, the "
        "critic's blocks unless it uses spectral norm (its power iteration would run twice)."
    )
    sync_batchnorm: bool = opt(
        False, "Generator BatchNorm over the global batch (SyncBatchNorm) instead of each rank's batch."
    )
    initial_loss_scale_power: int = opt(16, "fp16: the dynamic loss scale starts at 2**this.", min=0, max=32)
    max_nonfinite_steps: int = opt(
        10, "bf16/fp32: stop the run after this many consecutive non-finite losses.", min=1
    )
    divergence_lipschitz: float = opt(
        100.0, "Stop a diverging run: a logging window is out of bounds when the critic's Wasserstein estimate |W| "
        "exceeds this many data diameters (2*sqrt(2*X*Y*Z), the farthest two patches in [-1, 1] can be; a "
        "1-Lipschitz critic keeps |W| below one diameter). 0 = off. See hpc_gan/train/guards.py.", min=0.0
    )
    divergence_max_running_var: float = opt(
        65504.0 ** 2, "Stop a diverging run: a logging window is also out of bounds when a generator BatchNorm "
        "running_var exceeds this (default 65504^2: activations whose std exceeds fp16's largest number). 0 = off.",
        min=0.0
    )
    divergence_windows: int = opt(
        3, "Consecutive out-of-bounds logging windows (train.log_every steps each) that stop the run; no periodic "
        "checkpoint is written while the last window was out of bounds.", min=1
    )
    seed: int = opt(0, "Seed of the model init, latents, penalty interpolation and data order.", min=0)
    log_every: int = opt(50, "Steps between progress lines and metrics records.", min=1)
    image_every: int = opt(500, "Steps between sample slices written to TensorBoard; 0 = never.", min=0)
    checkpoint_every: int = opt(1000, "Steps between checkpoints (one is always written at the end).", min=1)
    keep_checkpoints: int = opt(
        3, "Complete checkpoints kept; older ones are deleted (never the one checkpoints/best points to).", min=1
    )
    eval_every: int = opt(
        1000, "Steps between evaluations of the generator during training (FID, precision/recall, coverage, "
        "vessel-fraction KS, label contrast on a fixed latent set; one also at the end); 0 = never. An evaluation "
        "that improves the best FID is checkpointed and becomes checkpoints/best.", min=0
    )
    eval_samples: int = opt(
        256, "Evaluation during training: generated patches (fixed latents) and real training patches "
        "(a fixed subset, at most all of them) compared; at least 6, as precision/recall use the 5 nearest "
        "neighbours.", min=6
    )
    eval_segmenter: bool = opt(
        False, "Evaluation during training also scores label-image agreement with a reference segmenter "
        "(a small 3D U-Net trained once per run on the real training split at the first evaluation, cached in "
        "<run>/eval_cache/): mean DSC of its prediction on each generated image against the generated label."
    )
    eval_weights: str = opt(
        "", "Evaluation during training: MedicalNet ResNet-10 weights for the features; empty = the seeded "
        "random extractor (figures comparable within and across runs, not with published FIDs)."
    )
    num_workers: int = opt(
        2, "DataLoader worker processes per rank reading the shards (a data.cache split is read by one prefetch "
        "thread instead; the cache build decodes with this many processes).", min=0
    )
    ema_decay: float = opt(
        0.0, "Keep an exponential moving average of the generator's weights with this decay (e.g. 0.999; "
        "must be < 1); checkpoints and the consolidated file carry it and `hpc_gan sample` uses it unless --raw. "
        "0 = off (the paper's recipe).", min=0.0
    )
    ema_warmup: bool = opt(
        False, "Ramp the EMA decay up at the start (StyleGAN): min(ema_decay, (1 + t) / (10 + t)) after t "
        "generator steps, so the random initial weights are forgotten quickly."
    )

    def validate(self) -> None:
        if self.ema_decay >= 1.0:
            raise ConfigError(f"train.ema_decay={self.ema_decay!r} is out of range: must be < 1 (1 would never "
                              "move the average); use e.g. 0.999, or 0 to turn the EMA off")


@dataclass
class DataConfig:
    """Where the packed shards are and how they are read."""

    root: str = opt("data/shards", "Directory holding manifest.json and the HDF5 shards.")
    split: str = opt("train", "Split the GAN trains on.")
    verify: Literal["full", "size", "none"] = opt(
        "full", "Check shards when a job starts: full = SHA-256, size = file sizes, none."
    )
    cache: Literal["none", "memory", "local_disk"] = opt(
        "none", "Node-local decoded cache of the split (docs/SCALING.md): none = decode the shards in every "
        "epoch; memory = decode once per node into shared memory (/dev/shm), float16 image + bit-packed label, "
        "mapped read-only by every rank, converted to float on its device; local_disk = the same store on a node-local disk "
        "(data.cache_dir), for splits larger than memory."
    )
    cache_dir: str = opt(
        "", "Directory of the local_disk cache; empty = $SLURM_TMPDIR, else the system temp directory."
    )
    cache_image_dtype: Literal["float16", "float32"] = opt(
        "float16", "Image precision in the cache: float16 = half the bytes, error <= 2**-12 on [-1, 1] (the "
        "same rounding as fp16 training); float32 = exactly the shards' values."
    )
    cache_keep: bool = opt(
        False, "Keep the cache after the job (a later job on the node reuses it); false = the last process "
        "on the node that used it removes it."
    )


@dataclass
class ClusterConfig:
    """Resources of one job (one variant); the launcher turns them into SLURM parameters."""

    nodes: int = opt(1, "Nodes per job.", min=1)
    tasks_per_node: int = opt(1, "Ranks per node (= GPUs per node on GPU clusters).", min=1)
    gpus_per_node: int = opt(0, "GPUs requested per node; 0 on CPU clusters.", min=0)
    cpus_per_task: int = opt(4, "CPU cores per rank (DataLoader workers + main process).", min=1)
    mem_gb: int = opt(0, "Memory per node in GB; 0 = the partition's default.", min=0)
    time_min: int = opt(1440, "Time limit per job in minutes; the job is requeued when it expires.", min=1)
    partition: str = opt("", "SLURM partition; empty = the cluster's default.")
    account: str = opt("", "SLURM account; empty = none.")
    qos: str = opt("", "SLURM quality of service; empty = none.")
    max_requeues: int = opt(5, "Times a job is requeued after a timeout or preemption.", min=0)
    array_parallelism: int = opt(16, "Array tasks (variants) running at once.", min=1)
    signal_delay_s: int = opt(180, "Seconds before the time limit at which ranks are told to checkpoint.", min=10)


@dataclass
class PrivacyConfig:
    """DP-SGD on the critic (variant dp, the paper's appendix B)."""

    enabled: bool = opt(False, "Train the critic with DP-SGD (Opacus).")
    noise_multiplier: float = opt(0.5, "Gaussian noise std relative to the clip norm (sigma).", min=0.0)
    max_grad_norm: float = opt(1.0, "Per-sample gradient clip norm.", min=0.0)
    delta: float = opt(0.0, "Target delta; 0 = 1 / number of training patches.", min=0.0, max=1.0)
    target_epsilon: float = opt(0.0, "If > 0, choose sigma to reach this epsilon instead.", min=0.0)
    secret_seeds: bool = opt(
        True, "Seed the noise and the Poisson sampling from the operating system (kept only in checkpoints); "
        "false = derive them from train.seed, which config.yaml publishes: reproducible runs for tests only."
    )


@dataclass
class RunConfig:
    """One training run of one variant."""

    name: str = opt("run", "Experiment name: runs go to <output_root>/<name>/<variant>/.")
    variant: str = opt("", "Variant file the run was composed from (gp, sn, sn_mp, c_sn_mp, ...).")
    profile: str = opt("", "Profile file applied on top of the variant, if any.")
    output_root: str = opt("runs", "Root directory of experiments.")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "Networks."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "Training."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "Training data."})
    cluster: ClusterConfig = field(default_factory=ClusterConfig, metadata={"doc": "Job resources."})
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig, metadata={"doc": "Differential privacy."})

    def validate(self) -> None:
        self.model.validate()
        if self.privacy.enabled:
            self._validate_privacy()

    def _validate_privacy(self) -> None:
        """The dp route is Opacus (per-sample gradients), not DeepSpeed: refuse what it cannot honour."""
        t = self.train
        if t.gp_weight > 0:
            raise ConfigError(
                "privacy.enabled with train.gp_weight > 0: Opacus cannot clip the penalty's second-order "
                "term; set train.gp_weight=0 (the dp variant uses weight clipping instead)"
            )
        deepspeed_only = {
            "train.precision": t.precision not in ("fp32", "auto"),
            "train.zero_stage_generator": t.zero_stage_generator != 1,
            "train.zero_stage_critic": t.zero_stage_critic != 1,
            "train.offload_optimizer": t.offload_optimizer,
            "train.activation_checkpointing": t.activation_checkpointing,
            "train.sync_batchnorm": t.sync_batchnorm,
        }
        asked = [key for key, set_ in deepspeed_only.items() if set_]
        if asked:
            raise ConfigError(
                f"privacy.enabled with {', '.join(asked)}: the dp variant is trained without DeepSpeed (DP-SGD needs "
                "per-sample gradients, which DeepSpeed's engines do not compute; Opacus' data-parallel route keeps "
                "whole fp32 networks on every rank); remove these settings (docs/PRIVACY.md)"
            )
        if self.model.critic_norm == "spectral":
            raise ConfigError(
                "privacy.enabled with model.critic_norm=spectral: Opacus cannot compute per-sample gradients through "
                "spectral norm; set model.critic_norm=group (the paper's choice), instance or none"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_root) / self.name / (self.variant or "custom")


def resolve_precision(train: TrainConfig, cuda: bool, *, refuse_fp16: bool = True, gpus: str = "CUDA GPUs",
                      fix: str = "use bf16 or fp32 on CPU") -> str:
    """The precision a run trains in: the one resolver of ``train.precision`` (trainer, DeepSpeed
    configs, memory plan, submission checks).

    Args:
        train: the ``train`` section; ``train.precision`` is auto, fp16, bf16 or fp32.
        cuda: whether the ranks run on CUDA GPUs.
        refuse_fp16: refuse fp16 without CUDA (False: a memory plan describes a GPU job wherever
            it is computed).
        gpus, fix: the refusal's words for what is missing and how to fix it.

    Returns:
        ``"fp16"``, ``"bf16"`` or ``"fp32"``; ``auto`` is fp16 on CUDA (the paper's mixed
        precision) and bf16 on CPU.

    Raises:
        ConfigError: fp16 without CUDA (DeepSpeed refuses it), unless ``refuse_fp16`` is False.
    """
    if train.precision == "auto":
        return "fp16" if cuda else "bf16"
    if refuse_fp16 and train.precision == "fp16" and not cuda:
        raise ConfigError(f"train.precision=fp16 needs {gpus} (DeepSpeed refuses fp16 on CPU); {fix}")
    return train.precision


# --------------------------------------------------------------------------------------------
# Locating and composing files


def config_dir() -> Path:
    """The directory with base.yaml, variants/, profiles/ and clusters/.

    The one shipped in the package (``hpc_gan/configs``), unless ``HPC_GAN_CONFIG_DIR`` names a
    user's own directory of the same layout (e.g. a copy with site-specific clusters/).

    Raises:
        ConfigError: the directory has no ``base.yaml`` (a wrong ``HPC_GAN_CONFIG_DIR``).
    """
    user_directory = os.environ.get(CONFIG_DIR_ENV)
    directory = Path(user_directory or PACKAGE_CONFIG_DIR)
    if not (directory / "base.yaml").is_file():
        if user_directory:
            raise ConfigError(f"config directory '{directory}' (from {CONFIG_DIR_ENV}) has no base.yaml; point "
                              f"{CONFIG_DIR_ENV} at a copy of '{PACKAGE_CONFIG_DIR}' or unset it")
        raise ConfigError(f"the installed package has no '{directory / 'base.yaml'}': a broken install "
                          "(was the wheel built without its package data?); reinstall hpc_gan")
    return directory


def available(kind: str) -> list[str]:
    """Names of the YAML files of one kind: ``variants``, ``profiles`` or ``clusters``."""
    return sorted(p.stem for p in (config_dir() / kind).glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__}: {exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _named_file(kind: str, name: str) -> Path:
    path = config_dir() / kind / f"{name}.yaml"
    if not path.is_file():
        choices = available(kind)
        hint = difflib.get_close_matches(name, choices, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        singular = kind[:-1]
        raise ConfigError(f"unknown {singular} '{name}'{suggestion}; valid {kind}: {', '.join(choices)}")
    return path


def deep_merge(base: dict, update: dict) -> dict:
    """Return ``base`` updated key by key with ``update``; nested mappings merge recursively."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict:
    """Turn ``"train.lr_critic=1e-4"`` into ``{"train": {"lr_critic": "1e-4"}}`` (typed later)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form section.key=value (e.g. train.batch_size=2)")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node: dict = {}
    cursor = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return node


def load_config(
    variant: str,
    profile: str | None = None,
    cluster: str | None = None,
    overrides: typing.Iterable[str] = (),
) -> RunConfig:
    """Compose and validate a run configuration.

    Args:
        variant: name of a file in ``configs/variants`` (e.g. ``"c_sn_mp"``).
        profile: optional name of a file in ``configs/profiles`` (e.g. ``"smoke"``).
        cluster: optional name of a file in ``configs/clusters``.
        overrides: ``section.key=value`` strings applied last.

    Returns:
        The validated :class:`RunConfig`.

    Raises:
        ConfigError: unknown file, unknown key, wrong type or value out of range.
    """
    merged = _read_yaml(config_dir() / "base.yaml")
    merged = deep_merge(merged, _read_yaml(_named_file("variants", variant)))
    if profile:
        merged = deep_merge(merged, _read_yaml(_named_file("profiles", profile)))
    if cluster:
        merged = deep_merge(merged, _read_yaml(_named_file("clusters", cluster)))
    for text in overrides:
        merged = deep_merge(merged, parse_override(text))
    merged["variant"] = variant
    merged["profile"] = profile or ""
    return from_dict(merged)


def load_resolved(path: str | os.PathLike) -> RunConfig:
    """Read a resolved config written by :func:`save_config` (no composition)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    return from_dict(_read_yaml(path))


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (temporary file, then rename)."""
    from hpc_gan.io import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (tuples become lists, as in YAML)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, documentation) of every field, for ``hpc_gan config --explain``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(describe(hint, f"{prefix}{f.name}."))
        else:
            rows.append((prefix + f.name, _type_name(hint), f.default, f.metadata.get("doc", "")))
    return rows


# --------------------------------------------------------------------------------------------
# Typed construction with clear errors


def from_dict(data: dict, cls: type = RunConfig, prefix: str = "") -> Any:
    """Build (and validate) a config dataclass from nested plain data."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = unknown[0]
        hint = difflib.get_close_matches(str(key), list(fields), n=1)
        suggestion = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
        where = f"section '{prefix.rstrip('.')}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key '{prefix}{key}'{suggestion}; valid keys in {where}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        dotted = prefix + name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(value if value is not None else {}, hint, dotted + ".")
        else:
            kwargs[name] = _check_range(_coerce(value, hint, dotted), fields[name], dotted)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(map(str, typing.get_args(hint)))
    if origin is tuple:
        return "tuple of " + ", ".join(a.__name__ for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, dotted: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{dotted}={value!r} is not one of: {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        return _coerce_tuple(value, typing.get_args(hint), dotted)
    return _coerce_scalar(value, hint, dotted)


def _coerce_tuple(value: Any, item_types: tuple, dotted: str) -> tuple:
    if isinstance(value, str):
        value = [v for v in value.replace("x", ",").split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
        raise ConfigError(
            f"{dotted}={value!r}: expected {len(item_types)} values, e.g. "
            f"{dotted}={','.join('1' for _ in item_types)}"
        )
    return tuple(_coerce_scalar(v, t, f"{dotted}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))


def _coerce_scalar(value: Any, kind: type, dotted: str) -> Any:
    wrong = ConfigError(f"{dotted}={value!r}: expected {kind.__name__}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if kind is int:
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise wrong from None
        raise wrong
    if kind is float:
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value.strip())
            except ValueError:
                raise wrong from None
        raise wrong
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise wrong
    raise TypeError(f"unsupported config type {kind} for {dotted}")  # a bug in this module


def _check_range(value: Any, f: dataclasses.Field, dotted: str) -> Any:
    lo, hi, below = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("below")
    for item in value if isinstance(value, tuple) else (value,):
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        if not math.isfinite(item):
            raise ConfigError(f"{dotted}={_show(value)} is not a finite number")
        if lo is not None and item < lo:
            raise ConfigError(f"{dotted}={_show(value)} is out of range: must be >= {lo}")
        if hi is not None and item > hi:
            raise ConfigError(f"{dotted}={_show(value)} is out of range: must be <= {hi}")
        if below is not None and item >= below:
            each = "each value " if isinstance(value, tuple) else ""
            raise ConfigError(f"{dotted}={_show(value)} is out of range: {each}must be < {below}")
    return value


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else repr(value)
