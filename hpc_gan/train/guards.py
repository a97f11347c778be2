"""Numerical guards of a training run: no non-finite state is saved, consolidated or sampled, and a
diverging run stops with a line that says what happened and what is left.

Two kinds of check:

* **Finiteness of the state** (:func:`first_nonfinite`, :func:`check_finite`,
  :func:`agree_nonfinite`): every weight *and buffer* (BatchNorm running statistics, spectral-norm
  vectors, the generator EMA). Losses can stay finite while a BatchNorm ``running_var`` has already
  overflowed to ``inf`` (seen at learning rate 1e12): checking losses alone lets such a state
  reach a checkpoint, the consolidated file and every sample. The trainer refuses to save a
  non-finite state (the last good checkpoint stays ``latest``), :func:`hpc_gan.train.consolidate.
  consolidate` refuses to write one and :func:`~hpc_gan.models.generator_file.load_generator` (so
  ``hpc_gan sample`` and the evaluator) refuses to use one; each names the first bad tensor.

* **Divergence** (:class:`DivergenceGuard`): finite but meaningless training (learning rate 1e6:
  losses ~1e13, BatchNorm running variances ~7e27, constant samples). Checked once per logging
  window on values every rank shares, so all ranks stop together. A window is *out of bounds* when

  - the critic's Wasserstein estimate ``|W|`` (mean over the window's finite steps and the ranks)
    exceeds ``train.divergence_lipschitz`` x the data diameter. Why: patches lie in [-1, 1]^n
    (n = 2·X·Y·Z voxels), so no two are farther apart than ``2·sqrt(n)`` (:func:`data_diameter`);
    a critic kept near 1-Lipschitz (gradient penalty, spectral norm, weight clipping) has
    ``|W| = |E D(real) - E D(fake)| <= L · 2·sqrt(n)``. ``|W|`` beyond 100 diameters (the default)
    means the critic is at least 100-Lipschitz: the constraint that defines a WGAN has broken.
    ``W`` is used rather than the critic or generator loss because a WGAN critic's output has an
    arbitrary offset that may drift in a healthy run; ``W`` is offset-free. Or
  - a generator BatchNorm ``running_var`` exceeds ``train.divergence_max_running_var`` (default
    65504², i.e. activations whose standard deviation exceeds the largest fp16 number: no
    precision the variants use could carry them through a forward pass in fp16, and no healthy
    run comes near).

  ``train.divergence_windows`` consecutive out-of-bounds windows stop the run (one window may be a
  transient spike); periodic checkpoints are not written while a window is out of bounds, so the
  last checkpoint is one from before the divergence began. A window without any finite step counts
  as out of bounds too (the non-finite streak itself is stopped by ``train.max_nonfinite_steps``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from hpc_gan.errors import HpcGanError
from hpc_gan.models.finite import NonFiniteStateError, check_finite, first_nonfinite  # noqa: F401 (re-exported)
from hpc_gan.train import checkpoint as ckpt

FP16_MAX = 65504.0  # the largest finite float16


class TrainingDiverged(HpcGanError):
    """Losses were not finite for too many consecutive steps, or the run left the divergence bounds."""


# ------------------------------------------------------------------------------ finiteness


def module_tensors(prefix: str, module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter and buffer of ``module``, names prefixed ``prefix.``.
    Under ZeRO-3 a parameter is an empty placeholder; its local partition (``ds_tensor``) is checked."""
    for name, param in module.named_parameters():
        yield f"{prefix}.{name}", getattr(param, "ds_tensor", param)
    for name, buffer in module.named_buffers():
        yield f"{prefix}.{name}", buffer


def agree_nonfinite(named: Iterable[tuple[str, torch.Tensor]], rank: int) -> str | None:
    """Collective (every rank calls it): the first non-finite tensor on any rank, as
    ``"'name' has inf in 3 of 64 values (rank 1)"``, the same text on every rank; None if all are finite."""
    found = first_nonfinite(named)
    local = f"'{found[0]}' has {found[1]} (rank {rank})" if found else None
    if not (dist.is_available() and dist.is_initialized()):
        return local
    everyone: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return next((text for text in everyone if text), None)


# ------------------------------------------------------------------------------ divergence


def data_diameter(patch_shape: tuple[int, int, int], channels: int = 2) -> float:
    """The largest distance between two patches in [-1, 1]^(channels·X·Y·Z): ``2·sqrt(n)``.

    Example:
        >>> data_diameter((32, 32, 16))      # the smoke profile: 2 * sqrt(32768)
        362.03867196751236
    """
    return 2.0 * math.sqrt(channels * math.prod(patch_shape))


def max_running_var(module: torch.nn.Module) -> float:
    """Collective: the largest BatchNorm ``running_var`` of ``module`` on any rank (inf/nan count as inf)."""
    values = [layer.running_var.detach().float().nan_to_num(nan=math.inf).max()
              for layer in module.modules()
              if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and layer.running_var is not None]
    local = torch.stack(values).max().reshape(1).cpu() if values else torch.zeros(1)
    if dist.is_available() and dist.is_initialized():
        local = local.to(_collective_device())
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return float(local.item())


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class DivergenceGuard:
    """Counts consecutive out-of-bounds logging windows (see the module docstring).

    Args:
        patch_shape: (X, Y, Z) of the patches, for the data diameter.
        lipschitz: bound on ``|W|`` in data diameters; 0 turns this test off.
        max_running_var: bound on BatchNorm running variances; 0 turns this test off.
        windows: consecutive out-of-bounds windows that stop the run.

    Example:
        >>> guard = DivergenceGuard((32, 32, 16), lipschitz=100, max_running_var=FP16_MAX**2, windows=2)
        >>> guard.observe(1e13, 1.0), guard.suspect, guard.observe(1e13, 1.0)[:22]
        (None, True, '|W| = 1e+13 > 36203.87')
    """

    def __init__(self, patch_shape: tuple[int, int, int], lipschitz: float, max_running_var: float,
                 windows: int) -> None:
        self.w_bound = lipschitz * data_diameter(patch_shape) if lipschitz > 0 else math.inf
        self.var_bound = max_running_var if max_running_var > 0 else math.inf
        self.windows = windows
        self.streak = 0
        self.reason = ""

    @property
    def suspect(self) -> bool:
        """The last window was out of bounds: do not write a periodic checkpoint now."""
        return self.streak > 0

    def observe(self, wasserstein: float | None, running_var: float) -> str | None:
        """Judge one logging window.

        Args:
            wasserstein: the window's mean Wasserstein estimate over ranks (None: no finite step).
            running_var: the largest BatchNorm running variance on any rank (:func:`max_running_var`).

        Returns:
            None while the run may go on; else why it must stop (the bound that held for
            ``windows`` consecutive windows).
        """
        if wasserstein is None:
            reason = "no finite step in the window"
        elif not math.isfinite(wasserstein) or abs(wasserstein) > self.w_bound:
            reason = (f"|W| = {abs(wasserstein):.6g} > {self.w_bound:.2f} (train.divergence_lipschitz x the data "
                      "diameter)")
        elif not running_var <= self.var_bound:
            reason = (f"a generator BatchNorm running_var = {running_var:.6g} > {self.var_bound:.6g} "
                      "(train.divergence_max_running_var)")
        else:
            self.streak, self.reason = 0, ""
            return None
        self.streak += 1
        self.reason = reason
        return reason if self.streak >= self.windows else None


def stop_message(what: str, step: int, precision: str, ckpt_root: Path) -> str:
    """The one line a stopped run prints: what happened, the last good checkpoint when there is
    one (named), and a fix that fits the run (fp32 is suggested only to a bf16 run).

    Example:
        >>> print(stop_message("losses were not finite for 3 consecutive steps", 5, "fp32", Path("/nonexistent")))
        training stopped at step 5: losses were not finite for 3 consecutive steps; no checkpoint was written before it (start again); lower train.lr_critic and train.lr_generator
    """
    tag = ckpt.newest_complete(ckpt_root)
    kept = (f"the last good checkpoint is {ckpt_root / tag} (a resume continues from it)" if tag else
            "no checkpoint was written before it (start again)")
    fix = "lower train.lr_critic and train.lr_generator"
    if precision == "bf16":
        fix += " or use train.precision=fp32"
    return f"training stopped at step {step}: {what}; {kept}; {fix}"
