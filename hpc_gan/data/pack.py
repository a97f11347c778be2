"""NIfTI volumes -> sharded HDF5 patches + manifest.json.

Two passes, both parallel over processes:

1. per subject: load and check image, label and optional mask, plan the patch corners, hash the
   source files. Every input error surfaces here, before any shard is written.
2. per shard: extract, normalise and write its patches (temporary name, then rename).

The shards and the manifest are written into a staging directory beside the output
(:func:`hpc_gan.io.staged_directory`) and moved into place only when all are complete, manifest
last, so a directory holding a manifest is complete. An existing dataset is never touched unless
``overwrite=True``, and even then a pack that fails (a bad subject, a full disk, Ctrl-C) leaves
it exactly as it was. Every volume is reoriented to RAS+ and its spacing taken from its affine
(:func:`hpc_gan.data.nifti.load_volume`); the manifest records both.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hpc_gan.data import manifest as mf
from hpc_gan.data.nifti import CANONICAL, check_same_grid, list_nifti, load_volume
from hpc_gan.io import check_output_path, file_sha256, staged_directory, write_error
from hpc_gan.data.patches import SamplingPlan, extract, minmax_normalise, plan_origins
from hpc_gan.data.shards import compression_options, write_shard
from hpc_gan.errors import DataError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Subject:
    id: str
    image: Path
    label: Path
    mask: Path | None = None


@dataclass(frozen=True)
class _Planned:
    subject: Subject
    index: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origins: np.ndarray
    hashes: dict
    vessel_fraction: float
    orientation: str = CANONICAL  # the source file's axis codes, before reorientation


def match_subjects(images: str | os.PathLike, labels: str | os.PathLike,
                   masks: str | os.PathLike | None = None) -> list[Subject]:
    """Pair image, label and mask files by subject id (file name without role suffix).

    Raises:
        DataError: a directory is missing or empty, a subject lacks its label or mask, or a file
            name is not valid UTF-8 (ids are stored as UTF-8; ``sub-ä01`` is fine).
    """
    found_images = list_nifti(images, "image")
    for sid, path in found_images.items():
        try:
            sid.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes in a file name arrive as lone surrogates
            raise DataError(f"image file name {str(path)!r} is not valid UTF-8; rename it (subject ids are stored "
                            "as UTF-8)") from None
    found_labels = list_nifti(labels, "label")
    found_masks = list_nifti(masks, "mask") if masks else {}
    for sid in found_images:
        if sid not in found_labels:
            raise DataError(f"subject '{sid}' has an image but no label in '{labels}'")
        if masks and sid not in found_masks:
            raise DataError(f"subject '{sid}' has an image but no brain mask in '{masks}'")
    orphans = sorted(set(found_labels) - set(found_images))
    if orphans:
        raise DataError(f"label(s) without an image: {', '.join(orphans[:5])}; add the images or remove the labels")
    return [Subject(sid, found_images[sid], found_labels[sid], found_masks.get(sid)) for sid in sorted(found_images)]


def assign_splits(ids: list[str], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0,
                  explicit: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Split subject ids into train / val / test, each subject in exactly one split.

    Args:
        ids: subject ids.
        fractions: shares of train, val, test (summing to 1); used when ``explicit`` is None.
        seed: shuffles the ids before splitting.
        explicit: a given assignment, e.g. read from a JSON split file.

    Raises:
        DataError: a subject appears in two splits, an explicit split names an unknown subject,
            or the fractions are invalid.
    """
    if explicit is not None:
        return _check_explicit(ids, explicit)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split fractions {fractions} must be three non-negative numbers summing to 1, e.g. 0.8,0.1,0.1")
    order = list(np.random.default_rng(seed).permutation(sorted(ids)))
    n_val = int(round(fractions[1] * len(order)))
    n_test = int(round(fractions[2] * len(order)))
    n_train = len(order) - n_val - n_test
    if fractions[0] > 0 and n_train < 1:
        raise DataError(f"{len(order)} subject(s) are too few for split fractions {fractions}; add subjects or change --split")
    return {"train": sorted(order[:n_train]), "val": sorted(order[n_train:n_train + n_val]),
            "test": sorted(order[n_train + n_val:])}


def _check_explicit(ids: list[str], explicit: dict[str, list[str]]) -> dict[str, list[str]]:
    owner: dict[str, str] = {}
    for split, members in explicit.items():
        if split not in SPLITS:
            raise DataError(f"split file names split '{split}'; valid splits: {', '.join(SPLITS)}")
        for sid in members:
            if sid in owner:
                raise DataError(f"subject '{sid}' is in both '{owner[sid]}' and '{split}'; a subject may be in one split only")
            if sid not in ids:
                raise DataError(f"split file names subject '{sid}', which has no image; known: {', '.join(sorted(ids)[:5])}, ...")
            owner[sid] = split
    return {split: sorted(explicit.get(split, [])) for split in SPLITS}


def pack(subjects: list[Subject], splits: dict[str, list[str]], out_dir: str | os.PathLike,
         plan: SamplingPlan = SamplingPlan(), compression: str = "lzf", patches_per_shard: int = 64,
         workers: int = 1, overwrite: bool = False, progress: bool = True) -> dict:
    """Pack subjects into shards and write the manifest.

    Args:
        subjects: from :func:`match_subjects`.
        splits: from :func:`assign_splits`.
        out_dir: output directory; created if needed.
        plan: patch shape, grid, vessel patches per subject, seed.
        compression: ``lzf`` (default), ``gzip``, ``none`` or ``blosc``.
        patches_per_shard: patches in each shard file (the last one of a split may hold fewer).
        workers: processes for both passes.
        overwrite: replace an existing dataset in ``out_dir``.

    Returns:
        The manifest as a dict (also written to ``out_dir/manifest.json``).

    Raises:
        DataError: any input problem, or ``out_dir`` already holds a dataset and ``overwrite`` is False.
        OutputError: ``out_dir`` cannot be written (a file, under a file, not writable), or the
            disk filled up; the previous dataset, if any, is left as it was.
    """
    compression_options(compression)  # reject an unknown name before any work
    if patches_per_shard < 1:
        raise DataError(f"patches per shard must be >= 1, got {patches_per_shard}")
    out = check_output_path(out_dir, "--out")
    existing = _existing_dataset(out)
    if existing and not overwrite:
        raise DataError(f"'{out}' already holds a dataset ({existing}); choose another directory or pass --overwrite")
    by_id = {s.id: s for s in subjects}
    order = [sid for split in SPLITS for sid in splits.get(split, [])]
    planned = _run(_plan_subject, [(by_id[sid], i, plan) for i, sid in enumerate(order)], workers, progress, "checking")
    try:
        with staged_directory(out, owned=_is_dataset_entry, last=(mf.MANIFEST,)) as stage:
            jobs = _shard_jobs(planned, splits, stage, plan, compression, patches_per_shard)
            written = {path.name: info for path, info in _run(_write_one_shard, jobs, workers, progress, "writing")}
            manifest = _manifest(planned, splits, jobs, written, plan, compression)
            mf.write_manifest(stage, manifest)
    except OSError as exc:
        kept = "the previous dataset there is unchanged" if existing else "nothing was left there"
        raise write_error(exc, f"the dataset '{out}' ({kept})") from None
    except BrokenProcessPool:
        raise DataError(f"a process writing shards of '{out}' died (out of memory, or a crash in HDF5 on a full "
                        "disk); nothing changed there; run again with --workers 1 to see its error") from None
    return manifest


def _is_dataset_entry(name: str) -> bool:
    """What a previous pack wrote into a directory (and ``--overwrite`` replaces)."""
    return name.endswith(".h5") or name == mf.MANIFEST


def _existing_dataset(out: Path) -> str:
    if (out / mf.MANIFEST).exists():
        return mf.MANIFEST
    shards = _shard_files(out)
    return f"{len(shards)} shard file(s)" if shards else ""


def _shard_files(out: Path) -> list[Path]:
    return sorted(out.glob("*.h5")) if out.is_dir() else []


def _run(fn, jobs: list, workers: int, progress: bool, what: str) -> list:
    bar = tqdm(total=len(jobs), desc=what, unit="shard" if what == "writing" else "subject", disable=not progress)
    try:
        if workers <= 1 or len(jobs) <= 1:
            results = []
            for job in jobs:
                results.append(fn(*job))
                bar.update()
            return results
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(fn, *job) for job in jobs]
            for future in futures:
                future.add_done_callback(lambda _: bar.update())
            return [f.result() for f in futures]
    finally:
        bar.close()


def _plan_subject(subject: Subject, index: int, plan: SamplingPlan) -> _Planned:
    image = load_volume(subject.image, "image")
    label = load_volume(subject.label, "label")
    check_same_grid(image, label)
    hashes = {"image_sha256": file_sha256(subject.image), "label_sha256": file_sha256(subject.label)}
    if subject.mask is not None:
        check_same_grid(image, load_volume(subject.mask, "mask"))
        hashes["mask_sha256"] = file_sha256(subject.mask)
    origins = plan_origins(label.data, plan, index, subject.id)
    return _Planned(subject, index, image.data.shape, image.spacing, origins, hashes, float(label.data.mean()),
                    image.orientation)


def _shard_jobs(planned: list[_Planned], splits, out: Path, plan, compression, per_shard) -> list[tuple]:
    """Cut each split's patch list (ordered by subject) into consecutive shards."""
    by_id = {p.subject.id: p for p in planned}
    jobs = []
    for split in SPLITS:
        items = [(by_id[sid], k) for sid in splits.get(split, []) for k in range(len(by_id[sid].origins))]
        for shard_index, start in enumerate(range(0, len(items), per_shard)):
            path = out / f"{split}-{shard_index:05d}.h5"
            jobs.append((path, split, shard_index, items[start:start + per_shard], plan, compression))
    return jobs


def _write_one_shard(path: Path, split: str, shard_index: int, items: list, plan: SamplingPlan,
                     compression: str) -> tuple[Path, dict]:
    arrays: dict[str, list] = {"image": [], "label": [], "subject": [], "origin": [], "kind": []}
    has_mask = items[0][0].subject.mask is not None
    if has_mask:
        arrays["mask"] = []
    loaded: dict[str, tuple] = {}
    n_grid = int(np.prod(plan.grid))
    for planned, k in items:
        sid = planned.subject.id
        if sid not in loaded:
            loaded.clear()  # items are grouped by subject: keep one subject's volumes in memory
            loaded[sid] = _load_arrays(planned.subject)
        volumes, origin = loaded[sid], planned.origins[k]
        arrays["image"].append(minmax_normalise(extract(volumes[0], origin, plan.patch_shape)))
        arrays["label"].append(extract(volumes[1], origin, plan.patch_shape))
        if has_mask:
            arrays["mask"].append(extract(volumes[2], origin, plan.patch_shape))
        arrays["subject"].append(sid)
        arrays["origin"].append(origin)
        arrays["kind"].append(0 if k < n_grid else 1)
    stacked = {key: np.stack(value) if key in ("image", "label", "mask", "origin") else value
               for key, value in arrays.items()}
    write_shard(path, stacked, compression, attrs={"split": split, "shard_index": shard_index})
    return path, {"file": path.name, "n": len(items), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _load_arrays(subject: Subject) -> tuple:
    arrays = [load_volume(subject.image, "image").data, load_volume(subject.label, "label").data]
    if subject.mask is not None:
        arrays.append(load_volume(subject.mask, "mask").data)
    return tuple(arrays)


def _manifest(planned: list[_Planned], splits, jobs, written, plan: SamplingPlan, compression: str) -> dict:
    spacings = np.array([p.spacing for p in planned])
    spacing = np.median(spacings, axis=0)
    if np.abs(spacings - spacing).max() > 0.01 * spacing.min():
        log.warning("subjects have different voxel spacings (%s .. %s); the manifest records the median",
                    spacings.min(axis=0), spacings.max(axis=0))
    split_entries = {}
    for split in SPLITS:
        shards = [written[job[0].name] for job in jobs if job[1] == split]
        split_entries[split] = {"subjects": splits.get(split, []), "n_patches": sum(s["n"] for s in shards),
                                "shards": shards}
    return mf.build_manifest(
        patch_shape=plan.patch_shape, spacing=spacing, has_mask=any(p.subject.mask is not None for p in planned),
        orientation=CANONICAL,
        normalisation={"image": "minmax per patch", "range": [-1.0, 1.0], "label": "exact {0,1}"},
        sampling=plan.to_dict(), compression=compression, splits=split_entries,
        sources={p.subject.id: {"shape": list(p.shape), "spacing": [round(float(s), 6) for s in p.spacing],
                                "orientation": p.orientation,
                                "n_patches": int(len(p.origins)), "vessel_fraction": round(p.vessel_fraction, 6),
                                **p.hashes} for p in planned})


def read_split_file(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a JSON split file ``{"train": [...], "val": [...], "test": [...]}``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file '{path}' does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"split file '{path}' is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DataError(f"split file '{path}' must map split names to lists of subject ids")
    return data
