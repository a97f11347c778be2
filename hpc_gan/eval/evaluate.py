"""``hpc_gan evaluate``: generated patches against real ones, as the paper evaluates (and more).

    hpc_gan evaluate --samples samples/c_sn_mp --real data/shards --out reports/c_sn_mp
    torchrun --nproc_per_node 4 -m hpc_gan.eval --samples ... --real ... --out ...   # distributed

Sets (all of the same patch shape, N = min(#generated, #real training patches)):

* generated: the first N patches of a sample directory (``hpc_gan sample --format hdf5``);
* real: N training patches drawn with the evaluation seed;
* held-out: up to N patches of the held-out split (``test`` by default): the real-vs-real
  baseline, which says what FID and PRD look like when nothing is wrong at this N.

Every rank embeds its share of each set; FID's sufficient statistics are all-reduced; the
features are gathered for PRD, precision/recall and density/coverage; rank 0 computes the rest
and writes ``report.json``, ``report.md``, ``prd.png``, ``label_stats.png`` and
``closest_pairs.png`` (the memorisation audit's closest generated/training pairs).

The report directory is checked before any work (``--out`` must be a directory path that can be
written; one that already holds a report is refused unless ``overwrite``) and the new report is
built beside it and moved in only when complete (:func:`hpc_gan.io.staged_directory`), so a
failed or refused evaluation never replaces an earlier report.

Label–image agreement (:mod:`hpc_gan.eval.agreement`) runs on rank 0 alone, after the last
collective (the other ranks have returned by then, so none waits on it): a reference U-Net
trained on the real training split (cached in ``cache`` when given) scores up to
``AGREEMENT_SAMPLES`` generated pairs and as many held-out real pairs (the training subset when
there is no held-out split, which the report says).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from hpc_gan.errors import DataError

log = logging.getLogger(__name__)
MS_SSIM_SAMPLES = 32  # images held in memory for the diversity score
REPORT_FILES = ("report.json", "report.md", "prd.png", "label_stats.png", "closest_pairs.png")
AGREEMENT_SAMPLES = 256  # pairs per set scored for label–image agreement (a mean: ±0.01 at this N)


@dataclass
class EvalSets:
    generated: Subset
    real: Subset
    heldout: Subset | None
    spacing: tuple[float, float, float]


def load_sets(samples: str, real: str, real_split: str, heldout_split: str, n: int | None, seed: int,
              data_cache=None) -> EvalSets:
    """Open the three sets and choose their members (deterministic for ``seed``). The real sets
    are read through the node-local cache when ``data_cache`` (:class:`~hpc_gan.data.cache.CacheSettings`)
    asks for one; the generated set is read once, so it is not cached.

    Raises:
        DataError: an empty sample set, patch shapes that differ, too few patches.
    """
    from hpc_gan.data.cache import open_dataset
    from hpc_gan.data.dataset import ShardedPatchDataset

    try:
        generated = ShardedPatchDataset(samples, "train", verify="size")
    except DataError as exc:
        raise DataError(f"sample set '{samples}': {exc}") from None
    real_ds = open_dataset(real, real_split, "size", data_cache)
    if generated.patch_shape != real_ds.patch_shape:
        raise DataError(f"generated patches are {generated.patch_shape} but real ones {real_ds.patch_shape}; "
                        "evaluate samples of a model trained on this data")
    count = min(len(generated), len(real_ds), n or len(generated))
    if count < 2:
        raise DataError(f"only {count} patch(es) to compare; generate more samples (hpc_gan sample --n)")
    rng = np.random.default_rng(seed)
    heldout = None
    if heldout_split in real_ds.manifest.splits() and real_ds.manifest.count(heldout_split):
        held = open_dataset(real, heldout_split, "size", data_cache)
        heldout = Subset(held, pick(len(held), min(count, len(held)), rng))
    return EvalSets(generated=Subset(generated, list(range(count))),
                    real=Subset(real_ds, pick(len(real_ds), count, rng)),
                    heldout=heldout, spacing=real_ds.manifest.spacing)


def pick(size: int, count: int, rng: np.random.Generator) -> list[int]:
    """``count`` distinct indices of ``range(size)`` drawn with ``rng``, sorted."""
    return sorted(rng.permutation(size)[:count].tolist())


def embed(subset, extractor, rank: int, world: int, seed: int, batch: int, channel: int, device="cpu"):
    """(all features in index order, FID statistics all-reduced over ranks) of a dataset of
    (2, X, Y, Z) patches whose label channel is {0, 1} (a collective call)."""
    from hpc_gan.eval.features import extract_features, gather_features
    from hpc_gan.eval.fid import FIDStatistics

    # both sets store labels as {0, 1} (sampling binarises them), images in [-1, 1]
    value_range = (0.0, 1.0) if channel == 1 else (-1.0, 1.0)
    features, indices = extract_features(subset, extractor, rank, world, batch_size=batch, channel=channel, seed=seed,
                                         device=device, value_range=value_range)
    stats = FIDStatistics()
    stats.update(features)
    stats.all_reduce()
    return gather_features(features, indices, world), stats


def embed_real(subset: Subset, split: str, extractor, identity: dict, cache_dir: str | None, rank: int, world: int,
               seed: int, batch: int, channel: int, device="cpu"):
    """Like :func:`embed`, reusing real features cached by (manifest, extractor, split, N, seed, channel).

    Rank 0 alone reads the cache and shares what it found, so ranks on nodes that see the file
    system differently (or a file written a moment ago) still agree on hit or miss."""
    from hpc_gan.eval.features import RealStatsCache
    from hpc_gan.eval.fid import FIDStatistics

    if cache_dir is None:
        return embed(subset, extractor, rank, world, seed, batch, channel, device)
    cache = RealStatsCache(cache_dir)
    key = RealStatsCache.key(subset.dataset.manifest.digest, identity["sha256"], f"{split}-n{len(subset)}-s{seed}",
                             channel)
    hit = [cache.get(key) if rank == 0 else None]
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(hit, src=0)
    if hit[0] is not None:
        log.info("real %s features from the cache %s", split, cache.path(key))
        return hit[0]["features"], FIDStatistics.from_state_dict(hit[0])
    features, stats = embed(subset, extractor, rank, world, seed, batch, channel, device)
    if rank == 0:
        cache.put(key, {"features": features, **stats.state_dict()})
    return features, stats


def evaluate(samples: str, real: str, out: str, *, real_split: str = "train", heldout_split: str = "test",
             n: int | None = None, seed: int = 0, extractor_name: str = "medicalnet_resnet10",
             weights: str | None = None, weights_sha256: str | None = None, channel: int = 0, batch: int = 4,
             rank: int = 0, world_size: int = 1, cache: str | None = None,
             agreement_steps: int = 300, data_cache=None, overwrite: bool = False) -> dict | None:
    """Compute every figure; rank 0 writes the report and returns it (other ranks return None).

    ``cache``: a directory where the real sets' features and FID statistics are kept, keyed by
    the data manifest's digest, the extractor's SHA-256, the split, N, the seed and the channel;
    and the agreement's reference segmenter, keyed by the manifest, split and training settings.
    ``agreement_steps``: training steps of that segmenter.
    ``data_cache``: :class:`~hpc_gan.data.cache.CacheSettings` of the real sets (node-local decoded
    cache, as ``data.cache``); None reads the shards.
    ``overwrite``: replace a report already in ``out`` (files of :data:`REPORT_FILES`;
    anything else there is kept).

    Raises:
        DataError: bad sample or real sets (see :func:`load_sets`), or a damaged patch (one line
            naming the shard and row).
        CheckpointError: a missing extractor weights file or one whose SHA-256 does not match.
        OutputError: ``out`` is a file, lies under one, is not writable, or already holds a
            report and ``overwrite`` is False; or the disk filled up while writing the report.
    """
    from hpc_gan.models.resnet3d import build_extractor

    check_report_dir(out, overwrite)
    for name, value in (("n", n), ("batch", batch)):
        if value is not None and value < 1:
            raise DataError(f"--{name} {value} must be at least 1")
    sets = load_sets(samples, real, real_split, heldout_split, n, seed, data_cache)
    extractor, identity = build_extractor(extractor_name, weights, seed=seed, expected_sha256=weights_sha256)
    gen_f, gen_stats = embed(sets.generated, extractor, rank, world_size, seed, batch, channel)
    real_f, real_stats = embed_real(sets.real, real_split, extractor, identity, cache, rank, world_size, seed, batch,
                                    channel)
    held = embed_real(sets.heldout, heldout_split, extractor, identity, cache, rank, world_size, seed, batch,
                      channel) if sets.heldout else None
    memorisation = audit(sets, gen_f, real_f, held, rank, world_size)  # collective: every rank
    if rank != 0:
        return None
    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "samples": str(Path(samples).resolve()), "real": str(Path(real).resolve()),
        "splits": {"real": real_split, "heldout": heldout_split if held else None},
        "n": {"generated": len(sets.generated), "real": len(sets.real),
              "heldout": len(sets.heldout) if sets.heldout else 0},
        "cache": cache, "seed": seed, "channel": "image" if channel == 0 else "label", "extractor": identity, "world_size": world_size,
        "privacy": privacy_of(sets.generated),
        "fid": {"generated_vs_real": gen_stats.fid(real_stats),
                "heldout_vs_real": held[1].fid(real_stats) if held else None},
    }
    report["prd"] = prd_figures(gen_f, real_f, held[0] if held else None, seed)
    report["nearest_neighbours"] = nn_figures(real_f, gen_f, held[0] if held else None)
    report["diversity_ms_ssim"] = diversity(sets.generated, seed)
    from hpc_gan.io import staged_directory, write_error
    from hpc_gan.eval.memorisation import closest_pairs_png

    try:
        with staged_directory(out, owned=lambda name: name in REPORT_FILES, last=("report.json",)) as stage:
            report["label_realism"] = label_figures(sets, stage)
            report["memorisation"] = memorisation
            report["agreement"] = agreement(sets, real, real_split, heldout_split if held else None, cache, seed,
                                            agreement_steps, data_cache)
            closest_pairs_png(sets.generated, sets.real, memorisation["voxel"]["near_copies"],
                              stage / "closest_pairs.png")
            write_report(report, stage)
    except OSError as exc:
        raise write_error(exc, f"the report into '{out}' (an earlier report there is unchanged)") from None
    return report


def check_report_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a report directory that cannot be written, or that holds a report and ``overwrite``
    is False (checked by every rank before any work, so all ranks stop alike).

    Raises:
        OutputError: one line naming ``out`` and the fix.
    """
    from hpc_gan.errors import OutputError
    from hpc_gan.io import check_output_path

    out = check_output_path(out, "--out")
    held = [name for name in REPORT_FILES[:2] if (out / name).exists()]
    if held and not overwrite:
        raise OutputError(f"--out '{out}' already holds a report ({held[0]}); choose another directory or pass "
                          "--overwrite to replace it")
    return out


def privacy_of(generated: Subset) -> dict | None:
    """The DP guarantee of the generator that made the samples (epsilon, delta, sigma, ... from the
    dp trainer, carried by the consolidated file into the samples' manifest), or None."""
    sampling = generated.dataset.manifest.data.get("sampling", {})
    return sampling.get("privacy") if isinstance(sampling, dict) else None


def audit(sets: EvalSets, gen_f, real_f, held, rank: int, world_size: int) -> dict:
    """Memorisation audit against the evaluated training patches, in voxel and feature space."""
    from hpc_gan.eval.memorisation import memorisation_audit_distributed

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    return memorisation_audit_distributed(sets.generated, sets.real, sets.heldout, gen_f, real_f,
                                          held[0] if held else None, device=device, rank=rank, world_size=world_size)


def prd_figures(generated: np.ndarray, real: np.ndarray, heldout: np.ndarray | None, seed: int) -> dict:
    """PRD (reference and paper presets) of generated vs real, and of held-out vs real."""
    from hpc_gan.eval.prd import prd_auc, prd_generated_vs_real, prd_to_max_f_beta_pair

    out = {}
    for name, feats in (("generated", generated), ("heldout", heldout)):
        if feats is None:
            continue
        count = min(len(feats), len(real))
        for preset in ("reference", "paper"):
            try:
                precision, recall = prd_generated_vs_real(feats[:count], real[:count], preset=preset, seed=seed)
            except ValueError as exc:  # too few samples for the clusters: reported, not fatal
                out[f"{name}_{preset}"] = {"error": str(exc)}
                continue
            f8, f1_8 = prd_to_max_f_beta_pair(precision, recall)
            out[f"{name}_{preset}"] = {"F_8": f8, "F_1/8": f1_8, "auc": prd_auc(precision, recall), "n": count,
                                       "precision": np.asarray(precision).tolist(), "recall": np.asarray(recall).tolist()}
    return out


def nn_figures(real: np.ndarray, generated: np.ndarray, heldout: np.ndarray | None, k: int | None = None) -> dict:
    """Precision/recall and density/coverage of generated (and held-out) vs real features, with the
    k of the k-NN balls (default :data:`~hpc_gan.eval.nn_metrics.DEFAULT_K`, 5) stated in the result."""
    from hpc_gan.eval.nn_metrics import DEFAULT_K, precision_recall_density_coverage

    k = DEFAULT_K if k is None else k
    out: dict = {"k": k}
    for name, feats in (("generated", generated), ("heldout", heldout)):
        if feats is None or min(len(feats), len(real)) <= k:
            continue
        out[name] = {"k": k, **precision_recall_density_coverage(real, feats, k=k)}
    return out


def agreement(sets: EvalSets, real: str, real_split: str, heldout_split: str | None, cache: str | None, seed: int,
              steps: int, data_cache=None) -> dict:
    """Label–image agreement of the generated pairs against held-out real pairs (rank 0 only: no
    collectives). Errors (e.g. fewer training patches than the segmenter's batch) are reported."""
    from hpc_gan.eval.agreement import reference_segmenter, subset_figures, summarise

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    baseline = sets.heldout if heldout_split else sets.real
    generated = Subset(sets.generated, list(range(min(len(sets.generated), AGREEMENT_SAMPLES))))
    baseline = Subset(baseline, list(range(min(len(baseline), AGREEMENT_SAMPLES))))
    try:  # e.g. fewer training patches than a batch, or a patch shape the U-Net cannot halve
        segmenter, identity = reference_segmenter(real, real_split, cache_dir=cache, seed=seed, steps=steps,
                                                  device=device, data_cache=data_cache)
        figures = summarise(*subset_figures(generated, segmenter), *subset_figures(baseline, segmenter))
    except (DataError, ValueError) as exc:
        return {"error": str(exc)}
    note = (f"held-out split {heldout_split}" if heldout_split else
            f"no held-out split: the real {real_split} subset, on which the segmenter was trained (optimistic)")
    return {**figures, "baseline": note, "n": {"generated": len(generated), "real": len(baseline)},
            "segmenter": identity}


def diversity(generated: Subset, seed: int) -> dict:
    from hpc_gan.eval.msssim import mean_pairwise_ms_ssim

    count = min(len(generated), MS_SSIM_SAMPLES)
    images = torch.stack([generated[i][:1] for i in range(count)])          # (n, 1, X, Y, Z)
    return {"mean_pairwise_ms_ssim": mean_pairwise_ms_ssim(images, pairs=100, seed=seed), "samples": count}


def label_figures(sets: EvalSets, out: Path) -> dict:
    from hpc_gan.eval.label_stats import compare_label_statistics, label_statistics, plot_label_histograms

    def labels(subset: Subset) -> np.ndarray:
        return np.stack([subset[i][1].numpy() > 0.5 for i in range(len(subset))])  # (N, X, Y, Z) bool

    real_stats = label_statistics(labels(sets.real), sets.spacing)
    gen_stats = label_statistics(labels(sets.generated), sets.spacing)
    out.mkdir(parents=True, exist_ok=True)
    plot_label_histograms(real_stats, gen_stats, out / "label_stats.png")
    return compare_label_statistics(real_stats, gen_stats)


def write_report(report: dict, out: Path) -> None:
    from hpc_gan.eval.prd import plot_prd
    from hpc_gan.io import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    curves = {name.replace("_reference", ""): (v["precision"], v["recall"]) for name, v in report["prd"].items()
              if name.endswith("_reference") and "precision" in v}
    if curves:
        plot_prd(curves, out / "prd.png", title="PRD, reference preset (generated and held-out vs real)")
    write_text_atomic(out / "report.json", json.dumps(finite_or_none(report), indent=1))
    write_text_atomic(out / "report.md", markdown(report))


def finite_or_none(value):
    """NaN (e.g. no vessel in any generated label: no radii) is not JSON: write null."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def agreement_markdown(figures: dict) -> list[str]:
    """The report's label–image agreement section."""
    lines = ["", "## Label–image agreement", "",
             "Does each generated label mark its own image's vessels? Segmenter DSC: a reference 3D U-Net trained on "
             "real training patches segments each image (threshold 0.5), scored against the patch's own label (mean "
             "per-patch DSC; both empty = 1). Label contrast: mean image intensity inside the label minus outside "
             "it, in [-1, 1] units (mean over patches with both). Ratio = generated / real.", ""]
    if "error" in figures or not figures:
        return lines + [f"Not computed: {figures.get('error', 'no figures')}"]
    seg = figures["segmenter"]
    lines += [f"Segmenter: U-Net channels {seg['channels']}, {seg['steps']} steps at batch {seg['batch']}, lr "
              f"{seg['lr']}, seed {seg['seed']}, on {seg['n_patches']} real {seg['split']} patches (cache key "
              f"{seg['key'][:16]}…{', from the cache' if seg['cached'] else ''}). Real baseline: {figures['baseline']} "
              f"({figures['n']['real']} patches; {figures['n']['generated']} generated).", "",
              "| figure | generated | real (baseline) | ratio |", "|---|---|---|---|"]
    for name, key in (("segmenter DSC", "segmenter_dice"), ("label contrast", "contrast")):
        row = figures[key]
        lines.append(f"| {name} | {_fmt(row['generated'])} | {_fmt(row['real'])} | {_fmt(row['ratio'])} |")
    return lines


def markdown(report: dict) -> str:
    """A person's view of report.json."""
    ident = report["extractor"]
    lines = [f"# Evaluation report ({report['created']})", "",
             f"- generated: `{report['samples']}` ({report['n']['generated']} patches)",
             f"- real: `{report['real']}` split {report['splits']['real']} ({report['n']['real']}), held-out split "
             f"{report['splits']['heldout']} ({report['n']['heldout']})",
             f"- extractor: {ident.get('name')} ({ident.get('weights')}, sha256 {str(ident.get('sha256'))[:16]}…), "
             f"{report['channel']} channel, seed {report['seed']}"]
    if not ident.get("comparable", False):
        lines.append(f"- **{ident.get('note', 'randomly initialised extractor: not comparable with published FIDs')}**")
    dp = report.get("privacy")
    lines.append(f"- privacy: DP-SGD critic, **epsilon = {_fmt(dp['epsilon'])} at delta = {_fmt(dp['delta'])}** "
                 f"(sigma {_fmt(dp['noise_multiplier'])}, clip {_fmt(dp['max_grad_norm'])}, sampling rate "
                 f"{_fmt(dp['sample_rate'])}, {dp['critic_steps']} critic steps, {dp['accountant']})" if dp else
                 "- privacy: no formal guarantee (the generator was not trained with differential privacy); see the "
                 "memorisation audit below")
    lines += ["", "| metric | generated vs real | held-out vs real (baseline) |", "|---|---|---|",
              f"| FID | {_fmt(report['fid']['generated_vs_real'])} | {_fmt(report['fid']['heldout_vs_real'])} |"]
    for preset in ("reference", "paper"):
        gen, held = report["prd"].get(f"generated_{preset}", {}), report["prd"].get(f"heldout_{preset}", {})
        for key in ("F_8", "F_1/8", "auc"):
            lines.append(f"| PRD {preset} {key} | {_fmt(gen.get(key))} | {_fmt(held.get(key))} |")
    nn = report["nearest_neighbours"]
    gen_nn, held_nn = nn.get("generated", {}), nn.get("heldout", {})
    for key in ("precision", "recall", "density", "coverage"):
        lines.append(f"| {key} (k={nn.get('k')}) | {_fmt(gen_nn.get(key))} | {_fmt(held_nn.get(key))} |")
    lines += ["", f"Diversity: mean pairwise 3D MS-SSIM among {report['diversity_ms_ssim']['samples']} generated "
              f"images = {_fmt(report['diversity_ms_ssim']['mean_pairwise_ms_ssim'])} (lower = more diverse).", "",
              "| label statistic | Wasserstein distance real↔generated | KS statistic |", "|---|---|---|"]
    for name, figures in report["label_realism"].items():
        lines.append(f"| {name} | {_fmt(figures.get('wasserstein'))} | {_fmt(figures.get('ks'))} |")
    lines += ["", "Memorisation audit (distance of each generated patch to its nearest training patch, against the "
              "same distance of held-out real patches):", "",
              "| space | fraction of generated below the held-out 1st percentile | near copies | "
              "median generated→train | median held-out→train |", "|---|---|---|---|---|"]
    for space in ("voxel", "feature"):
        audit_space = report["memorisation"].get(space)
        if audit_space:
            lines.append(f"| {space} | {_fmt(audit_space.get('fraction_below_heldout_p1'))} | "
                         f"{_fmt(audit_space.get('n_below'))} | {_fmt(audit_space.get('median_generated_to_train'))} | "
                         f"{_fmt(audit_space.get('median_heldout_to_train'))} |")
    lines += agreement_markdown(report.get("agreement", {}))
    lines += ["", "Pictures: `prd.png` (PRD curves), `label_stats.png` (label histograms), `closest_pairs.png` "
              "(closest generated/training pairs)."]
    return "\n".join(lines) + "\n"
