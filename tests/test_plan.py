"""hpc_gan.train.plan: exact parameter counts, ZeRO arithmetic, the activation model against a measured
CPU iteration, the largest batch, the stage recommendation, the submit warning and the command."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from helpers import assert_one_line_error
from hpc_gan.train import plan
from hpc_gan.cli import main
from hpc_gan.config import load_config
from hpc_gan.errors import ConfigError
from hpc_gan.models.build import build_critic, build_generator
from hpc_gan.train.penalty import gradient_penalty

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("variant, total", [("sn", 144_697_347), ("c_sn_mp", 307_974_147)])
def test_parameter_counts_are_exact(variant, total):
    p = plan.plan_memory(load_config(variant), world_size=4)
    assert p.generator.parameters + p.critic.parameters == total


@pytest.mark.parametrize("precision, per_param", [("fp32", 16), ("fp16", 16), ("bf16", 16)])
def test_bytes_per_parameter_without_zero(precision, per_param):
    e = plan.engine_memory("generator", 1000, precision, 0, world_size=8)
    assert e.device_bytes == per_param * 1000
    assert e.param_bytes == plan.element_bytes(precision) * 1000


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_zero2_on_8_ranks_divides_optimizer_and_gradients_by_8(precision):
    n = 8 * 1_000_003
    plain = plan.engine_memory("generator", n, precision, 0, world_size=8)
    zero2 = plan.engine_memory("generator", n, precision, 2, world_size=8)
    assert (plain.optimizer_bytes + plain.grad_bytes) / (zero2.optimizer_bytes + zero2.grad_bytes) == pytest.approx(8)
    assert zero2.param_bytes == plain.param_bytes
    zero3 = plan.engine_memory("generator", n, precision, 3, world_size=8)
    assert plain.param_bytes / zero3.param_bytes == pytest.approx(8)


def test_offload_moves_optimizer_states_to_host():
    cfg = load_config("c_sn_mp", overrides=["train.zero_stage_critic=2"])
    on = plan.plan_memory(load_config("c_sn_mp", overrides=["train.zero_stage_critic=2",
                                                           "train.offload_optimizer=true"]), 4)
    off = plan.plan_memory(cfg, 4)
    assert on.generator.optimizer_bytes == on.critic.optimizer_bytes == 0
    assert on.host_bytes == off.generator.optimizer_bytes + off.critic.optimizer_bytes > 0
    assert off.total_bytes - on.total_bytes == on.host_bytes
    # DeepSpeed offloads only under ZeRO 2/3: a stage-1 critic keeps its states on the GPU.
    mixed = plan.plan_memory(load_config("c_sn_mp", overrides=["train.offload_optimizer=true"]), 4)
    assert mixed.critic.optimizer_bytes > 0 and mixed.generator.optimizer_bytes == 0


def test_activation_walk_is_linear_in_the_batch():
    model = load_config("xl_sn_mp", "smoke").model
    one = plan.network_activations(model, 1)
    for b in (3, 8):
        assert [plan._scaled(s, b) for s in one] == list(plan.network_activations(model, b))


def test_checkpointing_reduces_activations():
    on = plan.plan_memory(load_config("c_sn_mp", overrides=["train.activation_checkpointing=true"]), 4)
    off = plan.plan_memory(load_config("c_sn_mp"), 4)
    # measured on CPU (test_activation_peak_matches_the_profiled_peak_of_an_iteration): 0.63 of the peak
    assert on.activations.generator_step < 0.7 * off.activations.generator_step
    assert on.largest_batch > off.largest_batch


def test_largest_batch_is_monotone_in_gpu_memory_and_fits():
    cfg = load_config("sn")
    batches = [plan.largest_batch(cfg, 4, gb) for gb in (4, 8, 16, 40, 80, 160)]
    assert batches == sorted(batches) and batches[0] < batches[-1]
    b = plan.largest_batch(cfg, 4, 80)
    cfg.train.batch_size = b
    assert plan.plan_memory(cfg, 4, 80).fits
    cfg.train.batch_size = b + 1
    assert not plan.plan_memory(cfg, 4, 80).fits
    assert plan.largest_batch(cfg, 4, 1) == 0  # the overhead alone is 1 GiB


def test_recommends_stage_3_when_stages_1_and_2_do_not_fit():
    cfg = load_config("xl_sn_mp", overrides=["train.batch_size=1"])
    totals = {}
    for stage in (1, 2, 3):
        cfg.train.zero_stage_generator = stage
        totals[stage] = plan.plan_memory(cfg, 8).total_bytes / plan.GIB
    assert totals[1] > totals[2] > totals[3]
    between = (totals[2] + totals[3]) / 2
    assert plan.recommend_generator_stage(cfg, 8, between) == 3
    assert plan.recommend_generator_stage(cfg, 8, (totals[1] + totals[2]) / 2) == 2
    assert plan.recommend_generator_stage(cfg, 8, totals[3] * 0.9) is None
    # On 80 GiB cards xl_sn_mp is recommended the smallest stage whose total fits.
    p = plan.plan_memory(load_config("xl_sn_mp"), 4, 80)
    assert p.recommended_generator_stage == 1 and p.fits


def test_fit_warnings_for_a_run_that_does_not_fit():
    big = load_config("c_sn_mp", overrides=["train.batch_size=200", "cluster.gpus_per_node=4",
                                            "cluster.tasks_per_node=4"])
    small = load_config("sn", overrides=["cluster.gpus_per_node=4", "cluster.tasks_per_node=4"])
    cpu = load_config("c_sn_mp", overrides=["train.batch_size=200"])  # no GPUs: nothing to warn about
    lines = plan.fit_warnings([SimpleNamespace(cfg=c) for c in (big, small, cpu)], 80)
    assert len(lines) == 1
    largest = plan.largest_batch(big, 4, 80)
    assert lines[0].startswith("warning: variant c_sn_mp: estimated ")
    assert lines[0].endswith(f"GiB per GPU exceeds 80 GiB (largest batch that fits: {largest}; try --set "
                             "train.zero_stage_generator=3 or activation checkpointing)")


# --------------------------------------------------------------------------- against a measurement


def _saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs (parameters excluded)."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _measure_iteration(cfg) -> tuple[int, int]:
    """Saved bytes of a plain-PyTorch WGAN-GP critic step and generator step (fp32, CPU)."""
    torch.manual_seed(0)
    generator, critic = build_generator(cfg.model), build_critic(cfg.model)
    params = {p.untyped_storage().data_ptr() for p in [*generator.parameters(), *critic.parameters()]}
    batch = cfg.train.batch_size
    real = torch.rand(batch, 2, *cfg.model.patch_shape) * 2 - 1  # (B, 2, 32, 32, 16)

    def critic_step():
        with torch.no_grad():
            fake = generator(torch.randn(batch, cfg.model.latent_dim))
        loss = critic(fake).mean() - critic(real).mean()
        loss = loss + cfg.train.gp_weight * gradient_penalty(critic, real, fake)
        loss.backward()

    def generator_step():
        for p in critic.parameters():
            p.requires_grad_(False)
        (-critic(generator(torch.randn(batch, cfg.model.latent_dim))).mean()).backward()

    return _saved_bytes(critic_step, params), _saved_bytes(generator_step, params)


def test_activation_estimate_matches_a_measured_iteration():
    """Coarse: the estimate also holds a layer's gradients in backward, which autograd does not
    save; the profiled peak below is the precise check."""
    cfg = load_config("sn", "smoke", overrides=["model.ngf=64", "model.ndf=64", "train.batch_size=4"])
    measured_critic, measured_generator = _measure_iteration(cfg)
    est = plan.activation_bytes(cfg.model, cfg.train.batch_size, "fp32", checkpointing=False)
    ratios = {"critic step": est.critic_step / measured_critic,
              "generator step": est.generator_step / measured_generator,
              "peak": est.peak / max(measured_critic, measured_generator)}
    print("estimate / measurement:", {k: round(v, 3) for k, v in ratios.items()})
    for name, ratio in ratios.items():
        assert 0.5 <= ratio <= 2.0, f"{name}: estimate / measurement = {ratio:.3f}"


def test_dp_plan_has_no_zero_and_counts_per_sample_gradients():
    cfg = load_config("dp", overrides=["cluster.gpus_per_node=1"])
    p = plan.plan_memory(cfg, 4, 80)
    assert p.dp and p.precision == "fp32" and p.recommended_generator_stage is None
    for engine in (p.generator, p.critic):  # whole networks on every rank: 4 + 4 + 8 bytes per parameter
        assert engine.zero_stage == 0 and engine.device_bytes == 16 * engine.parameters
    critic_params, unfold = plan.per_sample_elements(cfg.model)
    assert critic_params == p.critic.parameters
    assert p.per_sample_bytes == 2 * plan.dp_batch(4) * (critic_params + unfold) * 4 and plan.dp_batch(4) == 10
    assert p.activations.critic_step > p.per_sample_bytes
    assert "the dp variant trains without DeepSpeed" in plan.format_plan(p)
    big = load_config("dp", overrides=["cluster.gpus_per_node=1", "train.batch_size=4000"])
    (line,) = plan.fit_warnings([SimpleNamespace(cfg=big)], 80)
    assert line.endswith("lower train.batch_size: the dp variant has no ZeRO)")
    assert 0 < plan.largest_batch(big, 1, 80) < 4000 and plan.largest_batch(big, 1, 40) <= plan.largest_batch(big, 1, 80)


def test_dp_estimate_matches_a_measured_opacus_step():
    """Saved activations plus Opacus' per-sample gradients of one DP critic step, measured on CPU,
    against the same two terms of the plan's critic step. Its other two terms, a layer's gradients
    and the largest unfolded input, live inside single operators (Opacus' einsum): the profiler
    cannot see them, so they stay unvalidated upper bounds."""
    pytest.importorskip("opacus")
    from hpc_gan.privacy.dp_critic import make_private_critic

    cfg = load_config("dp", "smoke", overrides=["model.ndf=64", "train.batch_size=4"])
    torch.manual_seed(0)
    critic = build_critic(cfg.model)
    params = {p.untyped_storage().data_ptr() for p in critic.parameters()}
    private = make_private_critic(critic, torch.optim.Adam(critic.parameters()), 0.1, 1.0, 1.0)
    samples = 2 * plan.dp_batch(cfg.train.batch_size)
    patches = torch.rand(samples, 2, *cfg.model.patch_shape) * 2 - 1

    def step():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            private.module(patches).sum().backward()

    saved = _saved_bytes(step, params)
    per_sample = sum(p.grad_sample.numel() * 4 for p in private.module.parameters() if p.requires_grad)
    critic_params, unfold = plan.per_sample_elements(cfg.model)
    assert per_sample == samples * critic_params * 4                     # exact
    critic_acts = plan._scaled(plan.network_activations(cfg.model, 1)[1], samples)
    step = plan.dp_activation_bytes(cfg.model, cfg.train.batch_size)[0].critic_step
    assert step == (critic_acts.total + critic_acts.transient + samples * (critic_params + unfold)) * 4
    ratio = (critic_acts.total + samples * critic_params) * 4 / (saved + per_sample)
    print(f"dp critic step: estimate / measurement = {ratio:.3f}")
    assert 0.8 <= ratio <= 1.25, ratio


def _profiled_peak(cfg) -> int:
    """Peak bytes of live tensors over one plain-PyTorch WGAN-GP iteration (fp32, CPU), above those
    alive when it starts (weights, Adam states), from the profiler's per-operator allocations."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    generator, critic = build_generator(cfg.model), build_critic(cfg.model)
    generator.checkpointing = critic.checkpointing = cfg.train.activation_checkpointing
    opt_g, opt_d = torch.optim.Adam(generator.parameters()), torch.optim.Adam(critic.parameters())
    batch, latent = cfg.train.batch_size, cfg.model.latent_dim
    real = torch.rand(batch, 2, *cfg.model.patch_shape) * 2 - 1

    def iteration():
        with torch.no_grad():
            fake = generator(torch.randn(batch, latent))
        loss = critic(fake).mean() - critic(real).mean() + cfg.train.gp_weight * gradient_penalty(critic, real, fake)
        opt_d.zero_grad()
        loss.backward()
        opt_d.step()
        for p in critic.parameters():
            p.requires_grad_(False)
        loss_g = -critic(generator(torch.randn(batch, latent))).mean()
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        for p in critic.parameters():
            p.requires_grad_(True)

    iteration()  # gradients and Adam states exist from here on
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        iteration()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage  # what the operator allocated minus what it freed
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("variant", ["sn", "gp"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_peak_matches_the_profiled_peak_of_an_iteration(variant, checkpointing):
    """The planner's activation peak against the measured peak of live tensors in one iteration
    (allocations freed inside a single operator, e.g. convolution workspaces, are not seen)."""
    cfg = load_config(variant, "smoke", overrides=["model.ngf=64", "model.ndf=64", "train.batch_size=4",
                                                    "model.patch_shape=48,48,32",
                                                    f"train.activation_checkpointing={str(checkpointing).lower()}"])
    measured = _profiled_peak(cfg)
    ratio = plan.activation_bytes(cfg.model, 4, "fp32", checkpointing).peak / measured
    print(f"{variant} checkpointing={checkpointing}: estimate / measured peak = {ratio:.3f}")
    assert 0.9 <= ratio <= 1.15, ratio


# --------------------------------------------------------------------------- command line


def test_plan_command_table_and_json(capsys):
    assert main(["plan", "--variant", "sn", "--nodes", "1", "--gpus-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "variant sn: 4 rank(s), fp32" in out and "139,916,994" in out and "fits" in out
    assert "largest batch per rank that fits:" in out and "recommended generator ZeRO stage: 1" in out
    assert main(["plan", "--variant", "c_sn_mp", "--nodes", "2", "--gpus-per-node", "4", "--json",
                 "--gpu-memory-gb", "40", "--set", "train.batch_size=2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["world_size"] == 8 and data["precision"] == "fp16" and data["batch_size"] == 2
    assert data["gpu_memory_bytes"] == 40 * plan.GIB and data["fits"] is True
    assert data["generator"]["parameters"] + data["critic"]["parameters"] == 307_974_147


def test_fp16_without_gpus_is_a_plan_not_an_error():
    cfg = load_config("sn", overrides=["train.precision=fp16"])
    assert plan.plan_memory(cfg, 1, cuda=False).precision == "fp16"


@pytest.mark.parametrize("argv, words", [
    (["--variant", "nope", "--nodes", "1", "--gpus-per-node", "1"], ["unknown variant 'nope'"]),
    (["--variant", "sn", "--nodes", "0", "--gpus-per-node", "1"], ["--nodes", "must be at least 1"]),
    (["--variant", "sn", "--nodes", "1"], ["--gpus-per-node"]),
    (["--variant", "sn", "--nodes", "1", "--gpus-per-node", "1", "--gpu-memory-gb", "0"], ["positive"]),
])
def test_bad_input_is_one_line(capsys, argv, words):
    assert main(["plan", *argv]) == 2
    assert_one_line_error(capsys, *words)


def test_config_errors_come_from_the_loader():
    with pytest.raises(ConfigError):
        plan.plan_memory(load_config("sn", overrides=["train.batch_size=0"]), 1)
