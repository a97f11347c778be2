"""``make demo``: the main job end to end on the embedded default, on this machine's CPU.

Phantom TOF-MRA volumes -> sharded HDF5 patches (32x32x16) -> the ``sn`` variant with the
``learn`` profile (what a small CPU model needs to learn, see hpc_gan/configs/profiles/learn.yaml)
trained on 2 local ranks (gloo, fp32) -> consolidated generator (EMA weights) -> 100 samples ->
evaluation report (FID against the held-out baseline, PRD, precision/recall, label realism,
label-image agreement) -> downstream test (a small U-Net trained on real and on generated
patches, DSC/bAVD on real volumes). Training is submitted like a user would
(``launch/submit.py --cluster local``: submitit's local executor). Everything goes to
``demo_out/`` and is replaced on every run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from hpc_gan.config import load_config
from hpc_gan.data import pack as packing
from hpc_gan.data.cli_pack import summary
from hpc_gan.data.patches import SamplingPlan
from hpc_gan.data.phantom import write_phantom_dataset
from hpc_gan.errors import HpcGanError

log = logging.getLogger("hpc_gan.demo")
DEMO_VARIANT, DEMO_PROFILE = "sn", "learn"
DEMO_STEPS = 2500  # the learn profile's curve (docs/BENCHMARKS.md): vessels with labels on them by then, ~6 min


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="output directory (replaced)")
    parser.add_argument("--subjects", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=2, help="training processes")
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help="training steps")
    parser.add_argument("--samples", type=int, default=100, help="patches generated for the evaluation")
    return parser.parse_args(argv)


def demo_overrides(out: Path, steps: int) -> list[str]:
    """The demo's changes to the variant's profile (the same for the config and the job)."""
    return [f"data.root={out / 'shards'}", f"output_root={out / 'runs'}", "name=demo", f"train.max_steps={steps}",
            "train.log_every=250", f"train.checkpoint_every={max(steps // 3, 1)}", "data.verify=full"]


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    overrides = demo_overrides(out, args.steps)
    cfg = load_config(DEMO_VARIANT, profile=DEMO_PROFILE, overrides=overrides)
    started = time.perf_counter()
    ids = make_data(args, cfg, out)
    train(cfg, args.ranks, overrides)
    generator_file = consolidate_run(cfg)
    report_dir = sample_and_evaluate(cfg, generator_file, args.samples)
    tstr_dir = downstream_test(cfg, out)
    print_summary(cfg, out, ids, generator_file, report_dir, tstr_dir, time.perf_counter() - started)


def make_data(args: argparse.Namespace, cfg, out: Path) -> list[str]:
    return make_phantom_shards(out, args.subjects, cfg.model.patch_shape, cfg.data.root, args.workers)


def make_phantom_shards(out: Path, subjects: int, patch_shape, shards: Path, workers: int = 2) -> list[str]:
    """Phantom volumes (96x96x48 voxels of 0.5x0.5x0.8 mm, seed 0) in ``out/phantoms`` packed
    into ``shards``: 75/12.5/12.5 % of subjects for train/val/test, 50 patches per subject (a
    3x3x2 grid and 32 vessel-centred). Shared by the demo and ``bench/convergence.py``.
    Returns the subject ids."""
    log.info("1/7 phantoms: %d subjects of 96x96x48 voxels at 0.5x0.5x0.8 mm", subjects)
    ids = write_phantom_dataset(out / "phantoms", subjects, seed=0, workers=workers, overwrite=True)
    log.info("2/7 packing %s patches into shards", "x".join(map(str, patch_shape)))
    found = packing.match_subjects(out / "phantoms/images", out / "phantoms/labels", out / "phantoms/masks")
    splits = packing.assign_splits(ids, (0.75, 0.125, 0.125), seed=0)
    manifest = packing.pack(found, splits, shards, SamplingPlan(patch_shape, (3, 3, 2), 32, 0),
                            workers=workers, overwrite=True, progress=False)
    print(summary(manifest), flush=True)
    return ids


def train(cfg, ranks: int, overrides: list[str]) -> None:
    """Submit the training as a user would (launch/submit.py --cluster local), and wait for it."""
    from hpc_gan.cli import main as hpc_gan_main

    log.info("3/7 training %s (%s profile) for %d steps on %d local ranks via submitit", cfg.variant, cfg.profile,
             cfg.train.max_steps, ranks)
    code = hpc_gan_main(["submit", "--variant", cfg.variant, "--profile", cfg.profile, "--cluster", "local",
                         "--tasks-per-node", str(ranks), "--name", cfg.name, "--overwrite", "--wait",
                         *[arg for text in overrides for arg in ("--set", text)]])
    jobs = json.loads((cfg.run_dir.parent / "jobs.json").read_text())["jobs"]
    for row in Path(jobs[cfg.variant]["stdout"]).read_text().splitlines():
        if row.startswith(("hpc_gan train:", "step ")):
            print(f"  {row}")
    if code != 0:
        raise RuntimeError(f"training failed; see the logs under {cfg.run_dir.parent / 'logs'}")


def consolidate_run(cfg) -> Path:
    from hpc_gan.train.consolidate import consolidate

    log.info("4/7 consolidating the generator's ZeRO shards")
    return consolidate(cfg.run_dir)


def sample_and_evaluate(cfg, generator_file: Path, n: int) -> Path:
    from hpc_gan.eval.evaluate import evaluate
    from hpc_gan.sample import sample_to_disk

    samples, report = cfg.run_dir / "samples", cfg.run_dir / "eval"
    log.info("5/7 sampling %d patches from %s", n, generator_file.name)
    sample_to_disk(generator_file, n, samples, fmt="hdf5", seed=0, overwrite=True)
    log.info("6/7 evaluating them against the real training patches (held-out baseline: test split)")
    evaluate(str(samples), cfg.data.root, str(report), seed=0, overwrite=True)  # the demo re-runs from scratch
    return report


def downstream_test(cfg, out: Path) -> Path:
    """A small U-Net trained on real and on generated patches, tested on the real test subject."""
    from hpc_gan.cli import main as hpc_gan_main

    log.info("7/7 downstream test: a U-Net per training source (real, generated), DSC and bAVD on real volumes")
    tstr_dir = cfg.run_dir / "tstr"
    code = hpc_gan_main(["tstr", "--real", cfg.data.root, "--images", str(out / "phantoms/images"),
                         "--labels", str(out / "phantoms/labels"), "--masks", str(out / "phantoms/masks"),
                         "--source", "real", "--source", f"{cfg.variant}={cfg.run_dir / 'samples'}",
                         "--out", str(tstr_dir), "--steps", "100", "--val-every", "25", "--batch", "4", "--lr", "1e-3",
                         "--channels", "8", "16", "32", "64"])
    if code != 0:
        raise RuntimeError("the downstream test failed")
    return tstr_dir


def print_summary(cfg, out: Path, ids: list[str], generator_file: Path, report_dir: Path, tstr_dir: Path,
                  seconds: float) -> None:
    from hpc_gan.train.metrics import is_eval

    from hpc_gan.io import read_jsonl

    written = read_jsonl(cfg.run_dir / "metrics.jsonl")
    records = [r for r in written if not is_eval(r)]
    evals = [r for r in written if is_eval(r)]
    first, last = records[0], records[-1]
    report = json.loads((report_dir / "report.json").read_text())
    print(outcome(report))
    print(f"critic loss {first['loss_critic']:.3f} -> {last['loss_critic']:.3f}, Wasserstein estimate "
          f"{first['wasserstein']:.3f} -> {last['wasserstein']:.3f} over {last['step']} steps")
    if evals:
        print(f"FID during training:    {' -> '.join(format(r['eval']['fid'] or float('nan'), '.4g') for r in evals)} "
              f"(steps {', '.join(str(r['step']) for r in evals)}; best in checkpoints/best)")
    print(f"phantom MIP picture:    {out / 'phantoms' / f'mip_{ids[0]}.png'}")
    print(f"shards and manifest:    {cfg.data.root}")
    print(f"run directory:          {cfg.run_dir} (config.yaml, metrics.jsonl, tensorboard/, checkpoints/)")
    print(f"consolidated generator: {generator_file}")
    print(f"samples and pictures:   {cfg.run_dir / 'samples'} (montage.png, mip.png)")
    print(f"evaluation report:      {report_dir / 'report.md'} (prd.png, label_stats.png)")
    print(f"downstream U-Net test:  {tstr_dir / 'table.md'} (scores.csv, boxplots.png, error_map_*.png)")
    print(f"demo finished in {seconds:.0f} s")


def outcome(report: dict) -> str:
    """What the demo learned, in three lines: FID against the real-vs-real baseline at the same N,
    nearest-neighbour precision/recall, and label-image agreement against held-out real patches."""
    fid, held = report["fid"]["generated_vs_real"], report["fid"]["heldout_vs_real"]
    nn = report["nearest_neighbours"].get("generated", {})
    lines = [f"FID {fid:.4g} against the held-out baseline {held:.4g} ({fid / held:.1f}x; same N, random extractor)"
             if held else f"FID {fid:.4g} (no held-out split: no baseline)",
             f"precision {nn.get('precision', float('nan')):.2f}, recall {nn.get('recall', float('nan')):.2f}, "
             f"coverage {nn.get('coverage', float('nan')):.2f} (k={nn.get('k')})"]
    agreement = report.get("agreement") or {}
    dice, contrast = agreement.get("segmenter_dice", {}), agreement.get("contrast", {})
    if dice:
        lines.append(f"label-image agreement: segmenter DSC {_num(dice.get('generated'))} on generated pairs vs "
                     f"{_num(dice.get('real'))} on held-out real ({_num(dice.get('ratio'))}x); label contrast "
                     f"{_num(contrast.get('generated'))} vs {_num(contrast.get('real'))}")
    return "\n".join(lines)


def _num(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        run(parse_args(argv))
    except HpcGanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
