"""Generator EMA (hpc_gan.train.ema): the update's known answers, warm-up, state round trip,
BatchNorm statistics, the config keys, and (through the one-process DP trainer, no DeepSpeed)
checkpoint, exact resume, consolidation and sampling with EMA or --raw weights."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from hpc_gan.config import describe, load_config
from hpc_gan.errors import CheckpointError, ConfigError
from hpc_gan.io import torch_save_atomic
from hpc_gan.models import Generator
from hpc_gan.train import checkpoint as ckpt
from hpc_gan.train.ema import GeneratorEMA, averaged_generator, effective_decay, for_run

pytestmark = pytest.mark.unit


def _set(module: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def test_update_known_answers_without_warmup():
    net = torch.nn.Linear(2, 1)
    _set(net, 1.0)
    ema = GeneratorEMA(net, decay=0.75)
    _set(net, 5.0)
    ema.update(net, step=0)                      # 0.75 * 1 + 0.25 * 5
    assert torch.equal(ema.params["weight"], torch.full((1, 2), 2.0))
    _set(net, 10.0)
    ema.update(net, step=1)                      # 0.75 * 2 + 0.25 * 10
    assert torch.equal(ema.params["bias"], torch.tensor([4.0]))
    assert ema.step == 1
    assert all(p.eq(10.0).all() for p in net.parameters())   # the module is not touched


def test_warmup_ramps_the_decay_and_caps_it():
    assert effective_decay(0.999, 0, True) == pytest.approx(0.1)
    assert effective_decay(0.999, 1, True) == pytest.approx(2 / 11)
    assert effective_decay(0.5, 10, True) == 0.5                 # (11 / 20) capped at the decay
    assert effective_decay(0.999, 10**6, True) == 0.999
    assert effective_decay(0.999, 0, False) == 0.999
    net = torch.nn.Linear(1, 1)
    _set(net, 0.0)
    ema = GeneratorEMA(net, decay=0.999, warmup=True)
    _set(net, 1.0)
    ema.update(net, step=0)                      # 0.1 * 0 + 0.9 * 1
    assert ema.params["bias"].item() == pytest.approx(0.9, abs=1e-7)
    ema.update(net, step=1)                      # 2/11 * 0.9 + 9/11 * 1
    assert ema.params["bias"].item() == pytest.approx(2 / 11 * 0.9 + 9 / 11, abs=1e-7)


def test_average_is_fp32_even_for_low_precision_modules():
    net = torch.nn.Linear(4, 4).to(torch.bfloat16)
    ema = GeneratorEMA(net, decay=0.9)
    assert all(t.dtype == torch.float32 for t in ema.params.values())
    ema.update(net, 0)


def test_decay_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        GeneratorEMA(torch.nn.Linear(1, 1), decay=1.0)


def _small_generator(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return Generator(8, 16, (16, 16, 16))


def test_state_dict_round_trip_is_exact(tmp_path):
    g = _small_generator()
    ema = GeneratorEMA(g, 0.9, warmup=True)
    _set(g, 0.3)
    ema.update(g, 0)
    torch_save_atomic(ema.state_dict(), tmp_path / ckpt.EMA)
    other = for_run(0.9, True, _small_generator(seed=1), tmp_path / ckpt.EMA)
    assert other.step == 0 and other.decay == 0.9 and other.warmup
    for name, value in ema.params.items():
        assert torch.equal(other.params[name], value)
    for name, value in ema.buffers.items():
        assert torch.equal(other.buffers[name], value)
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(CheckpointError, match="does not fit this generator"):
        GeneratorEMA(torch.nn.Linear(1, 1), 0.9).load_state_dict(ema.state_dict())


def test_for_run_off_missing_file_and_changed_decay(tmp_path, caplog):
    g = _small_generator()
    assert for_run(0.0, False, g) is None
    with caplog.at_level(logging.WARNING):
        ema = for_run(0.99, False, g, tmp_path / "missing.pt")
    assert "starts from the resumed weights" in caplog.text
    assert all(torch.equal(ema.params[n], p) for n, p in g.named_parameters())
    torch_save_atomic(ema.state_dict(), tmp_path / ckpt.EMA)
    with caplog.at_level(logging.WARNING):
        changed = for_run(0.9, True, g, tmp_path / ckpt.EMA)
    assert changed.decay == 0.9 and "continuing with decay 0.9" in caplog.text


def test_batchnorm_statistics_are_copied_not_averaged():
    g = _small_generator()
    ema = GeneratorEMA(g, 0.5)
    g.train()
    with torch.no_grad():
        g(g.sample_latent(2))                    # moves the running statistics
    name = next(n for n, _ in g.named_buffers() if n.endswith("running_mean"))
    live = dict(g.named_buffers())[name]
    assert not torch.equal(ema.buffers[name], live)
    ema.update(g, 0)
    assert not torch.equal(ema.buffers[name], live)   # update() leaves the copy alone
    ema.copy_buffers_from(g)
    assert torch.equal(ema.buffers[name], live)
    plain = ema.copy_to(_small_generator(seed=5))
    assert torch.equal(dict(plain.named_buffers())[name], live)
    for n, p in plain.named_parameters():
        assert torch.equal(p, ema.params[n])
    assert set(ema.weights()) == set(g.state_dict())


def test_averaged_generator_for_previews_leaves_the_global_rng_alone():
    g = _small_generator()
    ema = GeneratorEMA(g, 0.5)
    _set(g, 0.01)
    ema.update(g, 0)
    state = torch.get_rng_state()
    plain = averaged_generator(ema, lambda: Generator(8, 16, (16, 16, 16)), g, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)
    for n, p in plain.named_parameters():
        assert torch.equal(p, ema.params[n])
    for n, b in plain.named_buffers():
        assert torch.equal(b, dict(g.named_buffers())[n])


def test_config_keys_default_off_range_and_explain():
    cfg = load_config("c_sn_mp")
    assert cfg.train.ema_decay == 0.0 and cfg.train.ema_warmup is False   # the paper's recipe
    assert load_config("sn", overrides=["train.ema_decay=0.999", "train.ema_warmup=true"]).train.ema_warmup
    for bad, message in (("1", "must be < 1"), ("1.5", "must be < 1"), ("-0.1", "must be >= 0")):
        with pytest.raises(ConfigError, match=f"train.ema_decay.*{message}"):
            load_config("sn", overrides=[f"train.ema_decay={bad}"])
    keys = {row[0]: row for row in describe()}
    assert "moving average" in keys["train.ema_decay"][3] and "(1 + t) / (10 + t)" in keys["train.ema_warmup"][3]


# ------------------------------------------------------------------ through a trainer (dp: one process)


@pytest.fixture(scope="module")
def dp_run(smoke_shards, tmp_path_factory):
    pytest.importorskip("opacus")
    from hpc_gan.dist import DistEnv
    from hpc_gan.train.dp_trainer import DPTrainer

    single = DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, "single")

    def trainer(out, steps):
        cfg = load_config("dp", "smoke", overrides=[
            f"data.root={smoke_shards}", f"output_root={out}", "train.log_every=1", "train.image_every=2",
            "data.verify=none", f"train.max_steps={steps}", "train.checkpoint_every=2", "privacy.secret_seeds=false",
            "train.ema_decay=0.9", "train.ema_warmup=true", "train.num_workers=0"])
        return DPTrainer(cfg, single)

    root = tmp_path_factory.mktemp("ema_dp")
    straight = trainer(root / "straight", 4)
    straight.fit()
    trainer(root / "split", 2).fit()
    torch.manual_seed(7)  # resume must not depend on the global RNG
    resumed = trainer(root / "split", 4)
    resumed.fit()
    return straight, resumed


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_trainer_keeps_saves_and_resumes_the_ema_exactly(dp_run):
    straight, resumed = dp_run
    assert straight.ema.step == 3 and resumed.ema.step == 3
    where = straight.ckpt_root / "step-00000004"
    saved = torch.load(where / ckpt.EMA, weights_only=True)
    assert saved["decay"] == 0.9 and saved["warmup"] is True and saved["step"] == 3
    raw = dict(straight.generator.named_parameters())
    assert any(not torch.equal(saved["params"][n], raw[n]) for n in raw)        # an average, not a copy
    for name, value in saved["params"].items():                                 # bit-identical after resume
        assert torch.equal(value, resumed.ema.params[name]), name
    assert set(saved["buffers"]) == {n for n, _ in straight.generator.named_buffers()}
    assert (resumed.ckpt_root / "step-00000002" / ckpt.EMA).is_file()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_consolidated_file_carries_the_ema_and_sampling_uses_it_unless_raw(dp_run, tmp_path, capsys):
    from hpc_gan.cli import main
    from hpc_gan.train.consolidate import consolidate, load_generator

    straight, _ = dp_run
    path = consolidate(straight.run_dir)
    payload = torch.load(path, weights_only=True)
    assert payload["ema"]["decay"] == 0.9 and payload["ema"]["step"] == 3
    assert set(payload["ema"]["state_dict"]) == set(payload["state_dict"])
    ema_g, meta = load_generator(path)
    raw_g, raw_meta = load_generator(path, raw=True)
    assert meta["weights"] == "ema" and raw_meta["weights"] == "raw" and meta["ema"]["decay"] == 0.9
    assert "state_dict" not in meta["ema"]
    for n, p in ema_g.named_parameters():
        assert torch.equal(p, straight.ema.params[n])
    for n, p in raw_g.named_parameters():
        assert torch.equal(p, dict(straight.generator.named_parameters())[n])
    z = torch.Generator().manual_seed(0)
    assert (straight.samples(2, z) - ema_g(ema_g.sample_latent(2, torch.Generator().manual_seed(0)))).abs().max() < 1e-6

    assert main(["sample", str(path), "--n", "2", "--out", str(tmp_path / "ema"), "--no-progress"]) == 0
    assert "EMA weights, decay 0.9" in capsys.readouterr().out
    record = json.loads((tmp_path / "ema" / "samples.json").read_text())
    assert record["weights"] == "ema" and record["ema_decay"] == 0.9
    assert main(["sample", str(path), "--n", "2", "--out", str(tmp_path / "raw"), "--raw", "--format", "hdf5",
                 "--no-progress"]) == 0
    assert "raw weights" in capsys.readouterr().out
    assert json.loads((tmp_path / "raw" / "samples.json").read_text())["weights"] == "raw"
    assert json.loads((tmp_path / "raw" / "manifest.json").read_text())["sampling"]["weights"] == "raw"
