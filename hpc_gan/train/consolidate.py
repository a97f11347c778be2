"""ZeRO shards of a checkpoint -> one fp32 generator file that anyone can sample from.

The file ``<run_dir>/consolidated/generator-<tag>.pt`` is a plain dict (loads with
``torch.load(weights_only=True)``)::

    {"format": "hpc_gan.generator", "format_version": 1, "variant": "c_sn_mp", "step": 20000,
     "model": {"latent_dim": 128, "ngf": 1024, "patch_shape": [128, 128, 64], "out_channels": 2},
     "config": {...resolved run config...}, "manifest_sha256": "...",
     "privacy": None or {"epsilon": ..., "delta": ..., "noise_multiplier": ..., ...},  # dp variant
     "state_dict": {name: fp32 tensor, ...},
     "ema": None or {"decay": 0.999, "warmup": False, "step": 19999,     # train.ema_decay > 0
                     "state_dict": {name: fp32 tensor, ...}, "state_dict_sha256": "..."},
     "state_dict_sha256": "..."}

``state_dict`` holds the trainable weights gathered from every rank's ZeRO partition (the dp
variant's trainer writes them whole, no shards) plus the BatchNorm running statistics (averaged
over ranks when the checkpoint was written). ``ema.state_dict`` has the same keys: the moving
average of the weights (:mod:`hpc_gan.train.ema`, from the checkpoint's ``generator_ema.pt``)
with a copy of those same BatchNorm statistics. The reader,
:func:`hpc_gan.models.generator_file.load_generator` (re-exported here; and so ``hpc_gan
sample``), uses the average when the file has one, the raw weights when asked.

Integrity: before anything of a checkpoint is loaded (DeepSpeed's ``zero_to_fp32`` unpickles),
every file is compared with the size and SHA-256 that ``state.json`` records, so a damaged
shard is named and never consolidated. The written file carries the digest of its weights
inside (``state_dict_sha256``, :func:`hpc_gan.models.resnet3d.state_dict_sha256`: contents, not
pickling), checked on every load, so damage is found even without the ``.sha256`` file that is
also written beside it (a whole-file digest, for copies).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hpc_gan.config import from_dict
from hpc_gan.io import file_sha256, torch_save_atomic, write_text_atomic
from hpc_gan.errors import CheckpointError
from hpc_gan.models.generator_file import FORMAT, FORMAT_VERSION, load_generator  # noqa: F401 (re-exported)
from hpc_gan.models.finite import check_payload_finite
from hpc_gan.models.resnet3d import state_dict_sha256
from hpc_gan.train import checkpoint as ckpt

log = logging.getLogger(__name__)


def consolidate(run_dir: str | os.PathLike, tag: str | None = None, out: str | os.PathLike | None = None,
                best: bool = False) -> Path:
    """Gather the generator of one COMPLETE checkpoint into a single fp32 file.

    Args:
        run_dir: the run directory (holding ``checkpoints/``).
        tag: checkpoint tag, e.g. ``step-00000300``; default the newest COMPLETE one.
        out: output file; default ``<run_dir>/consolidated/generator-<tag>.pt``.
        best: the checkpoint ``checkpoints/best`` names (lowest in-training FID) instead of ``tag``.

    Returns:
        The path of the written file (its SHA-256 is in ``<file>.sha256``).

    Raises:
        CheckpointError: no complete checkpoint (no best one with ``best``), or a file of it
            differs from its record or cannot be read (the message names the file).
        NonFiniteStateError: a weight or buffer (or the EMA's) holds NaN or inf; names the tensor.
    """
    root = Path(run_dir) / "checkpoints"
    if best:
        tag = ckpt.best_tag(root)
        if tag is None:
            raise CheckpointError(f"'{run_dir}' has no best checkpoint (checkpoints/best is written by evaluations "
                                  "during training, train.eval_every > 0); consolidate without --best")
    tag = tag or ckpt.newest_complete(root)
    if tag is None:
        raise CheckpointError(f"'{run_dir}' has no complete checkpoint to consolidate; train first or check the path")
    where = root / tag
    if not (where / ckpt.COMPLETE).is_file():
        raise CheckpointError(f"checkpoint '{where}' is not COMPLETE (its job stopped while saving); pick another --tag")
    state = ckpt.read_state(where)
    ckpt.verify(where, state)  # before any file reaches a loader
    cfg = from_dict(state["config"])
    weights = _generator_weights(where, state)
    weights.update(ckpt.load_torch(where / ckpt.BUFFERS))
    weights = _fp32(weights)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "variant": state["variant"], "step": state["step"],
               "model": {"latent_dim": cfg.model.latent_dim, "ngf": cfg.model.ngf,
                         "patch_shape": list(cfg.model.patch_shape), "out_channels": 2},
               "config": state["config"], "manifest_sha256": state.get("manifest_sha256", ""),
               "privacy": state.get("privacy"), "state_dict": weights, "ema": _ema(where),
               "state_dict_sha256": state_dict_sha256(weights)}
    check_payload_finite(payload, f"checkpoint '{where}'", "it cannot be consolidated; pick an earlier --tag "
                         f"(complete ones: {', '.join(ckpt.complete_tags(root))})")
    out = Path(out) if out else Path(run_dir) / "consolidated" / f"generator-{tag}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch_save_atomic(payload, out)
    write_text_atomic(out.with_name(out.name + ".sha256"), f"{file_sha256(out)}  {out.name}\n")
    return out


def _fp32(weights: dict) -> dict:
    return {k: v.detach().float().contiguous() if v.is_floating_point() else v.detach() for k, v in weights.items()}


def _ema(where: Path) -> dict | None:
    """The checkpoint's generator EMA as the consolidated file stores it, or None (trained without)."""
    path = where / ckpt.EMA
    if not path.is_file():
        return None
    saved = ckpt.load_torch(path, "; pick another --tag")
    weights = _fp32(saved["params"] | saved["buffers"])
    return {"decay": saved["decay"], "warmup": saved["warmup"], "step": saved["step"], "state_dict": weights,
            "state_dict_sha256": state_dict_sha256(weights)}


def _generator_weights(where: Path, state: dict) -> dict:
    """The generator's weights of one checkpoint: gathered from ZeRO shards, or the DP trainer's
    whole state (it writes no shards)."""
    if state.get("trainer") == "dp":
        return ckpt.load_torch(where / "dp_generator.pt", "; pick another --tag")["model"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(where), tag="generator")
    except Exception as exc:  # deepspeed raises several types for missing or damaged shards
        raise CheckpointError(f"cannot gather the ZeRO shards of '{where}' ({exc.__class__.__name__}: {exc})") from None
