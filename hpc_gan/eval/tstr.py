"""Train on synthetic, test on real: a 3D U-Net per training source, DSC and bAVD on real volumes.

    hpc_gan tstr --real data/shards --images data/phantoms/images --labels data/phantoms/labels \\
        --masks data/phantoms/masks --source real --source sn=runs/exp/sn/samples \\
        --source sn+real=runs/exp/sn/samples --out reports/tstr

Each ``--source`` trains one U-Net (soft Dice, Adam lr 1e-4, early stopping on the real
validation split) on:

* ``real``: the real training patches;
* ``NAME=DIR``: synthetic pairs, a sample directory (``hpc_gan sample --format hdf5``), or
  ``NAME=GENERATOR.pt``: a consolidated generator, sampled first (as many patches as the real
  training split holds) into ``<out>/samples_NAME``;
* ``NAME+real=...``: synthetic and real together (the paper's augmentation experiment).

Every model is then tested on the held-out real subjects (the manifest's test split), whole
volumes by sliding-window inference, threshold 0.5: DSC and bAVD (voxels and mm), for all
vessels and for intracranial vessels (brain mask applied to prediction and truth). Outputs:
``scores.csv`` (per subject), ``table.md`` (mean (std), the paper's Table 3), ``boxplots.png``
(Fig. 6), ``error_map_<source>.png`` (Fig. 7) and ``tstr.json``. Under torchrun / srun each
source's U-Net trains data-parallel (DDP) and rank 0 tests it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from hpc_gan.data.cache import CacheSettings
from hpc_gan.errors import DataError
from hpc_gan.eval.evaluate import finite_or_none

log = logging.getLogger(__name__)


@dataclass
class TstrConfig:
    """One downstream test: what ``hpc_gan tstr`` is given (its options, same names and defaults).

    Args:
        real: packed real data (train / val / test splits).
        images, labels: NIfTI directories of the real subjects (their test split is scored).
        source: one U-Net per entry, ``real`` | ``NAME=SAMPLE_DIR`` | ``NAME=GENERATOR.pt`` |
            ``NAME+real=...`` (:func:`parse_source`).
        out: output directory.
        masks: brain masks (the intracranial setting), or None.
        steps: maximum U-Net steps per source; val_every: steps between validations;
            patience: validations without improvement before stopping early.
        batch: patches per step (per rank); lr: Adam learning rate; channels: U-Net widths.
        seed: U-Net initialisation, data order and sampling of generator sources.
        data_cache: how the real splits are cached (the ``data.cache*`` fields).
    """

    real: str
    images: str
    labels: str
    source: list[str]
    out: str
    masks: str | None = None
    steps: int = 2000
    val_every: int = 100
    patience: int = 5
    batch: int = 4
    lr: float = 1e-4
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    seed: int = 0
    data_cache: CacheSettings = field(default_factory=CacheSettings)


@dataclass
class Source:
    name: str
    samples: str | None  # synthetic sample directory, or None
    with_real: bool


def parse_source(text: str) -> Source:
    """``real`` | ``NAME=DIR`` | ``NAME+real=DIR``."""
    if text == "real":
        return Source("real", None, True)
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise DataError(f"--source '{text}': use real, NAME=SAMPLE_DIR or NAME+real=SAMPLE_DIR")
    return Source(name, path, name.endswith("+real"))


def synthetic_samples(source: Source, real: str, out: Path, seed: int) -> str:
    """The sample directory of a source; a consolidated generator is sampled first."""
    if not source.samples.endswith(".pt"):
        return source.samples
    from hpc_gan.data.manifest import load_manifest
    from hpc_gan.sample import sample_to_disk

    target = out / f"samples_{source.name}"
    if not (target / "manifest.json").is_file():
        n = load_manifest(real).count("train")
        log.info("source %s: sampling %d patches from %s", source.name, n, source.samples)
        sample_to_disk(source.samples, n, target, fmt="hdf5", seed=seed, overwrite=True)
    return str(target)


def training_set(source: Source, real: str, samples: str | None, data_cache=None):
    """A source's U-Net training patches (``data_cache``: node-local cache settings, or None)."""
    from hpc_gan.data.cache import open_dataset

    parts = []
    if samples:
        parts.append(open_dataset(samples, "train", "size", data_cache))
    if source.with_real:
        parts.append(open_dataset(real, "train", "size", data_cache))
    shapes = {p.patch_shape for p in parts}
    if len(shapes) > 1:
        raise DataError(f"source {source.name}: synthetic and real patches differ in shape ({shapes})")
    return parts[0] if len(parts) == 1 else ConcatDataset(parts), parts[0].patch_shape


def split_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2, X, Y, Z) patches -> image (B, 1, ...) in [-1, 1] and label (B, 1, ...) in {0, 1}."""
    return batch[:, :1], (batch[:, 1:2] > 0.5).float()


def soft_dice_steps(net: torch.nn.Module, dataset, steps: int, *, batch: int, lr: float, seed: int, rank: int = 0,
                    world: int = 1) -> Iterator[tuple[int, torch.Tensor]]:
    """Train a segmenter of image -> label with Adam on the soft Dice loss, one step per item yielded.

    Shared by the TSTR U-Nets and the label–image agreement's reference segmenter
    (:mod:`hpc_gan.eval.agreement`). Batches come from a :class:`~hpc_gan.data.dataset.PatchLoader`
    seeded with ``seed`` (this rank's share), moved to the device of ``net``'s parameters.

    Args:
        net: ``(B, 1, X, Y, Z)`` image -> ``(B, 1, X, Y, Z)`` probability model (a DDP wrapper is fine).
        dataset: items ``(2, X, Y, Z)``: image in [-1, 1], label in {0, 1}.
        steps: optimiser steps; the caller may stop earlier.
        batch: patches per step on this rank.
        lr: Adam learning rate.
        seed: the loader's shuffling seed.
        rank: this rank; world: number of ranks.

    Yields:
        ``(step, loss)`` after each step, step counting from 1, loss the step's soft-Dice tensor.
    """
    from hpc_gan.data.dataset import PatchLoader
    from hpc_gan.models.unet import soft_dice_loss

    device = next(net.parameters()).device
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    batches = iter(PatchLoader(dataset, batch, rank, world, seed))
    net.train()
    for step in range(1, steps + 1):
        image, label = split_batch(next(batches).to(device))
        loss = soft_dice_loss(net(image), label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        yield step, loss.detach()


def train_unet(dataset, val_set, args: TstrConfig, rank: int, world: int):
    """Data-parallel U-Net training with early stopping; returns the best model (all ranks)."""
    from hpc_gan.models.unet import UNet3d

    torch.manual_seed(args.seed)
    model = UNet3d(in_channels=1, out_channels=1, channels=tuple(args.channels), dropout=0.1)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    best, best_state, since_best = float("inf"), None, 0
    for step, loss in soft_dice_steps(net, dataset, args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                                      rank=rank, world=world):
        if step % args.val_every == 0 or step == args.steps:
            val = validation_loss(model, val_set, args.batch)
            if val < best - 1e-4:
                best, since_best = val, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
            log.info("step %d: train soft-Dice %.4f, validation %.4f (best %.4f)", step, loss.item(), val, best)
            if since_best >= args.patience:
                log.info("early stop at step %d: no validation improvement for %d checks", step, args.patience)
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), best


@torch.no_grad()
def validation_loss(model, val_set, batch: int) -> float:
    from hpc_gan.models.unet import soft_dice_loss

    model.eval()
    losses = []
    for start in range(0, len(val_set), batch):
        items = torch.stack([val_set[i] for i in range(start, min(start + batch, len(val_set)))])
        image, label = split_batch(items)
        losses.append(soft_dice_loss(model(image), label).item() * len(items))
    model.train()
    return float(np.sum(losses) / max(len(val_set), 1))


def test_subjects(real: str, images: str, labels: str, masks: str | None) -> list[dict]:
    """The held-out real subjects (the manifest's test split) with their NIfTI files."""
    from hpc_gan.data.manifest import load_manifest
    from hpc_gan.data.pack import match_subjects

    ids = load_manifest(real).data["splits"].get("test", {}).get("subjects", [])
    if not ids:
        raise DataError(f"'{real}' has no test subjects; pack with a test split (--split 0.8,0.1,0.1)")
    found = {s.id: s for s in match_subjects(images, labels, masks)}
    missing = [sid for sid in ids if sid not in found]
    if missing:
        raise DataError(f"test subject(s) {', '.join(missing)} have no NIfTI files in '{images}'")
    return [found[sid] for sid in ids]


def test_model(model, subjects, patch_shape, source: str, out: Path, batch: int) -> list[dict]:
    from hpc_gan.data.nifti import load_volume
    from hpc_gan.eval.inference import predict_mask, sliding_window_predict
    from hpc_gan.eval.segmentation import error_map_png, segmentation_scores

    rows = []
    for k, subject in enumerate(subjects):
        image = load_volume(subject.image, "image")
        truth = load_volume(subject.label, "label").data.astype(bool)
        mask = load_volume(subject.mask, "mask").data.astype(bool) if subject.mask else None
        prob = sliding_window_predict(model, image.data, patch_shape=patch_shape, overlap=0.5, batch_size=batch,
                                      device=next(model.parameters()).device)
        pred = predict_mask(prob, 0.5)
        rows.append({"source": source, "subject": subject.id,
                     **segmentation_scores(pred, truth, image.spacing, brain_mask=mask)})
        if k == 0:
            error_map_png(image.data, pred, truth, out / f"error_map_{source}.png", spacing=image.spacing)
    return rows


def run_tstr(args: TstrConfig, rank: int = 0, world: int = 1) -> list[dict]:
    """Train one U-Net per source and score each on the real test subjects (all ranks call it;
    rank 0 writes the outputs listed in the module docstring).

    Args:
        args: the test's settings.
        rank, world: this process's rank and the number of ranks (data-parallel U-Net training).

    Returns:
        Per-subject score rows on rank 0 (empty on the others).

    Raises:
        DataError: a bad ``--source``, no test split, or test subjects without NIfTI files.
    """
    from hpc_gan.data.cache import open_dataset
    from hpc_gan.eval.segmentation import box_plots_png, summary_table, write_csv
    from hpc_gan.io import torch_save_atomic, write_text_atomic

    out = Path(args.out)
    data_cache = args.data_cache
    sources = [parse_source(text) for text in args.source]
    subjects = test_subjects(args.real, args.images, args.labels, args.masks)
    val_set = open_dataset(args.real, "val", "size", data_cache)
    rows: list[dict] = []
    for source in sources:
        samples = None
        if source.samples:
            if rank == 0:
                samples = synthetic_samples(source, args.real, out, args.seed)
            samples = _shared(samples, world)
        dataset, patch_shape = training_set(source, args.real, samples, data_cache)
        log.info("source %s: %d training patches", source.name, len(dataset))
        model, best = train_unet(dataset, val_set, args, rank, world)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            torch_save_atomic(model.state_dict(), out / f"unet_{source.name}.pt")
            rows += test_model(model, subjects, patch_shape, source.name, out, args.batch)
    if rank == 0:
        write_csv(rows, out / "scores.csv")
        write_text_atomic(out / "table.md", summary_table(rows))
        box_plots_png(by_source(rows), out / "boxplots.png")
        settings = dataclasses.asdict(args)
        record = {"sources": [vars(s) for s in sources], "rows": rows, "settings": settings}
        write_text_atomic(out / "tstr.json", json.dumps(finite_or_none(record), indent=1))  # inf bAVD -> null
    return rows


def _shared(value, world: int):
    """Rank 0's value on every rank."""
    if world > 1:
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def by_source(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        entry = out.setdefault(row["source"], {})
        for key, value in row.items():
            if key not in ("source", "subject"):
                entry.setdefault(key, []).append(value)
    return out
