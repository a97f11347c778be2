"""Consolidated generator file -> generated patches on disk (NIfTI or HDF5 shards) + pictures.

What a sampling run writes into its output directory::

    samples.json              provenance: generator file and SHA-256, variant, step, weights
                              ("ema" or "raw") and the EMA's decay, n, seed, threshold, format,
                              spacing and where the spacing came from
    montage.png               mid-axial slice (z = Z // 2) of up to 16 samples, image beside label
    mip.png                   axial maximum-intensity projection of sample 0: image beside label
    # --format nifti
    sample-00000_image.nii.gz float32, the generator's image channel as is, in [-1, 1]
    sample-00000_label.nii.gz uint8, the label channel binarised, exactly 0 or 1
    # --format hdf5
    train-00000.h5 ...        the training shard format (hpc_gan.data.shards), kind = 2
    manifest.json             so ``ShardedPatchDataset(out, "train")`` reads the samples

Determinism: sample ``i`` is made from its own latent, drawn by a ``torch.Generator`` seeded
with ``np.random.SeedSequence([seed, i])``. The samples therefore depend on the seed only, not
on the batch size, and the first k samples of a run of n are those of a run of k. The generator
runs in eval mode (BatchNorm uses its running statistics), so the samples of a batch do not
influence each other.

Label threshold: the label channel is mapped from tanh's [-1, 1] to [0, 1] by (x + 1) / 2 and
thresholded at the run config's ``model.label_threshold``; every shipped variant (gp, sn, sn_mp,
c_sn_mp, hr_sn_mp, xl_sn_mp, dp) uses the default 0.5, i.e. a tanh output > 0.

Voxel spacing: generated patches have no scanner geometry; they are written with the spacing of
the data the generator was trained on, read from the manifest of the run config's ``data.root``.
When that dataset is not reachable from here, a fallback spacing is used (default
(0.5, 0.5, 0.8) mm); ``samples.json`` says which.

Weights: a run trained with ``train.ema_decay > 0`` consolidates both its trained weights and
their moving average (EMA); sampling uses the average unless ``raw`` (``--raw``) asks for the
trained ones. ``samples.json`` (and an HDF5 output's manifest) record which were used.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

import hpc_gan
from hpc_gan.data.manifest import MANIFEST, build_manifest, load_manifest, utc_timestamp, write_manifest
from hpc_gan.data.nifti import save_nifti
from hpc_gan.io import check_output_path, file_sha256, staged_directory, write_error, write_json_atomic
from hpc_gan.data.phantom import mip
from hpc_gan.data.shards import compression_options, write_shard
from hpc_gan.plots import new_figure, save_png
from hpc_gan.errors import DataError, HpcGanError
from hpc_gan.models import Generator

log = logging.getLogger(__name__)

FORMATS = ("nifti", "hdf5")
DEFAULT_SPACING = (0.5, 0.5, 0.8)
DEFAULT_THRESHOLD = 0.5
GENERATED_KIND = 2  # shard ``kind`` of a generated patch (0 = grid, 1 = vessel-centred real patch)
GENERATED_SUBJECT = "generated"
MONTAGE_SAMPLES = 16
SAMPLES_JSON = "samples.json"
# Files a sampling run writes; --overwrite removes exactly these and nothing else.
_OUTPUT_PATTERNS = ("sample-*_image.nii.gz", "sample-*_label.nii.gz", "train-*.h5", MANIFEST, SAMPLES_JSON,
                    "montage.png", "mip.png")


class SampleError(HpcGanError):
    """A sampling request cannot be carried out as asked (bad count, threshold or output directory)."""


# --------------------------------------------------------------------------------------------
# Generation


def sample_seed(seed: int, index: int) -> int:
    """The 64-bit seed of sample ``index`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def generate(generator: Generator, n: int, seed: int = 0, batch: int = 8,
             device: str | torch.device = "cpu") -> Iterator[torch.Tensor]:
    """Generate ``n`` patches, ``batch`` at a time.

    Sample ``i``'s latent comes from a CPU ``torch.Generator`` seeded with
    :func:`sample_seed` ``(seed, i)``, so the output depends on ``seed`` only, not on ``batch``
    (up to floating-point rounding of batched convolutions). The generator is put in eval mode
    and moved to ``device``.

    Args:
        generator: e.g. from :func:`hpc_gan.train.consolidate.load_generator`.
        n: number of samples, >= 1.
        seed: non-negative int.
        batch: samples per forward pass, >= 1 (memory, not results).
        device: where the forward passes run, e.g. ``"cpu"`` or ``"cuda"``.

    Yields:
        float32 CPU tensors (B, 2, X, Y, Z) in [-1, 1], B = ``batch`` except possibly the last;
        channel 0 image, channel 1 label (not yet binarised).

    Raises:
        SampleError: ``n``, ``seed`` or ``batch`` out of range.

    Example:
        >>> g = Generator(8, 16, (16, 16, 16))
        >>> [b.shape for b in generate(g, 3, batch=2)]
        [torch.Size([2, 2, 16, 16, 16]), torch.Size([1, 2, 16, 16, 16])]
    """
    _check_request(n, seed, batch)
    generator.eval().to(device)
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        z = fixed_latents(generator, range(start, stop), seed, device)  # (B, latent_dim)
        with torch.inference_mode():
            yield generator(z).float().cpu()  # (B, 2, X, Y, Z)


def fixed_latents(generator: Generator, indices: Iterable[int], seed: int, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """The latents of samples ``indices`` of a run seeded with ``seed``: (len(indices), latent_dim).

    Sample ``i``'s latent depends on (seed, i) alone, so any subset of a sample set (one rank's
    share, a batch) is drawn exactly as in the whole set.
    """
    return torch.cat([generator.sample_latent(1, torch.Generator().manual_seed(sample_seed(seed, i)), device,
                                              dtype=dtype) for i in indices])


def _check_request(n: int, seed: int, batch: int) -> None:
    _check_count("n", n)
    _check_count("batch", batch)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise SampleError(f"seed must be a non-negative integer, got {seed!r}")


def _check_count(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SampleError(f"{name} must be an integer >= 1, got {value!r}")


def default_threshold(meta: dict) -> float:
    """The label threshold of a consolidated file's run config (``model.label_threshold``, 0.5)."""
    return float(meta.get("config", {}).get("model", {}).get("label_threshold", DEFAULT_THRESHOLD))


def binarise_label(label_channel: np.ndarray | torch.Tensor, threshold: float = DEFAULT_THRESHOLD):
    """Generated label channel (tanh output in [-1, 1]) -> vessel mask.

    Args:
        label_channel: any shape, e.g. (B, X, Y, Z); numpy array or torch tensor.
        threshold: in [0, 1], applied to (x + 1) / 2; a voxel is vessel when strictly above it.

    Returns:
        uint8 array (or tensor, matching the input) of the same shape holding 0 and 1.

    Raises:
        SampleError: ``threshold`` outside [0, 1].
    """
    _check_threshold(threshold)
    above = (label_channel + 1) / 2 > threshold
    return above.to(torch.uint8) if isinstance(above, torch.Tensor) else np.asarray(above, dtype=np.uint8)


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise SampleError(f"label threshold {threshold} must be in [0, 1] (it applies to the label mapped to [0, 1])")


def training_spacing(meta: dict, fallback: tuple[float, float, float] = DEFAULT_SPACING) -> tuple[tuple, dict]:
    """Voxel size of the data a generator was trained on.

    Args:
        meta: metadata from ``load_generator``; its ``config.data.root`` names the dataset (a
            relative root is taken relative to the current directory, as the training job did).
        fallback: spacing in mm used when that dataset's manifest cannot be read here.

    Returns:
        (spacing (sx, sy, sz) in mm, provenance dict: ``source`` "manifest" or "fallback",
        ``manifest`` path or None, ``manifest_matches_run`` True/False/None, ``reason``).

    Raises:
        DataError: the manifest is there but unreadable or malformed (damaged bytes, a bad
            spacing): one line naming it; the fallback is only for a dataset not reachable here.
    """
    root = meta.get("config", {}).get("data", {}).get("root")
    if root:
        try:
            manifest = load_manifest(root)
        except DataError as exc:
            if (Path(root) / MANIFEST).is_file():  # there but damaged: its spacing must not be guessed
                raise DataError(f"cannot take the voxel spacing from the training data: {exc} (or `hpc_gan inspect "
                                f"{root}`)") from None
            log.warning("training data manifest not readable here (%s); writing the fallback spacing %s mm",
                        exc, fallback)
            reason = str(exc)
        else:
            recorded = meta.get("manifest_sha256") or None
            matches = None if recorded is None else recorded == manifest.digest
            if matches is False:
                log.warning("%s has changed since the run trained on it (SHA-256 differs); using its spacing %s mm",
                            manifest.root / MANIFEST, manifest.spacing)
            return manifest.spacing, {"source": "manifest", "manifest": str(manifest.root / MANIFEST),
                                      "manifest_matches_run": matches, "reason": ""}
    else:
        reason = "the run config names no data.root"
    return tuple(float(s) for s in fallback), {"source": "fallback", "manifest": None,
                                               "manifest_matches_run": None, "reason": reason}


# --------------------------------------------------------------------------------------------
# Writers: each consumes the batches of :func:`generate` as they come (memory: one batch)


def _split_batch(batch: torch.Tensor, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(B, 2, X, Y, Z) tensor -> image (B, X, Y, Z) float32 in [-1, 1], label (B, X, Y, Z) uint8."""
    array = batch.numpy()
    return np.ascontiguousarray(array[:, 0], dtype=np.float32), binarise_label(array[:, 1], threshold)


def write_nifti(batches: Iterable[torch.Tensor], out_dir: str | os.PathLike, spacing: tuple[float, float, float],
                threshold: float = DEFAULT_THRESHOLD) -> int:
    """One image/label pair of NIfTI files per sample.

    Files ``sample-00000_image.nii.gz`` (float32, the generator's [-1, 1] scale kept, as in the
    training shards) and ``sample-00000_label.nii.gz`` (uint8, 0/1), affine ``diag(spacing)``,
    written by :func:`hpc_gan.data.nifti.save_nifti` with a fresh geometry-only header (no
    descrip, db_name, aux_file or intent_name).

    Args:
        batches: (B, 2, X, Y, Z) float tensors, e.g. from :func:`generate`.
        out_dir: existing directory.
        spacing: voxel size in mm, e.g. (0.5, 0.5, 0.8).
        threshold: label threshold, see :func:`binarise_label`.

    Returns:
        The number of samples written.
    """
    affine = np.diag([*map(float, spacing), 1.0])
    count = 0
    for batch in batches:
        images, labels = _split_batch(batch, threshold)
        for image, label in zip(images, labels):
            save_nifti(image, affine, Path(out_dir) / f"sample-{count:05d}_image.nii.gz")
            save_nifti(label, affine, Path(out_dir) / f"sample-{count:05d}_label.nii.gz")
            count += 1
    return count


def write_hdf5(batches: Iterable[torch.Tensor], out_dir: str | os.PathLike, spacing: tuple[float, float, float],
               threshold: float = DEFAULT_THRESHOLD, sampling: dict | None = None, compression: str = "lzf",
               patches_per_shard: int = 64) -> dict:
    """Shards in the training-data format plus a manifest, all samples in split ``train``.

    Each shard ``train-00000.h5`` holds ``image`` (N, X, Y, Z) float32 in [-1, 1], ``label``
    (N, X, Y, Z) uint8 0/1, ``subject`` = "generated", ``origin`` = (0, 0, 0) and ``kind`` = 2
    (generated; real patches are 0 = grid, 1 = vessel-centred). The manifest lists them under
    ``train`` so the output can be trained or evaluated on directly:
    ``ShardedPatchDataset(out_dir, "train")``.

    Args:
        batches: (B, 2, X, Y, Z) float tensors, e.g. from :func:`generate`.
        out_dir: existing directory.
        spacing: voxel size in mm recorded in the manifest.
        threshold: label threshold, see :func:`binarise_label`.
        sampling: provenance stored as the manifest's ``sampling`` entry (generator file,
            sha256, seed, n, threshold, ...).
        compression: ``lzf`` (default), ``gzip``, ``none`` or ``blosc``.
        patches_per_shard: samples per shard file, >= 1.

    Returns:
        The manifest dict (also written to ``out_dir/manifest.json``, last).
    """
    compression_options(compression)  # reject an unknown name before any work
    _check_count("patches-per-shard", patches_per_shard)
    out = Path(out_dir)
    shards: list[dict] = []
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    patch_shape = None

    def flush(items: list) -> None:
        path = out / f"train-{len(shards):05d}.h5"
        n = len(items)
        write_shard(path, {"image": np.stack([i for i, _ in items]), "label": np.stack([lab for _, lab in items]),
                           "subject": [GENERATED_SUBJECT] * n, "origin": np.zeros((n, 3), np.int32),
                           "kind": np.full(n, GENERATED_KIND, np.uint8)},
                    compression, attrs={"split": "train", "shard_index": len(shards)})
        shards.append({"file": path.name, "n": n, "bytes": path.stat().st_size, "sha256": file_sha256(path)})

    for batch in batches:
        images, labels = _split_batch(batch, threshold)
        patch_shape = list(images.shape[1:])
        pending.extend(zip(images, labels))
        while len(pending) >= patches_per_shard:
            flush(pending[:patches_per_shard])
            del pending[:patches_per_shard]
    if pending:
        flush(pending)
    manifest = _manifest(shards, patch_shape, spacing, threshold, sampling or {}, compression)
    write_manifest(out, manifest)
    return manifest


def _manifest(shards: list[dict], patch_shape, spacing, threshold: float, sampling: dict, compression: str) -> dict:
    n = sum(s["n"] for s in shards)
    return build_manifest(
        patch_shape=patch_shape, spacing=spacing, has_mask=False,
        normalisation={"image": "generator output (tanh)", "range": [-1.0, 1.0],
                       "label": f"generated label (x + 1) / 2 > {threshold}, exact {{0,1}}"},
        sampling=sampling, compression=compression,
        splits={"train": {"subjects": [GENERATED_SUBJECT], "n_patches": n, "shards": shards}}, sources={})


# --------------------------------------------------------------------------------------------
# Pictures


def _show(ax, plane: np.ndarray, spacing, vmin: float, vmax: float, title: str) -> None:
    # Transposed with origin lower: x across, y up, as seen from above (as the phantom MIPs).
    ax.imshow(plane.T, origin="lower", cmap="gray", vmin=vmin, vmax=vmax, aspect=spacing[1] / spacing[0],
              interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.set_axis_off()


def save_montage(images: np.ndarray, labels: np.ndarray, path: str | os.PathLike,
                 spacing: tuple[float, float, float] = DEFAULT_SPACING) -> None:
    """Mid-axial slices of up to 16 samples, each image beside its label (the paper's Fig. 4 view).

    Args:
        images: (N, X, Y, Z) float in [-1, 1]; only the first 16 and slice z = Z // 2 are shown.
        labels: (N, X, Y, Z) 0/1, same shape.
        path: PNG file to write.
        spacing: voxel size, for the aspect ratio.
    """
    n = min(len(images), MONTAGE_SAMPLES)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = new_figure((2.2 * 2 * cols, 2.3 * rows))
    axes = np.atleast_2d(fig.subplots(rows, 2 * cols, squeeze=False))
    for ax in axes.flat:
        ax.set_axis_off()
    z = images.shape[-1] // 2
    for i in range(n):
        row, col = divmod(i, cols)
        _show(axes[row, 2 * col], images[i, :, :, z], spacing, -1.0, 1.0, f"#{i} image, mid-axial")
        _show(axes[row, 2 * col + 1], labels[i, :, :, z], spacing, 0.0, 1.0, f"#{i} label")
    fig.tight_layout()
    save_png(fig, path)


def save_mip(image: np.ndarray, label: np.ndarray, path: str | os.PathLike,
             spacing: tuple[float, float, float] = DEFAULT_SPACING) -> None:
    """Axial maximum-intensity projection of one sample: image beside label (the vessel tree).

    Args:
        image: (X, Y, Z) float in [-1, 1].
        label: (X, Y, Z) 0/1.
        path: PNG file to write.
        spacing: voxel size, for the aspect ratio.
    """
    fig = new_figure((9, 4.8))
    ax_image, ax_label = fig.subplots(1, 2)
    _show(ax_image, mip(image), spacing, -1.0, 1.0, "axial MIP, generated image")
    _show(ax_label, mip(label), spacing, 0.0, 1.0, "axial MIP, generated vessel label")
    fig.tight_layout()
    save_png(fig, path)


class _KeepForPictures:
    """Passes batches through, keeping what the pictures need: the mid-axial slab (z = Z // 2)
    of the first 16 samples and the whole of sample 0 (not all samples: they may not fit in memory)."""

    def __init__(self, batches: Iterable[torch.Tensor]) -> None:
        self.batches = batches
        self.slabs: list[torch.Tensor] = []  # (B, 2, X, Y, 1) each
        self.first: torch.Tensor | None = None  # (2, X, Y, Z)

    def __iter__(self) -> Iterator[torch.Tensor]:
        kept = 0
        for batch in self.batches:
            if self.first is None:
                self.first = batch[0].clone()
            if kept < MONTAGE_SAMPLES:
                z = batch.shape[-1] // 2
                self.slabs.append(batch[:MONTAGE_SAMPLES - kept, :, :, :, z:z + 1].clone())
                kept += len(self.slabs[-1])
            yield batch

    def save(self, out: Path, threshold: float, spacing) -> None:
        slabs = torch.cat(self.slabs).numpy()  # (n, 2, X, Y, 1): Z // 2 of a one-slice slab is its slice
        save_montage(slabs[:, 0], binarise_label(slabs[:, 1], threshold), out / "montage.png", spacing)
        first = self.first.numpy()
        save_mip(first[0], binarise_label(first[1], threshold), out / "mip.png", spacing)


# --------------------------------------------------------------------------------------------
# The whole job


def prepare_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Check the output directory before any work: missing, empty, or (with ``overwrite``) a
    previous sampling run's, whose files are replaced only once the new samples are complete.

    Raises:
        SampleError: ``out`` is not empty and ``overwrite`` is False, or it holds a packed real
            dataset (never overwritten by samples).
        OutputError: ``out`` is a file, lies under a file or is not writable.
    """
    out = check_output_path(out, "--out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise SampleError(f"--out '{out}' is not empty; choose a new directory or pass --overwrite")
        if _holds_real_dataset(out):
            raise SampleError(f"--out '{out}' holds a packed real dataset; sample into another directory")
    return out


def _holds_real_dataset(out: Path) -> bool:
    path = out / MANIFEST
    if not path.is_file():
        return False
    try:
        sampling = json.loads(path.read_text()).get("sampling", {})
    except (json.JSONDecodeError, AttributeError):
        return True  # unknown content: do not delete around it
    return "generator" not in sampling


def _is_sample_output(name: str) -> bool:
    """Whether an entry of an output directory is a file a sampling run writes (and replaces)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in _OUTPUT_PATTERNS)


def sample_to_disk(generator_path: str | os.PathLike, n: int, out: str | os.PathLike, fmt: str = "nifti",
                   seed: int = 0, threshold: float | None = None, batch: int = 8,
                   spacing: tuple[float, float, float] = DEFAULT_SPACING, overwrite: bool = False,
                   device: str = "cpu", variant: str | None = None, progress: bool = False, raw: bool = False) -> dict:
    """Load a consolidated generator and write ``n`` samples, the pictures and ``samples.json``.

    Args:
        generator_path: file from ``hpc_gan consolidate``.
        n: number of samples, >= 1.
        out: output directory; must be empty or missing unless ``overwrite``.
        fmt: ``nifti`` or ``hdf5`` (see the module docstring for the files).
        seed: non-negative int; see :func:`generate`.
        threshold: label threshold in [0, 1]; default the run config's ``model.label_threshold``.
        batch: samples per forward pass.
        spacing: fallback voxel size in mm when the training manifest cannot be read.
        overwrite: replace a previous sampling run's files in ``out`` (other files are kept); the
            new files are written beside ``out`` and moved in only when all are complete.
        device: where the generator runs.
        variant: if given, the file must hold this variant.
        progress: show a progress bar.
        raw: use the trained weights even when the file holds their moving average (EMA).

    Returns:
        The ``samples.json`` record plus ``out``, ``montage`` and ``mip`` paths.

    Raises:
        SampleError: bad count, seed, threshold, format or output directory.
        OutputError: ``out`` cannot be written (a file, under a file, not writable, disk full).
        CheckpointError: the generator file is missing, truncated, foreign or of another variant.
    """
    from tqdm import tqdm

    from hpc_gan.models.generator_file import load_generator

    _check_request(n, seed, batch)
    if fmt not in FORMATS:
        raise SampleError(f"unknown format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    out = prepare_output(out, overwrite)
    generator, meta = load_generator(generator_path, variant, raw=raw)
    threshold_source = "--threshold" if threshold is not None else "config model.label_threshold"
    threshold = default_threshold(meta) if threshold is None else float(threshold)
    _check_threshold(threshold)
    voxel, spacing_info = training_spacing(meta, spacing)
    log.info("sampling %d patches of variant %s (step %s, %s weights), seed %d, threshold %g, %s -> %s",
             n, meta["variant"], meta["step"], meta["weights"], seed, threshold, fmt, out)
    record = {"generator": str(generator_path), "generator_sha256": file_sha256(generator_path),
              "variant": meta["variant"], "step": meta["step"], "weights": meta["weights"],
              "ema_decay": meta["ema"]["decay"] if meta["ema"] else None, "n": n, "seed": seed,
              "latents": "sample i: torch.Generator seeded by np.random.SeedSequence([seed, i])",
              "threshold": threshold, "threshold_source": threshold_source, "format": fmt,
              "spacing": [float(s) for s in voxel], "spacing_source": spacing_info,
              "image_range": [-1.0, 1.0], "privacy": meta.get("privacy"), "tool_version": hpc_gan.__version__,
              "created": utc_timestamp()}
    batches = tqdm(generate(generator, n, seed, batch, device), total=-(-n // batch), unit="batch",
                   desc="sampling", disable=not progress)
    keep = _KeepForPictures(batches)
    try:  # built beside out, moved in when complete: a failed run leaves a previous one intact
        with staged_directory(out, owned=_is_sample_output, last=(MANIFEST, SAMPLES_JSON)) as stage:
            if fmt == "nifti":
                write_nifti(keep, stage, voxel, threshold)
            else:
                sampling = {k: record[k] for k in ("generator", "generator_sha256", "variant", "step", "weights",
                                                   "seed", "n", "threshold", "privacy")}
                sampling["sha256"] = sampling.pop("generator_sha256")
                write_hdf5(keep, stage, voxel, threshold, sampling)
            keep.save(stage, threshold, voxel)
            write_json_atomic(stage / SAMPLES_JSON, record)
    except OSError as exc:
        raise write_error(exc, f"samples into '{out}' (anything there before is unchanged)") from None
    return {**record, "out": str(out), "montage": str(out / "montage.png"), "mip": str(out / "mip.png")}
