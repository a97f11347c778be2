"""Trainer pieces without DeepSpeed: checkpoint bookkeeping, the progress line, step skipping."""

from __future__ import annotations

import json

import pytest
import torch

from hpc_gan.errors import CheckpointError
from hpc_gan.models import Critic, Generator
from hpc_gan.train import checkpoint as ckpt
from hpc_gan.train.metrics import progress_line
from hpc_gan.train.steps import critic_step, generator_step

pytestmark = pytest.mark.unit


def _fake_checkpoint(root, step, complete=True):
    where = root / ckpt.tag_of(step)
    where.mkdir(parents=True)
    (where / ckpt.STATE).write_text(json.dumps({"step": step}))
    if complete:
        ckpt.mark_complete(root, ckpt.tag_of(step))
    return where


def test_newest_complete_ignores_incomplete_and_stale_pointer(tmp_path):
    assert ckpt.newest_complete(tmp_path) is None
    _fake_checkpoint(tmp_path, 100)
    _fake_checkpoint(tmp_path, 200)
    _fake_checkpoint(tmp_path, 300, complete=False)  # a job killed while saving
    assert ckpt.newest_complete(tmp_path) == "step-00000200"
    (tmp_path / ckpt.LATEST).write_text("step-00000300\n")  # pointer to an incomplete one
    assert ckpt.newest_complete(tmp_path) == "step-00000200"


def test_prune_keeps_newest_complete(tmp_path):
    for step in (100, 200, 300, 400):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 150, complete=False)
    _fake_checkpoint(tmp_path, 500, complete=False)  # may be being written right now: kept
    removed = ckpt.prune(tmp_path, keep=2)
    assert sorted(removed) == ["step-00000100", "step-00000150", "step-00000200"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-00000300", "step-00000400",
                                                                         "step-00000500"]
    assert (tmp_path / ckpt.LATEST).read_text().strip() == "step-00000400"


def test_read_state_errors(tmp_path):
    with pytest.raises(CheckpointError, match="state.json is missing"):
        ckpt.read_state(tmp_path)
    (tmp_path / ckpt.STATE).write_text("{")
    with pytest.raises(CheckpointError, match="damaged"):
        ckpt.read_state(tmp_path)


def test_rng_state_round_trip():
    gen = torch.Generator().manual_seed(5)
    state = ckpt.rng_state(gen)
    a = (torch.rand(3), torch.rand(3, generator=gen))
    ckpt.set_rng_state(state, gen)
    b = (torch.rand(3), torch.rand(3, generator=gen))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_progress_line():
    record = {"step": 300, "epoch": 2, "loss_critic": -1.23456, "loss_generator": 0.5, "wasserstein": 1.8,
              "penalty": 0.012, "patches_per_s": 12.34, "peak_memory_mb": 512.4, "precision": "fp16",
              "loss_scale_critic": 65536.0, "loss_scale_generator": 32768.0, "skipped_steps": 3}
    line = progress_line(record, 20000)
    assert line == ("step 300/20000 ep 2 | D -1.2346 G 0.5000 W 1.8000 GP 0.0120 | 12.3 patch/s | "
                    "scale 65536/32768 | skipped 3 | 512 MB")
    assert "scale" not in progress_line(dict(record, precision="bf16", skipped_steps=0), 10)


class FakeEngine:
    """The part of a DeepSpeed engine the step functions use."""

    def __init__(self, module):
        self.module = module
        self.optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        self.calls = []

    def __call__(self, x):
        return self.module(x)

    def fp16_enabled(self):
        return False

    def backward(self, loss):
        self.calls.append("backward")
        loss.backward()

    def step(self):
        self.calls.append("step")
        self.optimizer.step()
        self.optimizer.zero_grad()

    def zero_grad(self):
        self.calls.append("zero_grad")
        self.optimizer.zero_grad()


def _engines():
    torch.manual_seed(0)
    return FakeEngine(Generator(8, 16, (16, 16, 16))), FakeEngine(Critic(16, (16, 16, 16), norm="spectral"))


def test_finite_steps_update_and_nonfinite_steps_are_skipped():
    generator, critic = _engines()
    rng = torch.Generator().manual_seed(0)
    real = torch.rand(2, 2, 16, 16, 16) * 2 - 1
    before = [p.detach().clone() for p in critic.module.parameters()]
    scalars, finite = critic_step(generator, critic, real, rng, gp_weight=10.0, gp_mode="per_sample")
    assert finite and critic.calls == ["backward", "step"] and scalars["penalty"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, critic.module.parameters()))
    before = [p.detach().clone() for p in critic.module.parameters()]
    poisoned = real.clone()
    poisoned[0, 0, 0, 0, 0] = float("nan")
    _, finite = critic_step(generator, critic, poisoned, rng, gp_weight=10.0, gp_mode="per_sample")
    assert not finite and critic.calls[-1] == "zero_grad"
    assert all(torch.equal(a, b) for a, b in zip(before, critic.module.parameters()))


def test_generator_step_freezes_the_critic():
    generator, critic = _engines()
    rng = torch.Generator().manual_seed(0)
    _, finite = generator_step(generator, critic, 2, rng, "cpu", torch.float32)
    assert finite and generator.calls == ["backward", "step"]
    assert all(p.grad is None for p in critic.module.parameters())   # no gradient reached the critic
    assert all(p.requires_grad for p in critic.module.parameters())  # and it is trainable again


def test_real_labels_are_mapped_to_the_generators_range():
    from hpc_gan.train.steps import to_model_range

    batch = torch.stack([torch.full((1, 2, 2, 2), 0.25), torch.tensor([0.0, 1.0]).repeat(4).view(1, 2, 2, 2)], dim=1)
    out = to_model_range(batch)
    assert torch.equal(out[:, 0], batch[:, 0])                       # image untouched
    assert set(out[:, 1].unique().tolist()) == {-1.0, 1.0}            # label {0, 1} -> {-1, 1}
    assert set(batch[:, 1].unique().tolist()) == {0.0, 1.0}           # input not modified
