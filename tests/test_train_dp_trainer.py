"""The dp variant's trainer in one process: Poisson sampling, epsilon in the records, checkpoints,
exact resume, consolidation and sampling with the privacy record, and the refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("opacus")

from helpers import assert_one_line_error  # noqa: E402
from hpc_gan.config import load_config  # noqa: E402
from hpc_gan.dist import DistEnv, without_launcher_env  # noqa: E402
from hpc_gan.errors import CheckpointError, ConfigError  # noqa: E402
from hpc_gan.privacy.accounting import epsilon  # noqa: E402
from hpc_gan.train.dp_trainer import DPTrainer, PoissonBatches  # noqa: E402
from hpc_gan.train.consolidate import consolidate, load_generator  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SINGLE = DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, "single")
pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::UserWarning")]


def _cfg(shards, out, *sets):
    return load_config("dp", "smoke", overrides=[f"data.root={shards}", f"output_root={out}", "train.log_every=1",
                                                  "train.image_every=0", "data.verify=none", "train.max_steps=4",
                                                  "privacy.secret_seeds=false", "train.eval_every=0", *sets])


def _losses(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["loss_critic"], r["loss_generator"], r["epsilon"])
            for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def _weights(trainer: DPTrainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in
                      (*trainer.generator.parameters(), *trainer.private.critic.parameters())])


# ------------------------------------------------------------------ Poisson sampling


def test_ranks_share_one_global_poisson_sample():
    for step in (0, 7):
        reference = PoissonBatches(40, 0.3, 0, 1, seed=5).global_sample(step).tolist()
        for world in (1, 2, 3):
            shares = [next(iter(PoissonBatches(40, 0.3, r, world, seed=5, start=step))) for r in range(world)]
            assert sorted(sum(shares, [])) == reference                         # union = the global sample
            assert all(i % world == r for r, share in enumerate(shares) for i in share)


def test_poisson_batches_have_the_expected_size_and_resume_in_place():
    batches = iter(PoissonBatches(200, 0.05, 0, 1, seed=1))
    sizes = [len(next(batches)) for _ in range(2000)]
    assert sum(sizes) / len(sizes) == pytest.approx(10.0, rel=0.05)            # q * n
    assert 0 in sizes or min(sizes) < 5                                        # sizes vary (Poisson)
    later = iter(PoissonBatches(200, 0.05, 0, 1, seed=1, start=3))
    again = iter(PoissonBatches(200, 0.05, 0, 1, seed=1))
    for _ in range(3):
        next(again)
    assert next(later) == next(again)
    other_seed = iter(PoissonBatches(200, 0.05, 0, 1, seed=2))
    assert [next(other_seed) for _ in range(3)] != [next(iter(PoissonBatches(200, 0.05, 0, 1, seed=1, start=s)))
                                                    for s in range(3)]


# ------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def trained(smoke_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    trainer = DPTrainer(_cfg(smoke_shards, out), SINGLE)
    trainer.fit()
    return trainer


def test_records_carry_the_epsilon_spent(trained):
    records = [json.loads(line) for line in (trained.run_dir / "metrics.jsonl").read_text().splitlines()]
    q, delta = 2 / 15, 1 / 15                                       # batch 2 of 15 training patches
    assert trained.sample_rate == pytest.approx(q) and trained.delta == pytest.approx(delta)
    assert [r["critic_steps"] for r in records] == [5, 10, 15, 20]
    for r in records:
        assert r["epsilon"] == pytest.approx(epsilon(0.5, q, r["critic_steps"], delta), rel=1e-9)
        assert r["noise_multiplier"] == 0.5 and r["precision"] == "fp32"
    assert records[-1]["epsilon"] == pytest.approx(trained.planned_epsilon)
    assert all(p.abs().max() <= 0.01 for p in trained.private.critic.parameters())  # weight clipping


def test_checkpoint_holds_the_privacy_record(trained):
    where = trained.ckpt_root / "step-00000004"
    state = json.loads((where / "state.json").read_text())
    assert state["trainer"] == "dp" and (where / "COMPLETE").is_file()
    for name in ("dp_generator.pt", "dp_critic.pt", "dp_noise.pt"):  # recorded with size and digest
        assert state["files"][name]["size"] == (where / name).stat().st_size
    assert "sampling_seed" not in json.dumps(state)  # the secret seed stays in dp_noise.pt
    assert state["privacy"]["critic_steps"] == 20 and state["privacy"]["training_patches"] == 15
    assert state["privacy"]["epsilon"] == pytest.approx(trained.private.epsilon(trained.delta))


def test_consolidated_dp_generator_samples_like_the_trained_one(trained, tmp_path, capsys):
    from hpc_gan.data.dataset import ShardedPatchDataset
    from hpc_gan.eval.evaluate import privacy_of
    from hpc_gan.sample import sample_to_disk

    path = consolidate(trained.run_dir)
    generator, meta = load_generator(path, "dp")
    assert meta["privacy"]["epsilon"] == pytest.approx(trained.private.epsilon(trained.delta))
    z = torch.randn(3, trained.cfg.model.latent_dim, generator=torch.Generator().manual_seed(0))
    trained.generator.eval()
    with torch.no_grad():
        assert (generator(z) - trained.generator(z)).abs().max() < 1e-6
    trained.generator.train()
    record = sample_to_disk(path, 4, tmp_path / "samples", fmt="hdf5", seed=0)
    assert record["privacy"] == meta["privacy"]
    samples = ShardedPatchDataset(tmp_path / "samples", "train")
    assert privacy_of(torch.utils.data.Subset(samples, [0])) == meta["privacy"]
    from hpc_gan.cli import main

    assert main(["sample", str(path), "--n", "2", "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    assert f"privacy: DP-SGD critic, epsilon {meta['privacy']['epsilon']:.4g}" in capsys.readouterr().out


def test_resume_is_exact(smoke_shards, tmp_path, trained):
    """2 + resume + 2 steps == 4 straight; the split run reads through 2 DataLoader workers, the
    straight one in the main process: the Poisson batches do not depend on either."""
    import multiprocessing

    DPTrainer(_cfg(smoke_shards, tmp_path, "train.max_steps=2", "train.num_workers=2"), SINGLE).fit()
    resumed = DPTrainer(_cfg(smoke_shards, tmp_path, "train.num_workers=2"), SINGLE)
    resumed.fit()
    assert not multiprocessing.active_children()                            # fit() stopped its loader workers
    assert _losses(resumed.run_dir) == _losses(trained.run_dir)
    assert torch.equal(_weights(resumed), _weights(trained))


def test_secret_seeds_stay_out_of_published_files_and_survive_resume(smoke_shards, tmp_path):
    first = DPTrainer(_cfg(smoke_shards, tmp_path, "privacy.secret_seeds=true", "train.max_steps=1"), SINGLE)
    other = DPTrainer(_cfg(smoke_shards, tmp_path / "other", "privacy.secret_seeds=true"), SINGLE)
    assert first.sampling_seed != other.sampling_seed                        # drawn from the OS
    assert not torch.equal(first.noise_rng.get_state(), other.noise_rng.get_state())
    first.fit()
    noise_state = first.noise_rng.get_state()
    resumed = DPTrainer(_cfg(smoke_shards, tmp_path, "privacy.secret_seeds=true", "train.max_steps=1"), SINGLE)
    assert resumed.resume() == "step-00000001"
    assert resumed.sampling_seed == first.sampling_seed
    assert torch.equal(resumed.noise_rng.get_state(), noise_state)
    published = [first.run_dir / "config.yaml", first.ckpt_root / "step-00000001" / "state.json"]
    consolidated = consolidate(first.run_dir).read_bytes()
    for text in [p.read_text() for p in published]:
        assert str(first.sampling_seed) not in text
    assert str(first.sampling_seed).encode() not in consolidated


def test_a_stop_request_checkpoints_and_ends_the_run_for_requeue(smoke_shards, tmp_path):
    trainer = DPTrainer(_cfg(smoke_shards, tmp_path, "train.checkpoint_every=100"), SINGLE)
    trainer.stop_requested = True                          # as the SIGUSR2 handler leaves it
    trainer.fit()
    assert trainer.step == 1 and trainer.stop_requested
    assert (trainer.ckpt_root / "latest").read_text().strip() == "step-00000001"
    resumed = DPTrainer(_cfg(smoke_shards, tmp_path, "train.checkpoint_every=100"), SINGLE)
    resumed.fit()
    assert resumed.step == 4 and resumed.private.steps == 20


def test_resume_with_other_privacy_settings_is_refused(smoke_shards, tmp_path):
    DPTrainer(_cfg(smoke_shards, tmp_path, "train.max_steps=1"), SINGLE).fit()
    other = DPTrainer(_cfg(smoke_shards, tmp_path, "privacy.noise_multiplier=0.7"), SINGLE)
    with pytest.raises(CheckpointError, match="privacy accounting would be wrong"):
        other.fit()


def test_a_refused_resume_leaves_the_run_untouched(smoke_shards, tmp_path):
    """Issue 13, item 6: a refused resume must not have rewritten config.yaml or the metrics."""
    first = DPTrainer(_cfg(smoke_shards, tmp_path, "train.max_steps=1"), SINGLE)
    first.fit()
    files = [first.run_dir / "config.yaml", first.run_dir / "metrics.jsonl"]
    before = [f.read_bytes() for f in files]
    with pytest.raises(CheckpointError, match="privacy accounting would be wrong"):
        DPTrainer(_cfg(smoke_shards, tmp_path, "privacy.noise_multiplier=0.7", "train.lr_critic=0.5"), SINGLE).fit()
    assert [f.read_bytes() for f in files] == before


def test_torn_metrics_line_after_a_checkpoint_resumes_into_one_log(smoke_shards, tmp_path):
    """Issue 13, item 2: a job killed while appending left a torn line after the checkpoint."""
    first = DPTrainer(_cfg(smoke_shards, tmp_path, "train.max_steps=2", "train.checkpoint_every=1"), SINGLE)
    first.fit()
    metrics = first.run_dir / "metrics.jsonl"
    with metrics.open("a") as handle:
        handle.write('{"step": 3, "loss_cri')
    (first.ckpt_root / "step-00000002" / "COMPLETE").unlink()  # killed before step 2's checkpoint was whole
    resumed = DPTrainer(_cfg(smoke_shards, tmp_path, "train.max_steps=3", "train.checkpoint_every=1"), SINGLE)
    assert resumed.resume_point.tag == "step-00000001"
    resumed.fit()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]


def test_damaged_dp_checkpoint_is_refused(smoke_shards, tmp_path):
    first = DPTrainer(_cfg(smoke_shards, tmp_path, "train.max_steps=1"), SINGLE)
    first.fit()
    state = first.ckpt_root / "step-00000001" / "dp_generator.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*dp_generator\.pt has 100 bytes"):
        DPTrainer(_cfg(smoke_shards, tmp_path), SINGLE).fit()
    with pytest.raises(CheckpointError, match=r"dp_generator\.pt has 100 bytes"):
        consolidate(first.run_dir)


def test_target_epsilon_chooses_sigma(smoke_shards, tmp_path):
    trainer = DPTrainer(_cfg(smoke_shards, tmp_path, "privacy.target_epsilon=8", "train.max_steps=10"), SINGLE)
    assert trainer.sigma != 0.5
    assert 7.6 < trainer.planned_epsilon <= 8.0


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("setting", ["train.precision=bf16", "train.zero_stage_generator=3",
                                     "train.zero_stage_critic=2", "train.offload_optimizer=true",
                                     "train.activation_checkpointing=true", "train.sync_batchnorm=true"])
def test_deepspeed_only_settings_are_refused(setting):
    with pytest.raises(ConfigError, match=setting.split("=")[0].replace(".", r"\.") + ".*without DeepSpeed"):
        load_config("dp", "smoke", overrides=[setting])


def test_penalty_and_spectral_norm_are_refused():
    with pytest.raises(ConfigError, match="gp_weight=0"):
        load_config("dp", overrides=["train.gp_weight=10"])
    with pytest.raises(ConfigError, match="critic_norm=group"):
        load_config("dp", overrides=["model.critic_norm=spectral"])


def test_batch_larger_than_the_data_is_refused(smoke_shards, tmp_path):
    with pytest.raises(ConfigError, match="exceeds the 15 training patches"):
        DPTrainer(_cfg(smoke_shards, tmp_path, "train.batch_size=16"), SINGLE)


def test_trainer_refuses_the_other_kind_of_run(smoke_shards, tmp_path):
    from hpc_gan.train.trainer import Trainer

    with pytest.raises(ConfigError, match="DPTrainer"):
        Trainer(_cfg(smoke_shards, tmp_path), SINGLE)
    with pytest.raises(ConfigError, match="privacy.enabled=true"):
        DPTrainer(load_config("sn", "smoke", overrides=[f"data.root={smoke_shards}"]), SINGLE)


def test_train_entry_point_gives_one_line(capsys):
    from hpc_gan.train.__main__ import main

    assert main(["--variant", "dp", "--profile", "smoke", "--set", "train.precision=fp16"]) == 2
    assert_one_line_error(capsys, "train.precision", "without DeepSpeed")


def test_launcher_refuses_before_submitting(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "launch/submit.py"), "--variant", "dp", "--profile", "smoke",
                           "--cluster", "local", "--set", "train.zero_stage_critic=2", "--set",
                           f"output_root={tmp_path}", "--dry-run"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=without_launcher_env())
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.zero_stage_critic" in lines[0] and "without DeepSpeed" in lines[0], done.stderr
    assert not list(tmp_path.iterdir())                                      # nothing written
