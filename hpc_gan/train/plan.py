"""Per-rank GPU memory of a run, the largest batch that fits, and the ZeRO stage to use.

``hpc_gan plan --variant c_sn_mp --nodes 1 --gpus-per-node 4`` answers, before a job waits in a
queue for hours, whether it will run out of GPU memory. Everything is computed on the meta
device (shapes, no storage), so it takes well under a second even for billion-parameter models.

Bytes per parameter (P = parameters of one engine, W = nodes x GPUs per node)::

    precision     module copy   gradient   Adam m + v   fp32 master   total (no ZeRO)
    fp32               4            4           8             -           16 P
    fp16 / bf16        2            2           8             4           16 P

    ZeRO stage    partitioned over W ranks
    1             Adam m + v and the fp32 master copy ("optimizer")
    2             ... and gradients
    3             ... and the module copy
    offload       the optimizer share moves to host memory (DeepSpeed offloads only under
                  ZeRO 2/3, so an engine at stage 1 keeps its optimizer on the GPU)

Activations (what autograd keeps for backward, in the precision's element size): the generator
and the critic are run on meta inputs with forward hooks; each layer contributes the tensor its
backward needs (Conv3d, Linear, BatchNorm, InstanceNorm, GroupNorm, LeakyReLU: their input;
ReLU, Tanh: their output; Upsample, Identity: nothing), counted once per storage (views and
in-place ReLUs share one). With A_g, A_c the generator's and critic's saved bytes at the batch,
T_g, T_c the largest input + output of one of their layers (a layer's gradients in backward, or
a no-grad forward) and B_g the generator's backward peak (walking its layers backwards, what is
still saved up to a layer plus that layer's input and output gradients)::

    critic step     = 2 A_c  (critic on real and on fake patches)
                    + 2 A_c  (penalty: critic on interpolated patches, x2 for the
                              create_graph backward that the penalty's gradient flows through)
                    + T_c
    generator step  = max(A_g + A_c + T_c, B_g)  (the critic's activations are kept for the input
                      gradient and freed before backward reaches the generator)
    activations     = max(critic step, generator step, T_g)

The two steps never hold their graphs at once (each backward frees its own), hence the max.
With activation checkpointing a network keeps only each block's input plus the internals of one
block (recomputed in backward, one block at a time), and the generator step becomes
A_g' + A_c' + max(T_g, T_c); the penalty's forward is not reduced (its double backward keeps the
recomputed graph). Measured on CPU (tests/test_plan.py: the peak of live tensors over a plain
PyTorch iteration, from the profiler's per-operator allocations) the estimate is 0-4 % high for
sn and gp critics, with and without checkpointing.

Total per rank = generator engine + critic engine + activations + OVERHEAD_BYTES (CUDA context,
cuDNN/NCCL workspaces, allocator fragmentation: 1 GiB).

The dp variant (``privacy.enabled``) trains without DeepSpeed: fp32, whole networks and Adam
states on every rank (stage 0), no penalty. Its critic step runs one forward on b real + b fake
patches, where b is a Poisson batch planned at its 3-sigma size ``B + ceil(3 sqrt(B))`` for the
configured mean B, and Opacus adds what per-sample gradients cost::

    critic step (dp) = 2b (A_c + T_c)/sample + 2b P_c x 4 bytes (one gradient per sample)
                       + 2b U x 4 bytes (the largest Conv3d's unfolded input, U per sample)

Measured on CPU, the saved activations plus the per-sample gradients are within 1 % of an
Opacus step; T_c and U live inside single operators, which the profiler cannot see, and stay
unvalidated upper bounds.

Example:
    >>> cfg = load_config("c_sn_mp")
    >>> p = plan_memory(cfg, world_size=4, gpu_memory_gb=80)
    >>> p.generator.parameters, p.critic.parameters
    (289123714, 18850433)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

from hpc_gan.config import ModelConfig, RunConfig, resolve_precision

GIB = 2**30
#: CUDA context, cuDNN/NCCL workspaces and allocator fragmentation, per rank.
OVERHEAD_BYTES = 1 * GIB
#: Memory of one GPU assumed by ``launch/submit.py`` unless told otherwise (an "80 GB" card).
DEFAULT_GPU_MEMORY_GB = 80.0
#: Factors of the activation model (module docstring).
CRITIC_FORWARDS_PLAIN = 2  # real and fake patches
PENALTY_FACTOR = 2  # interpolated patches: forward + create_graph backward
MAX_BATCH = 1 << 20  # the binary search's ceiling

_ADAM_STATE_BYTES = 8  # m and v, fp32
_MASTER_BYTES = 4  # fp32 master weights under mixed precision
_HALF = ("fp16", "bf16")


def plan_precision(cfg: RunConfig, cuda: bool) -> str:
    """fp16, bf16 or fp32 (:func:`hpc_gan.config.resolve_precision`), fp16 without GPUs allowed:
    a plan describes the GPU job, not this machine."""
    return resolve_precision(cfg.train, cuda, refuse_fp16=False)


def element_bytes(precision: str) -> int:
    """Bytes of one activation or module-parameter element: 2 in fp16/bf16, 4 in fp32."""
    return 2 if precision in _HALF else 4


# --------------------------------------------------------------------------- engines


@dataclass(frozen=True)
class EngineMemory:
    """Per-rank memory of one DeepSpeed engine (bytes)."""

    name: str
    parameters: int
    zero_stage: int
    offload: bool
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int  # on the GPU (0 when offloaded)
    host_bytes: int  # offloaded optimizer states, in CPU memory

    @property
    def device_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


def engine_memory(name: str, parameters: int, precision: str, zero_stage: int, world_size: int,
                  offload: bool = False) -> EngineMemory:
    """Parameters, gradients and Adam states of one engine on one rank.

    Args:
        name: ``"generator"`` or ``"critic"`` (for the report).
        parameters: trainable parameters of the network.
        precision: fp16, bf16 or fp32.
        zero_stage: 0 (plain data parallel, for comparison) to 3.
        world_size: ranks the states are partitioned over.
        offload: ``train.offload_optimizer``; applies only at stage 2 or 3, as in DeepSpeed.

    Returns:
        The :class:`EngineMemory`; e.g. 1e6 fp32 parameters at stage 0: 4 + 4 + 8 MB.
    """
    if not 0 <= zero_stage <= 3 or world_size < 1:
        raise ValueError(f"zero_stage {zero_stage} must be 0..3 and world_size {world_size} >= 1")
    elem = element_bytes(precision)
    optimizer = parameters * (_ADAM_STATE_BYTES + (_MASTER_BYTES if precision in _HALF else 0))
    grads = parameters * elem
    params = parameters * elem
    if zero_stage >= 1:
        optimizer = math.ceil(optimizer / world_size)
    if zero_stage >= 2:
        grads = math.ceil(grads / world_size)
    if zero_stage >= 3:
        params = math.ceil(params / world_size)
    offloaded = offload and zero_stage >= 2
    return EngineMemory(name, parameters, zero_stage, offloaded, params, grads,
                        0 if offloaded else optimizer, optimizer if offloaded else 0)


def _model_key(model: ModelConfig) -> tuple:
    # ModelConfig is a mutable (unhashable) dataclass; the caches key on its values.
    return dataclasses.astuple(model)


def _model_of(key: tuple) -> ModelConfig:
    return ModelConfig(*key)


def count_model_parameters(model: ModelConfig) -> tuple[int, int]:
    """Exact trainable parameters (generator, critic), counted on the meta device."""
    return _count_parameters(_model_key(model))


@lru_cache(maxsize=64)
def _count_parameters(key: tuple) -> tuple[int, int]:
    import torch

    from hpc_gan.models.build import build_critic, build_generator
    from hpc_gan.models.gan import count_parameters

    model = _model_of(key)
    with torch.device("meta"):
        return count_parameters(build_generator(model)), count_parameters(build_critic(model))


# --------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class SavedTensors:
    """Elements one network keeps for backward at one batch size (counted on meta tensors)."""

    total: int  # every layer's saved tensor, once per storage
    checkpointed: int  # block inputs + layers outside blocks + the largest block's internals
    transient: int  # largest input + output of a layer (no_grad forward; a layer's gradients in backward)
    weights: int = 0  # batch-independent part of total and checkpointed: spectral-norm weights W / sigma
    backward_peak: int = 0  # backward without checkpointing: max over layers of what is still saved up to
    #                         that layer plus its input and output gradients (saved tensors free as backward passes)


def _saved_by(layer) -> str | None:
    from torch import nn

    if isinstance(layer, (nn.Conv3d, nn.Linear, nn.BatchNorm3d, nn.InstanceNorm3d, nn.GroupNorm, nn.LeakyReLU)):
        return "input"
    if isinstance(layer, (nn.ReLU, nn.Tanh)):
        return "output"
    if isinstance(layer, (nn.Upsample, nn.Identity, nn.Flatten)):
        return None
    return "output" if not any(True for _ in layer.children()) else None  # unknown leaf: assume its output


def _key(t):
    # Views (the generator's reshape, the critic's flatten) and in-place ReLUs share storage.
    return id(t._base if t._base is not None else t)


def saved_tensors(network, example) -> SavedTensors:
    """Walk ``network`` (on the meta device) on ``example`` with forward hooks.

    Blocks, for activation checkpointing, are the ``nn.Sequential`` children of ``network.net``.
    """
    import torch
    from torch import nn
    from torch.nn.utils import parametrize

    blocks = {id(m): i for i, m in enumerate(getattr(network, "net", [])) if isinstance(m, nn.Sequential)}
    owner: dict[int, int | None] = {}
    for block in getattr(network, "net", []):
        for m in block.modules():
            owner[id(m)] = blocks.get(id(block))
    # Spectral norm computes W / sigma in every forward and the conv saves that tensor: weight-sized,
    # independent of the batch.
    parametrizations = {id(m) for p in network.modules() if isinstance(p, parametrize.ParametrizationList)
                        for m in p.modules()}
    seen: dict[int, tuple] = {}  # key -> (numel, block or None); keeps the tensors alive, so ids stay unique
    saved = [0]  # sum of the numels in seen
    weights = [0]
    block_inputs: dict[int, object] = {}
    transient = [0]
    timeline: list[tuple[int, int]] = []  # per layer, forward order: (saved so far, its input + output)

    def layer_hook(module, inputs, output):
        if id(module) in parametrizations:
            weights[0] += output.numel()
            return
        where = _saved_by(module)
        transient[0] = max(transient[0], inputs[0].numel() + output.numel())
        if where is not None:
            t = inputs[0] if where == "input" else output
            if _key(t) not in seen:
                seen[_key(t)] = (t.numel(), owner.get(id(module)), t)
                saved[0] += t.numel()
        timeline.append((saved[0], inputs[0].numel() + output.numel()))

    def block_hook(module, inputs):
        block_inputs.setdefault(_key(inputs[0]), inputs[0])

    handles = [m.register_forward_hook(layer_hook) for m in network.modules()
               if _saved_by(m) is not None or isinstance(m, (nn.Upsample, nn.Identity))]
    handles += [m.register_forward_pre_hook(block_hook) for m in network.net if id(m) in blocks]
    try:
        with torch.no_grad():
            network(example)
    finally:
        for h in handles:
            h.remove()
    total = saved[0]
    outside = {k: n for k, (n, b, _) in seen.items() if b is None}
    inputs = {k: t.numel() for k, t in block_inputs.items() if k not in outside}
    per_block = [sum(n for n, b, _ in seen.values() if b == i) for i in range(len(blocks))]
    checkpointed = sum(outside.values()) + sum(inputs.values()) + max(per_block, default=0)
    backward_peak = max((saved + grads for saved, grads in timeline), default=0)
    return SavedTensors(total + weights[0], min(total, checkpointed) + weights[0], transient[0], weights[0],
                        backward_peak + weights[0])


def network_activations(model: ModelConfig, batch_size: int) -> tuple[SavedTensors, SavedTensors]:
    """:class:`SavedTensors` of (generator, critic) at ``batch_size``."""
    return _network_activations(_model_key(model), batch_size)


@lru_cache(maxsize=64)
def _network_activations(key: tuple, batch_size: int) -> tuple[SavedTensors, SavedTensors]:
    import torch

    from hpc_gan.models.build import build_critic, build_generator

    model = _model_of(key)
    with torch.device("meta"):
        generator, critic = build_generator(model), build_critic(model)
        z = torch.empty(batch_size, model.latent_dim)
        patches = torch.empty(batch_size, 2, *model.patch_shape)  # (B, 2, X, Y, Z)
        return saved_tensors(generator, z), saved_tensors(critic, patches)


def _scaled(saved: SavedTensors, factor: int) -> SavedTensors:
    w = saved.weights
    return SavedTensors((saved.total - w) * factor + w, (saved.checkpointed - w) * factor + w,
                        saved.transient * factor, w, (saved.backward_peak - w) * factor + w)


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one training iteration on one rank."""

    generator_step: int
    critic_step: int
    peak: int


def activation_bytes(model: ModelConfig, batch_size: int, precision: str, checkpointing: bool) -> Activations:
    """The activation model of the module docstring, in bytes."""
    # Every saved tensor has the batch as its first dimension, so one walk at batch 1 serves every
    # batch size (tests check this against a walk at the full batch).
    gen, critic = (_scaled(s, batch_size) for s in network_activations(model, 1))
    elem = element_bytes(precision)
    kept_g = gen.checkpointed if checkpointing else gen.total
    kept_c = critic.checkpointed if checkpointing else critic.total
    critic_step = (CRITIC_FORWARDS_PLAIN * kept_c + PENALTY_FACTOR * critic.total + critic.transient) * elem
    if checkpointing:  # one block's recomputed graph at a time, plus a layer's gradients
        generator_step = (kept_g + kept_c + max(gen.transient, critic.transient)) * elem
    else:  # backward reaches the generator once the critic's saved tensors are freed
        generator_step = max(gen.total + critic.total + critic.transient, gen.backward_peak) * elem
    peak = max(critic_step, generator_step, gen.transient * elem)
    return Activations(generator_step, critic_step, peak)


def dp_batch(batch_size: int) -> int:
    """The Poisson batch a dp plan provisions for: the mean plus three standard deviations."""
    return batch_size + math.ceil(3 * math.sqrt(batch_size))


def per_sample_elements(model: ModelConfig) -> tuple[int, int]:
    """(critic parameters, largest Conv3d unfolded input) per sample: what Opacus' per-sample
    gradients of the critic hold, in elements."""
    return _per_sample_elements(_model_key(model))


@lru_cache(maxsize=64)
def _per_sample_elements(key: tuple) -> tuple[int, int]:
    import torch
    from torch import nn

    from hpc_gan.models.build import build_critic

    model = _model_of(key)
    unfolded = [0]

    def hook(module, inputs, output):  # (1, C_in, ...) -> (1, C_out, X', Y', Z')
        unfolded[0] = max(unfolded[0], module.in_channels * math.prod(module.kernel_size) * output[0, 0].numel())

    with torch.device("meta"):
        critic = build_critic(model)
        handles = [m.register_forward_hook(hook) for m in critic.modules() if isinstance(m, nn.Conv3d)]
        with torch.no_grad():
            critic(torch.empty(1, 2, *model.patch_shape))
    for h in handles:
        h.remove()
    return count_model_parameters(model)[1], unfolded[0]


def dp_activation_bytes(model: ModelConfig, batch_size: int) -> tuple[Activations, int]:
    """The dp variant's activations (fp32, no penalty, no checkpointing) and, included in its
    critic step, the bytes of the per-sample gradients and the unfolded input."""
    generator_step = activation_bytes(model, batch_size, "fp32", checkpointing=False).generator_step  # as without DP
    gen, critic = network_activations(model, 1)
    samples = 2 * dp_batch(batch_size)                     # real + as many fakes, one critic forward
    critic = _scaled(critic, samples)
    params, unfold = per_sample_elements(model)
    per_sample = samples * (params + unfold) * 4
    critic_step = (critic.total + critic.transient) * 4 + per_sample
    peak = max(critic_step, generator_step, _scaled(gen, batch_size).transient * 4)
    return Activations(generator_step, critic_step, peak), per_sample


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class MemoryPlan:
    """Per-rank memory of a run on ``world_size`` GPUs of ``gpu_memory_bytes`` each."""

    variant: str
    world_size: int
    precision: str
    batch_size: int
    activation_checkpointing: bool
    generator: EngineMemory
    critic: EngineMemory
    activations: Activations
    overhead_bytes: int
    gpu_memory_bytes: int
    largest_batch: int
    recommended_generator_stage: int | None  # None: no stage fits the configured batch (or dp: no ZeRO)
    dp: bool = False  # privacy.enabled: Opacus, no DeepSpeed (stage 0 in the engine rows)
    per_sample_bytes: int = 0  # dp: per-sample gradients and unfolded inputs, part of the critic step

    @property
    def total_bytes(self) -> int:
        return self.generator.device_bytes + self.critic.device_bytes + self.activations.peak + self.overhead_bytes

    @property
    def host_bytes(self) -> int:
        return self.generator.host_bytes + self.critic.host_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.gpu_memory_bytes

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(total_bytes=self.total_bytes, host_bytes=self.host_bytes, fits=self.fits)
        return out


def _total_bytes(cfg: RunConfig, world_size: int, precision: str, batch_size: int, generator_stage: int) -> int:
    train = cfg.train
    n_gen, n_critic = count_model_parameters(cfg.model)
    if cfg.privacy.enabled:
        engines = (engine_memory(n, p, "fp32", 0, world_size) for n, p in (("generator", n_gen), ("critic", n_critic)))
        return sum(e.device_bytes for e in engines) + dp_activation_bytes(cfg.model, batch_size)[0].peak + OVERHEAD_BYTES
    gen = engine_memory("generator", n_gen, precision, generator_stage, world_size, train.offload_optimizer)
    critic = engine_memory("critic", n_critic, precision, train.zero_stage_critic, world_size, train.offload_optimizer)
    acts = activation_bytes(cfg.model, batch_size, precision, train.activation_checkpointing)
    return gen.device_bytes + critic.device_bytes + acts.peak + OVERHEAD_BYTES


def largest_batch(cfg: RunConfig, world_size: int, gpu_memory_gb: float, generator_stage: int | None = None,
                  cuda: bool = True) -> int:
    """Largest per-rank batch whose estimate fits in ``gpu_memory_gb`` GiB (0: not even batch 1)."""
    precision = plan_precision(cfg, cuda)
    stage = cfg.train.zero_stage_generator if generator_stage is None else generator_stage
    limit = gpu_memory_gb * GIB

    def fits(b: int) -> bool:
        return _total_bytes(cfg, world_size, precision, b, stage) <= limit

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= MAX_BATCH and fits(high):
        low, high = high, high * 2
    if high > MAX_BATCH:
        return MAX_BATCH
    while high - low > 1:  # fits(low), not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def recommend_generator_stage(cfg: RunConfig, world_size: int, gpu_memory_gb: float, cuda: bool = True) -> int | None:
    """Smallest generator ZeRO stage (1..3) at which the configured batch fits; the critic keeps its
    configured stage (at most 2: the penalty's double backward cannot run under ZeRO-3)."""
    if cfg.privacy.enabled:
        return None  # no ZeRO: the dp variant trains without DeepSpeed
    precision = plan_precision(cfg, cuda)
    for stage in (1, 2, 3):
        if _total_bytes(cfg, world_size, precision, cfg.train.batch_size, stage) <= gpu_memory_gb * GIB:
            return stage
    return None


def plan_memory(cfg: RunConfig, world_size: int, gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB,
                cuda: bool = True) -> MemoryPlan:
    """Estimate one rank's memory for ``cfg`` on ``world_size`` GPUs of ``gpu_memory_gb`` GiB.

    Args:
        cfg: the run config (model sizes, ``train`` precision, batch, ZeRO stages, offload,
            activation checkpointing).
        world_size: ranks (nodes x GPUs per node).
        gpu_memory_gb: memory of one GPU in GiB.
        cuda: plan for GPUs (``precision: auto`` means fp16) or CPU ranks (bf16).

    Returns:
        The :class:`MemoryPlan`.

    Raises:
        ValueError: ``world_size`` < 1 or ``gpu_memory_gb`` not > 0.
    """
    if world_size < 1 or not gpu_memory_gb > 0:
        raise ValueError(f"world_size {world_size} must be >= 1 and gpu_memory_gb {gpu_memory_gb} > 0")
    train = cfg.train
    precision = plan_precision(cfg, cuda)
    n_gen, n_critic = count_model_parameters(cfg.model)
    if cfg.privacy.enabled:
        activations, per_sample = dp_activation_bytes(cfg.model, train.batch_size)
        return MemoryPlan(
            variant=cfg.variant or "custom", world_size=world_size, precision="fp32", batch_size=train.batch_size,
            activation_checkpointing=False, generator=engine_memory("generator", n_gen, "fp32", 0, world_size),
            critic=engine_memory("critic", n_critic, "fp32", 0, world_size), activations=activations,
            overhead_bytes=OVERHEAD_BYTES, gpu_memory_bytes=int(gpu_memory_gb * GIB),
            largest_batch=largest_batch(cfg, world_size, gpu_memory_gb, cuda=cuda), recommended_generator_stage=None,
            dp=True, per_sample_bytes=per_sample)
    return MemoryPlan(
        variant=cfg.variant or "custom",
        world_size=world_size,
        precision=precision,
        batch_size=train.batch_size,
        activation_checkpointing=train.activation_checkpointing,
        generator=engine_memory("generator", n_gen, precision, train.zero_stage_generator, world_size,
                                train.offload_optimizer),
        critic=engine_memory("critic", n_critic, precision, train.zero_stage_critic, world_size,
                             train.offload_optimizer),
        activations=activation_bytes(cfg.model, train.batch_size, precision, train.activation_checkpointing),
        overhead_bytes=OVERHEAD_BYTES,
        gpu_memory_bytes=int(gpu_memory_gb * GIB),
        largest_batch=largest_batch(cfg, world_size, gpu_memory_gb, cuda=cuda),
        recommended_generator_stage=recommend_generator_stage(cfg, world_size, gpu_memory_gb, cuda),
    )


def fit_warnings(runs: Iterable, gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB) -> list[str]:
    """One warning line per GPU run whose estimate exceeds ``gpu_memory_gb`` GiB.

    Args:
        runs: objects with a ``cfg`` (:class:`RunConfig`), e.g. ``launch.submit.PlannedRun``;
            runs without GPUs (``cluster.gpus_per_node == 0``) are skipped.
        gpu_memory_gb: memory of one GPU in GiB.

    Returns:
        Lines like ``warning: variant xl_sn_mp: estimated 93.1 GiB per GPU exceeds 80 GiB
        (largest batch that fits: 2; try ...)``; empty when everything fits.
    """
    lines = []
    for run in runs:
        cfg = run.cfg
        if cfg.cluster.gpus_per_node <= 0:
            continue
        plan = plan_memory(cfg, cfg.cluster.nodes * cfg.cluster.tasks_per_node, gpu_memory_gb)
        if not plan.fits:
            remedy = ("lower train.batch_size: the dp variant has no ZeRO" if plan.dp else
                      "try --set train.zero_stage_generator=3 or activation checkpointing")
            lines.append(
                f"warning: variant {plan.variant}: estimated {plan.total_bytes / GIB:.1f} GiB per GPU exceeds "
                f"{gpu_memory_gb:g} GiB (largest batch that fits: {plan.largest_batch}; {remedy})"
            )
    return lines


# --------------------------------------------------------------------------- command line


def format_plan(plan: MemoryPlan) -> str:
    """The readable table ``hpc_gan plan`` prints."""

    def gib(n: int) -> str:
        return f"{n / GIB:9.2f}"

    lines = [
        f"variant {plan.variant}: {plan.world_size} rank(s), {plan.precision}, batch {plan.batch_size} per rank, "
        f"activation checkpointing {'on' if plan.activation_checkpointing else 'off'}",
        f"{'GiB per rank':16s}{'params':>10s}{'grads':>10s}{'optimizer':>10s}{'host':>10s}  parameters      ZeRO",
    ]
    for e in (plan.generator, plan.critic):
        lines.append(f"{e.name:16s}{gib(e.param_bytes)} {gib(e.grad_bytes)} {gib(e.optimizer_bytes)} "
                     f"{gib(e.host_bytes)}  {e.parameters:<14,d}  {e.zero_stage}{' +offload' if e.offload else ''}")
    a = plan.activations
    lines += [
        f"{'activations':16s}{gib(a.peak)}  (critic step {a.critic_step / GIB:.2f}, generator step "
        f"{a.generator_step / GIB:.2f})"
        + (f"; dp: per-sample gradients {plan.per_sample_bytes / GIB:.2f} of the critic step, at a Poisson batch "
           f"of {dp_batch(plan.batch_size)} real + as many fake" if plan.dp else ""),
        f"{'overhead':16s}{gib(plan.overhead_bytes)}",
        f"{'total':16s}{gib(plan.total_bytes)}  of {plan.gpu_memory_bytes / GIB:g} GiB per GPU: "
        f"{'fits' if plan.fits else 'DOES NOT FIT'}"
        + (f"; host {plan.host_bytes / GIB:.2f} GiB" if plan.host_bytes else ""),
        f"largest batch per rank that fits: {plan.largest_batch}",
        "recommended generator ZeRO stage: "
        + ("none: the dp variant trains without DeepSpeed (Opacus keeps whole fp32 networks per rank)" if plan.dp
           else str(plan.recommended_generator_stage) if plan.recommended_generator_stage else
           "none fits the configured batch (enable activation checkpointing or lower train.batch_size)"),
    ]
    return "\n".join(lines)
