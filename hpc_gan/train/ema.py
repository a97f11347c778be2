"""Exponential moving average of the generator's weights (StyleGAN practice; Karras et al. 2019,
Yazıcı et al. 2019, "The unusual effectiveness of averaging in GAN training").

After every generator step the trainer calls :meth:`GeneratorEMA.update`::

    d = train.ema_decay                                    (train.ema_warmup: false)
    d = min(train.ema_decay, (1 + t) / (10 + t))           (train.ema_warmup: true)
    ema = d * ema + (1 - d) * weights

where ``t`` is the number of generator steps taken before this one (0 for the first update, whose
decay with warm-up is 0.1), so early averages are not dominated by the random initial weights.

Decisions:

* **Whole fp32 copy on every rank, under every ZeRO stage.** Under ZeRO 1/2 every rank holds
  the whole (identical) working weights, so the update is local. Under ZeRO-3 each parameter is
  gathered in turn (``deepspeed.zero.GatheredParameters``, a collective: every rank calls
  :meth:`update`) and averaged into the full copy. The average is then the same on every rank
  (same inputs, same arithmetic), any rank can write it, and consolidation needs no gathering.
  Cost: 4 bytes per generator parameter per rank (1.2 GB at ngf 1024) and, under ZeRO-3, one
  parameter all-gather per generator step. Under fp16/bf16 the average is taken of the working
  weights the forward uses (its rounding averages out); the fp32 master weights stay in the
  optimizer's partitions.
* **BatchNorm running statistics are copied, not averaged** (as StyleGAN2-ADA's ``G_ema`` does):
  they differ per rank, and an average of averages adds nothing. At every checkpoint the trainer
  first averages them over ranks and the EMA takes a copy (:meth:`copy_buffers_from`), so the
  EMA generator's statistics are those of the raw generator at that step; the training previews
  copy the rank's current ones. They were measured with the raw weights, which the average
  follows closely at the usual decays (0.999 and above).

Example:
    >>> g = torch.nn.Linear(1, 1)
    >>> _ = torch.nn.init.ones_(g.bias)
    >>> ema = GeneratorEMA(g, decay=0.5)
    >>> _ = torch.nn.init.constant_(g.bias, 3.0)
    >>> ema.update(g, step=0)
    >>> ema.params["bias"]
    tensor([2.])
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from hpc_gan.errors import CheckpointError

log = logging.getLogger(__name__)
FORMAT = "hpc_gan.generator_ema"


def effective_decay(decay: float, step: int, warmup: bool) -> float:
    """The decay of the update after ``step`` earlier generator steps.

    Example:
        >>> effective_decay(0.999, 0, warmup=True), effective_decay(0.999, 0, warmup=False)
        (0.1, 0.999)
    """
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def _gathered(params: list[torch.nn.Parameter]):
    """Whole parameters inside the block: ZeRO-3 partitions gathered (collective), others as they are."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def _whole_parameters(module: torch.nn.Module):
    """(name, whole parameter) of every parameter, gathered one layer at a time under ZeRO-3 (a
    collective on every rank: consume the whole iterator; memory bounded by the largest layer)."""
    names = {id(p): n for n, p in module.named_parameters()}
    for sub in module.modules():
        own = list(sub.parameters(recurse=False))
        if own:
            with _gathered(own):
                for p in own:
                    yield names[id(p)], p


class GeneratorEMA:
    """fp32 moving average of a generator's parameters plus a copy of its buffers.

    Args:
        module: the generator (a plain module or a DeepSpeed engine's ``.module``, ZeRO 1/2/3);
            collective under ZeRO-3.
        decay: in [0, 1); the weight of the old average.
        warmup: ramp the decay as ``min(decay, (1 + t) / (10 + t))``.

    Attributes:
        params: {parameter name: fp32 tensor} on the parameters' device.
        buffers: {buffer name: tensor}, the copied BatchNorm statistics.
        step: generator steps before the last update (-1: never updated).
    """

    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} must be in [0, 1)")
        self.decay, self.warmup, self.step = float(decay), bool(warmup), -1
        with torch.no_grad():
            self.params = {name: p.detach().float().clone() for name, p in _whole_parameters(module)}
        self.copy_buffers_from(module)  # sets self.buffers

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        """Average in the module's current weights; ``step`` = generator steps before this one.
        Collective under ZeRO-3: every rank must call it."""
        d = effective_decay(self.decay, step, self.warmup)
        for name, p in _whole_parameters(module):
            self.params[name].mul_(d).add_(p.detach().float(), alpha=1.0 - d)
        self.step = step

    @torch.no_grad()
    def copy_buffers_from(self, module: torch.nn.Module) -> None:
        """Take the module's buffers (BatchNorm running statistics) as they are now, floats as fp32."""
        self.buffers = {n: b.detach().float().clone() if b.is_floating_point() else b.detach().clone()
                        for n, b in module.named_buffers()}

    def weights(self) -> dict[str, torch.Tensor]:
        """A generator ``state_dict`` (parameters and buffers) of the averaged weights, on the CPU."""
        return {n: t.detach().cpu().clone() for n, t in (self.params | self.buffers).items()}

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module, buffers_from: torch.nn.Module | None = None) -> torch.nn.Module:
        """Load the averaged weights into a plain (not ZeRO-3) generator of the same architecture,
        with the buffers of ``buffers_from`` if given, else the copied ones; returns ``module``."""
        buffers = self.buffers
        if buffers_from is not None:
            buffers = {n: b.detach() for n, b in buffers_from.named_buffers()}
        module.load_state_dict(self.params | buffers)
        return module

    def state_dict(self) -> dict:
        return {"format": FORMAT, "decay": self.decay, "warmup": self.warmup, "step": self.step,
                "params": {n: t.detach().cpu().clone() for n, t in self.params.items()},
                "buffers": {n: t.detach().cpu().clone() for n, t in self.buffers.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore the average (exactly: fp32 in, fp32 out). The decay and warm-up stay those this
        object was built with (the run config's), so a resumed run may change them."""
        if state.get("format") != FORMAT or set(state.get("params", {})) != set(self.params):
            raise CheckpointError("the saved generator EMA does not fit this generator (other parameters); resume "
                                  "from a checkpoint of this run")
        for name, saved in state["params"].items():
            if saved.shape != self.params[name].shape:
                raise CheckpointError(f"the saved generator EMA's '{name}' has shape {tuple(saved.shape)}, the "
                                      f"generator's is {tuple(self.params[name].shape)}")
            self.params[name].copy_(saved)
        self.buffers = {n: b.clone() for n, b in state["buffers"].items()}
        self.step = int(state["step"])
        if (state["decay"], state["warmup"]) != (self.decay, self.warmup):
            log.warning("generator EMA: checkpoint had decay %s warm-up %s, continuing with decay %s warm-up %s",
                        state["decay"], state["warmup"], self.decay, self.warmup)


def for_run(decay: float, warmup: bool, module: torch.nn.Module, saved: Path | None = None) -> GeneratorEMA | None:
    """The trainer's EMA: None when ``decay`` is 0; restored from ``saved`` when that file exists,
    else started from the module's current weights (a fresh run, or a run that turns EMA on
    when it resumes). Collective under ZeRO-3."""
    if decay == 0:
        return None
    ema = GeneratorEMA(module, decay, warmup)
    if saved is not None:
        if saved.is_file():
            ema.load_state_dict(torch.load(saved, map_location="cpu", weights_only=True))
        else:
            log.warning("%s is missing (the run trained without EMA so far): the generator EMA starts from the "
                        "resumed weights", saved)
    return ema


def averaged_generator(ema: GeneratorEMA, build: Callable[[], torch.nn.Module], live: torch.nn.Module,
                       device: torch.device) -> torch.nn.Module:
    """A plain fp32 generator on ``device`` holding the average and ``live``'s current buffers,
    for previews. Built on the meta device, so building it draws nothing from the global RNG."""
    with torch.device("meta"):
        plain = build()
    return ema.copy_to(plain.to_empty(device=device), buffers_from=live)
