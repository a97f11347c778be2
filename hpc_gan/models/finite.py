"""Finiteness of saved model state: the first weight or buffer holding NaN or inf, named.

Used before a checkpoint is written (:mod:`hpc_gan.train.guards`), by ``hpc_gan consolidate``
and by everything that loads a consolidated generator (sample, evaluate, tstr). Losses can stay
finite while a BatchNorm ``running_var`` has already overflowed to inf, so buffers are checked too.
"""

from __future__ import annotations

from typing import Iterable

import torch

from hpc_gan.errors import CheckpointError


class NonFiniteStateError(CheckpointError):
    """Weights or buffers hold NaN or infinite values (refused to save, consolidate or sample)."""



def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, str] | None:
    """The first floating-point tensor holding NaN or ±inf.

    Args:
        named: (name, tensor) pairs, e.g. a ``state_dict().items()``; integer tensors are skipped.

    Returns:
        None when all are finite, else (name, what), ``what`` e.g. ``"inf in 3 of 64 values"``.

    Example:
        >>> first_nonfinite([("a", torch.ones(2)), ("b", torch.tensor([1.0, float("inf")]))])
        ('b', 'inf in 1 of 2 values')
    """
    for name, tensor in named:
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        finite = torch.isfinite(tensor)
        if bool(finite.all()):
            continue
        bad = tensor.detach()[~finite]
        kinds = "/".join(k for k, present in (("nan", bool(bad.isnan().any())),
                                              ("inf", bool(bad.isinf().any()))) if present)
        return name, f"{kinds} in {bad.numel()} of {tensor.numel()} values"
    return None


def check_finite(named: Iterable[tuple[str, torch.Tensor]], what: str, fix: str) -> None:
    """Raise one line naming the first non-finite tensor of ``named``.

    Args:
        named: (name, tensor) pairs.
        what: the thing checked, e.g. ``"consolidated generator 'g.pt'"``.
        fix: what the user should do.

    Raises:
        NonFiniteStateError: e.g. ``consolidated generator 'g.pt' holds non-finite values:
            'blocks.0.1.running_var' has inf in 3 of 64 values; pick an earlier checkpoint``.
    """
    found = first_nonfinite(named)
    if found:
        raise NonFiniteStateError(f"{what} holds non-finite values: '{found[0]}' has {found[1]}; {fix}")


def check_payload_finite(payload: dict, what: str, fix: str) -> None:
    """Weights, buffers and the EMA's of a consolidated generator payload are all finite.

    Args:
        payload: ``{"state_dict": ..., "ema": {"state_dict": ...} | None, ...}`` as written by
            :func:`hpc_gan.train.consolidate.consolidate`.
        what, fix: as for :func:`check_finite`.

    Raises:
        NonFiniteStateError: names the first non-finite tensor (EMA tensors prefixed ``ema.``).
    """
    ema = payload.get("ema") or {}
    check_finite([*payload["state_dict"].items(),
                  *((f"ema.{n}", t) for n, t in ema.get("state_dict", {}).items())], what, fix)
