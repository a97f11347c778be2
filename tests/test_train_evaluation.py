"""Evaluation during training in one process: the best pointer and pruning, the figures, the
record and progress line, and a short dp run (the shared loop) writing eval records and `best`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hpc_gan.config import load_config
from hpc_gan.dist import DistEnv
from hpc_gan.eval.fid import FIDStatistics
from hpc_gan.models import Generator
from hpc_gan.train import checkpoint as ckpt
from hpc_gan.train.evaluation import TrainingEvaluation, best_fid, figures
from hpc_gan.train.metrics import eval_line, is_eval

pytestmark = pytest.mark.unit
SINGLE = DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, "single")


def _fake_checkpoint(root, step, fid=None):
    where = root / ckpt.tag_of(step)
    where.mkdir(parents=True)
    (where / ckpt.STATE).write_text(json.dumps({"step": step, **({"eval": {"fid": fid}} if fid else {})}))
    ckpt.mark_complete(root, ckpt.tag_of(step))
    return where


def test_best_pointer_names_a_complete_checkpoint_and_its_fid(tmp_path):
    assert ckpt.best_tag(tmp_path) is None and best_fid(tmp_path) is None
    _fake_checkpoint(tmp_path, 100, fid=12.5)
    ckpt.mark_best(tmp_path, "step-00000100")
    assert ckpt.best_tag(tmp_path) == "step-00000100" and best_fid(tmp_path) == 12.5
    (tmp_path / ckpt.BEST).write_text("step-00000200\n")  # a checkpoint that is not COMPLETE
    assert ckpt.best_tag(tmp_path) is None


def test_prune_never_deletes_the_best_checkpoint(tmp_path):
    _fake_checkpoint(tmp_path, 100, fid=3.0)
    ckpt.mark_best(tmp_path, "step-00000100")
    for step in (200, 300, 400):
        _fake_checkpoint(tmp_path, step)
    removed = ckpt.prune(tmp_path, keep=2)
    assert removed == ["step-00000200"]
    assert ckpt.complete_tags(tmp_path) == ["step-00000100", "step-00000300", "step-00000400"]
    ckpt.mark_best(tmp_path, "step-00000400")  # a newer best: the old one goes at the next pruning
    assert ckpt.prune(tmp_path, keep=2) == ["step-00000100"]


def test_improves_keeps_the_lowest_finite_fid():
    evaluation = TrainingEvaluation.__new__(TrainingEvaluation)
    evaluation.best_fid = None
    assert not evaluation.improves({"fid": None}) and not evaluation.improves({"fid": math.nan})
    assert evaluation.improves({"fid": 10.0}) and evaluation.best_fid == 10.0
    assert not evaluation.improves({"fid": 10.0}) and not evaluation.improves({"fid": 11.0})
    assert evaluation.improves({"fid": 9.0}) and evaluation.best_fid == 9.0


def test_figures_of_identical_sets():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(20, 8))
    stats = FIDStatistics()
    stats.update(feats)
    labels = np.stack([rng.uniform(0, 0.2, 20), rng.uniform(0.5, 1.0, 20), np.full(20, np.nan)], axis=1)  # (N, 3)
    out = figures(feats, stats, labels, feats, stats, labels)
    assert abs(out["fid"]) < 1e-6 and out["precision"] == 1.0 and out["recall"] == 1.0
    assert out["vessel_fraction_ks"] == 0.0 and out["contrast"] == pytest.approx(out["contrast_real"])
    assert out["dice"] is None  # no segmenter (train.eval_segmenter=false)
    labels[:, 1] = np.nan  # no patch with both vessel and background
    assert figures(feats, stats, labels, feats, stats, labels)["contrast"] is None


def test_eval_record_and_line():
    record = {"step": 100, "eval": {"fid": 41.234, "precision": 0.5, "recall": None, "coverage": 0.25,
                                    "vessel_fraction_ks": 0.125, "contrast": 0.4, "contrast_real": 0.9,
                                    "seconds": 1.25}, "best_fid": 40.0, "time": 0.0}
    assert is_eval(record) and not is_eval({"step": 100, "loss_critic": 1.0})
    assert eval_line(record, 200) == ("step 100/200 eval | FID 41.23 (best 40) | P 0.500 R - cov 0.250 | "
                                      "vessel-fraction KS 0.125 | contrast 0.400 (real 0.900) | 1.2 s")


def test_evaluation_is_deterministic_and_uses_the_cache(smoke_shards, tmp_path):
    from hpc_gan.data.dataset import ShardedPatchDataset

    cfg = load_config("sn", "smoke", overrides=[f"data.root={smoke_shards}", "train.eval_samples=8",
                                                "train.eval_segmenter=true"])
    dataset = ShardedPatchDataset(smoke_shards, "train", verify="none")
    torch.manual_seed(0)
    generator = Generator(cfg.model.latent_dim, cfg.model.ngf, cfg.model.patch_shape)
    state = torch.get_rng_state()
    first = TrainingEvaluation(cfg, dataset, 0, 1, tmp_path).run(generator)
    assert torch.equal(torch.get_rng_state(), state)  # training's global RNG untouched
    assert list((tmp_path / "eval_cache").glob("*.npz"))  # the real statistics, kept for the next process
    assert list((tmp_path / "eval_cache").glob("segmenter-*.pt"))  # and the reference segmenter
    again = TrainingEvaluation(cfg, dataset, 0, 1, tmp_path).run(generator)
    assert generator.training  # the loop keeps training after an evaluation
    for key in ("fid", "precision", "recall", "coverage", "vessel_fraction_ks", "contrast", "contrast_real", "dice",
                "dice_real"):
        assert first[key] == pytest.approx(again[key], rel=1e-9, abs=1e-12), key
    assert first["n"] == 8 and first["n_real"] == 8 and first["fid"] > 0
    assert 0.0 <= first["dice"] <= 1.0 and 0.0 <= first["dice_real"] <= 1.0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_short_dp_run_writes_eval_records_and_best_pointer(smoke_shards, tmp_path, capsys):
    pytest.importorskip("opacus")
    from hpc_gan.train.dp_trainer import DPTrainer
    from hpc_gan.train.consolidate import consolidate

    cfg = load_config("dp", "smoke", overrides=[
        f"data.root={smoke_shards}", f"output_root={tmp_path}", "train.log_every=1", "train.image_every=0",
        "data.verify=none", "train.max_steps=5", "privacy.secret_seeds=false", "train.eval_every=2",
        "train.eval_samples=6", "train.checkpoint_every=100", "train.keep_checkpoints=1"])
    DPTrainer(cfg, SINGLE).fit()
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if is_eval(r)]
    assert [r["step"] for r in evals] == [2, 4, 5]  # every 2 steps and at the end
    assert all(math.isfinite(r["eval"]["fid"]) and r["eval"]["seconds"] > 0 for r in evals)
    assert len([r for r in records if not is_eval(r)]) == 5
    root = cfg.run_dir / "checkpoints"
    best = min(evals, key=lambda r: r["eval"]["fid"])
    assert ckpt.best_tag(root) == ckpt.tag_of(best["step"]) and best_fid(root) == best["eval"]["fid"]
    assert evals[-1]["best_fid"] == best["eval"]["fid"]
    assert ckpt.newest_complete(root) == "step-00000005"  # keep 1, plus the best
    assert set(ckpt.complete_tags(root)) == {ckpt.tag_of(best["step"]), "step-00000005"}
    assert ckpt.tag_of(best["step"]) in consolidate(cfg.run_dir, best=True).name
    from hpc_gan.cli import main

    assert main(["consolidate", str(cfg.run_dir), "--best", "--out", str(tmp_path / "best.pt")]) == 0
    said = capsys.readouterr().out
    assert f"at step {best['step']}" in said and f"the best checkpoint (FID {best['eval']['fid']:.4g}" in said
