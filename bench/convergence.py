#!/usr/bin/env python
"""Does the generator learn? Phantoms -> shards -> training on local ranks -> evaluation of
several checkpoints, with every figure against training steps and wall time (JSON + PNG).

The pipeline is the one a user runs: ``hpc_gan make-phantoms`` data (16 subjects of 96x96x48
voxels by default), packed at the profile's patch size (75/12.5/12.5 % subject split), trained
through ``launch/submit.py --cluster local`` (submitit's local executor, ``--ranks`` processes,
gloo, CPU), then for every ``--eval-every`` steps' checkpoint: consolidate -> sample
``--samples`` patches -> ``hpc_gan evaluate`` against the training split, with the held-out
(test) split as the real-vs-real baseline at the same N.

Per checkpoint the JSON holds FID (generated and held-out, both against the same real
patches), precision / recall / density / coverage (Kynkäänniemi et al. 2019; Naeem et al.
2020; k of the evaluator), the vessel-fraction KS statistic, label–image agreement (reference
segmenter DSC and label contrast, generated ÷ held-out real), mean pairwise MS-SSIM and the
training wall time at which the checkpoint was written. Targets (issue 12), met at the best
checkpoint within ``--budget-min`` minutes of training wall time:

    FID <= 3 x held-out FID, precision >= 0.6, recall >= 0.4, vessel-fraction KS <= 0.2,
    agreement (segmenter DSC ratio) >= 0.8

Commands:

    .venv/bin/python bench/convergence.py --profile learn --out conv.json --png conv.png      # ~20 min
    .venv/bin/python bench/convergence.py --profile smoke --steps 4000                          # the old default
    .venv/bin/python bench/convergence.py --profile learn --set train.ema_decay=0 --tag no-ema  # an ablation row
    .venv/bin/python bench/convergence.py --quick                                              # CI smoke, ~2 min
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from _report import emit  # noqa: E402

TARGETS = {"fid_ratio": ("<=", 3.0), "precision": (">=", 0.6), "recall": (">=", 0.4),
           "vessel_fraction_ks": ("<=", 0.2), "agreement_dice_ratio": (">=", 0.8)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--variant", default="sn")
    parser.add_argument("--profile", default="learn")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the profile's)")
    parser.add_argument("--eval-every", type=int, default=1000, help="evaluate every this many steps' checkpoint")
    parser.add_argument("--samples", type=int, default=100, help="N of every evaluated set (held-out split: 100)")
    parser.add_argument("--subjects", type=int, default=16)
    parser.add_argument("--agreement-steps", type=int, default=300, help="training steps of the reference segmenter")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--budget-min", type=float, default=20.0, help="training wall-time budget for the targets")
    parser.add_argument("--tag", default="", help="a name for this row of an ablation table")
    parser.add_argument("--work", default=None, help="keep everything in this directory (default: a temporary one)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--png", default=None, help="write the curves here")
    parser.add_argument("--quick", action="store_true", help="a few hundred steps on 8 subjects: checks the script")
    args = parser.parse_args(argv)
    if args.quick:
        args.subjects, args.steps, args.eval_every, args.samples, args.agreement_steps = 8, 200, 100, 40, 30
    return args


def train(args: argparse.Namespace, shards: Path, work: Path) -> tuple[Path, float, dict]:
    """Submit the run as a user would and wait; returns (run directory, wall seconds, config)."""
    from hpc_gan.cli import main as hpc_gan_main
    from hpc_gan.config import load_config, to_dict

    overrides = [f"data.root={shards}", f"output_root={work / 'runs'}", "name=convergence",
                 f"train.checkpoint_every={args.eval_every}", "train.keep_checkpoints=1000", *args.set]
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    cfg = load_config(args.variant, profile=args.profile, overrides=overrides)
    started = time.perf_counter()
    code = hpc_gan_main(["submit", "--variant", args.variant, "--profile", args.profile, "--cluster", "local",
                         "--tasks-per-node", str(args.ranks), "--name", cfg.name, "--overwrite", "--wait",
                         *[a for text in overrides for a in ("--set", text)]])
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"training failed (exit {code}); logs under {cfg.run_dir.parent / 'logs'}")
    return cfg.run_dir, wall, to_dict(cfg)


def evaluate_checkpoints(run_dir: Path, shards: Path, samples: int, work: Path, submitted: float,
                         agreement_steps: int = 300, every: int = 1000) -> list[dict]:
    """The COMPLETE checkpoints at multiples of ``every`` steps, the last one and the one that
    ``checkpoints/best`` names (the in-training evaluation's lowest FID): consolidate, sample,
    evaluate; one flat row each. ``submitted``: the epoch time of the submission (a
    checkpoint's training time counts start-up too)."""
    from hpc_gan.eval.evaluate import evaluate
    from hpc_gan.sample import sample_to_disk
    from hpc_gan.train import checkpoint as ckpt
    from hpc_gan.train.consolidate import consolidate

    root = run_dir / "checkpoints"
    tags = ckpt.complete_tags(root)
    best = ckpt.best_tag(root)
    rows = []
    for tag in tags:
        state = ckpt.read_state(root / tag)
        if state["step"] % every and tag != tags[-1] and tag != best:
            continue
        generator = consolidate(run_dir, tag)
        out = work / "eval" / tag
        sample_to_disk(generator, samples, out / "samples", fmt="hdf5", seed=1, overwrite=True)
        began = time.perf_counter()
        report = evaluate(str(out / "samples"), str(shards), str(out / "report"), n=samples, seed=0,
                          cache=str(work / "feature_cache"), agreement_steps=agreement_steps)
        row = flatten(report)
        row.update(step=state["step"], best=tag == best, train_seconds=state["saved"] - submitted,
                   eval_seconds=time.perf_counter() - began, montage=str(out / "samples" / "montage.png"))
        rows.append(row)
        print(f"{tag}: " + ", ".join(f"{k} {row[k]:.3g}" for k in ("fid_ratio", "precision", "recall",
              "vessel_fraction_ks", "agreement_dice_ratio") if isinstance(row.get(k), float)), file=sys.stderr)
    return rows


def flatten(report: dict) -> dict:
    """The figures of one evaluation report that the targets and the curves use."""
    fid, held = report["fid"]["generated_vs_real"], report["fid"]["heldout_vs_real"]
    nn = report["nearest_neighbours"]
    gen_nn, held_nn = nn.get("generated", {}), nn.get("heldout", {})
    realism = report["label_realism"]
    vf = next((v for k, v in realism.items() if "fraction" in k), {})
    agreement = report.get("agreement") or {}
    dice = agreement.get("segmenter_dice", {})
    contrast = agreement.get("contrast", {})
    return {"fid": fid, "fid_heldout": held, "fid_ratio": fid / held if held else None,
            "precision": gen_nn.get("precision"), "recall": gen_nn.get("recall"),
            "density": gen_nn.get("density"), "coverage": gen_nn.get("coverage"), "k": gen_nn.get("k"),
            "precision_heldout": held_nn.get("precision"), "recall_heldout": held_nn.get("recall"),
            "coverage_heldout": held_nn.get("coverage"),
            "vessel_fraction_ks": vf.get("ks"),
            "agreement_dice": dice.get("generated"), "agreement_dice_real": dice.get("real"),
            "agreement_dice_ratio": dice.get("ratio"),
            "contrast": contrast.get("generated"), "contrast_real": contrast.get("real"),
            "contrast_ratio": contrast.get("ratio"),
            "ms_ssim": report["diversity_ms_ssim"]["mean_pairwise_ms_ssim"]}


def meets(row: dict) -> dict:
    out = {}
    for key, (op, bound) in TARGETS.items():
        value = row.get(key)
        out[key] = value is not None and (value <= bound if op == "<=" else value >= bound)
    return out


def summarise(rows: list[dict], budget_s: float) -> dict:
    """The best checkpoint within the budget: the most targets met, then the lowest FID ratio."""
    within = [r for r in rows if r["train_seconds"] <= budget_s] or rows[:1]
    best = max(within, key=lambda r: (sum(meets(r).values()), -(r["fid_ratio"] or 1e9)))
    return {"step": best["step"], "train_seconds": best["train_seconds"],
            **{k: best.get(k) for k in TARGETS}, "meets": meets(best), "all_met": all(meets(best).values())}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    panels = [("FID ÷ held-out FID", ["fid_ratio"], 3.0), ("precision / recall / coverage",
              ["precision", "recall", "coverage"], None), ("vessel-fraction KS", ["vessel_fraction_ks"], 0.2),
              ("agreement (generated ÷ real)", ["agreement_dice_ratio", "contrast_ratio"], 0.8),
              ("MS-SSIM (diversity, lower = more diverse)", ["ms_ssim"], None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (name, keys, target) in zip(axes, panels):
        for key in keys:
            ax.plot(steps, [r.get(key) if r.get(key) is not None else float("nan") for r in rows], "o-", label=key)
        if target is not None:
            ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    if rows:
        minutes = rows[-1]["train_seconds"] / 60
        fig.suptitle(f"{title} — {rows[-1]['step']} steps in {minutes:.1f} min of training", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hpc_gan.demo import make_phantom_shards
    from hpc_gan.train.metrics import is_eval

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hpc_gan_convergence_"))
    began = time.perf_counter()
    try:
        from hpc_gan.config import load_config

        patch_shape = load_config(args.variant, profile=args.profile, overrides=args.set).model.patch_shape
        with contextlib.redirect_stdout(sys.stderr):  # stdout holds the JSON alone
            shards = work / "shards"
            make_phantom_shards(work, args.subjects, patch_shape, shards)
            submitted = time.time()
            run_dir, train_wall, config = train(args, shards, work)
            rows = evaluate_checkpoints(run_dir, shards, args.samples, work, submitted, args.agreement_steps,
                                        args.eval_every)
        from hpc_gan.io import read_jsonl

        records = read_jsonl(run_dir / "metrics.jsonl")
        evals = [r["eval"] for r in records if is_eval(r)]
        eval_seconds = sum(e.get("seconds", 0.0) for e in evals)
        result = {
            "benchmark": "convergence", "tag": args.tag, "variant": args.variant, "profile": args.profile,
            "overrides": args.set, "ranks": args.ranks, "subjects": args.subjects,
            "train_wall_seconds": train_wall, "total_wall_seconds": time.perf_counter() - began,
            "targets": {k: f"{op} {b}" for k, (op, b) in TARGETS.items()}, "budget_minutes": args.budget_min,
            "best_within_budget": summarise(rows, args.budget_min * 60),
            "in_training_eval": {"records": len(evals), "seconds": eval_seconds,
                                 "fraction_of_training": eval_seconds / train_wall if train_wall else None},
            "checkpoints": rows, "config": {k: config[k] for k in ("model", "train")},
            "settings": {"samples": args.samples, "eval_every": args.eval_every, "quick": args.quick,
                         "agreement_steps": args.agreement_steps},
            "environment": {"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(),
                            "python": platform.python_version(), "load_average": os.getloadavg()},
        }
        if args.quick:
            result["note"] = "--quick: a check that the script runs, not a measurement"
        if args.png:
            plot(rows, Path(args.png), f"{args.variant} / {args.profile} {args.tag}".strip())
        return emit(result, args.out)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
