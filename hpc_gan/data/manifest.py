"""``manifest.json``: what a shard directory holds, and the checks a job runs before reading it.

The manifest is written last, atomically, by the packer; a directory without one is not a
dataset. It records the format version, patch shape, voxel spacing and orientation (every patch is in
RAS+ orientation since the packer reorients its sources; ``orientation`` says so), splits with per-shard counts and
SHA-256, source-file hashes, normalisation, sampling parameters and seed, and the tool version.
No NIfTI header field is copied into it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import hpc_gan
from hpc_gan.data.shards import FORMAT_VERSION, READABLE_VERSIONS, open_shard
from hpc_gan.io import file_sha256, write_text_atomic
from hpc_gan.errors import DataError

MANIFEST = "manifest.json"
REQUIRED_KEYS = ("format_version", "patch_shape", "spacing", "splits", "sampling", "normalisation", "compression")
VERIFY_MODES = ("full", "size", "none")


@dataclass(frozen=True)
class ShardInfo:
    file: str
    n: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A loaded, validated manifest. ``digest`` is the SHA-256 of the manifest file itself."""

    root: Path
    data: dict
    digest: str

    @property
    def patch_shape(self) -> tuple[int, int, int]:
        return tuple(self.data["patch_shape"])

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.data["spacing"])

    @property
    def has_mask(self) -> bool:
        return bool(self.data.get("has_mask", False))

    def splits(self) -> list[str]:
        return list(self.data["splits"])

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.data["splits"]:
            raise DataError(f"split '{split}' is not in {self.root / MANIFEST}; available: {', '.join(self.splits())}")
        return [ShardInfo(**s) for s in self.data["splits"][split]["shards"]]

    def count(self, split: str) -> int:
        return sum(s.n for s in self.shards(split))


CHANNELS = ["image", "label"]


def utc_timestamp() -> str:
    """Now, in UTC, to the second (ISO 8601): the ``created`` field of what the tool writes."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def build_manifest(*, patch_shape, spacing, has_mask: bool, normalisation: dict, sampling: dict, compression: str,
                   splits: dict, sources: dict, orientation: str | None = None) -> dict:
    """The manifest of a shard directory, for packed real patches (``hpc_gan pack``) and generated
    ones (``hpc_gan sample --format hdf5``) alike: format, versions and creation time filled in.

    Args:
        patch_shape: (X, Y, Z) voxels of every patch.
        spacing: (sx, sy, sz) voxel size in mm (stored rounded to 6 decimals).
        has_mask: whether the shards carry brain masks.
        normalisation: how image and label values were made.
        sampling: how the patches were chosen (a :class:`~hpc_gan.data.patches.SamplingPlan`'s
            dict, or the generator's provenance).
        compression: the shards' HDF5 compression.
        splits: ``{split: {"subjects": [...], "n_patches": n, "shards": [...]}}``.
        sources: per source volume: shape, spacing, hashes ({} for generated patches).
        orientation: the patches' axis codes (e.g. ``RAS``) when they come from oriented volumes;
            omitted otherwise.

    Returns:
        The dict :func:`write_manifest` writes (key order as in the file).
    """
    data = {"format": "hpc_gan.shards", "format_version": FORMAT_VERSION, "tool_version": hpc_gan.__version__,
            "created": utc_timestamp(), "patch_shape": list(patch_shape), "channels": list(CHANNELS),
            "has_mask": has_mask, "spacing": [round(float(s), 6) for s in spacing]}
    if orientation is not None:
        data["orientation"] = orientation
    data.update({"normalisation": normalisation, "sampling": sampling, "compression": compression, "splits": splits,
                 "sources": sources})
    return data


def write_manifest(root: str | os.PathLike, data: dict) -> Path:
    """Write ``manifest.json`` atomically; returns its path."""
    return write_text_atomic(Path(root) / MANIFEST, json.dumps(data, indent=2, sort_keys=False) + "\n")


def load_manifest(root: str | os.PathLike) -> Manifest:
    """Read and validate the manifest of a shard directory.

    Raises:
        DataError: the directory or manifest is missing, not JSON, of another format version,
            or lacks a required key; or a patient id appears in two splits.
    """
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise DataError(f"data directory '{root}' does not exist; pack volumes first (data_prep/pack.py) or fix data.root")
    if not path.is_file():
        raise DataError(f"'{root}' has no {MANIFEST}: it is not a packed dataset (or packing did not finish); run data_prep/pack.py")
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or exc}); check the file system or re-run the packing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # damaged bytes may not even be UTF-8
        raise DataError(f"{path} is not valid JSON ({exc.__class__.__name__}: {exc}); re-run the packing") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is malformed: expected a JSON object; re-run the packing")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise DataError(f"{path} is malformed: missing {', '.join(missing)}; re-run the packing")
    if data["format_version"] not in READABLE_VERSIONS:
        raise DataError(f"{path} has format version {data['format_version']!r}, this tool reads "
                        f"{', '.join(map(str, READABLE_VERSIONS))}; re-pack with this version")
    _check_geometry(data, path)
    manifest = Manifest(root=root, data=data, digest=hashlib.sha256(raw).hexdigest())
    _check_structure(manifest, path)
    return manifest


def _check_geometry(data: dict, path: Path) -> None:
    """Patch shape: three positive integers; spacing: three positive finite numbers (mm)."""
    shape, spacing = data["patch_shape"], data["spacing"]
    if not (isinstance(shape, list) and len(shape) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        raise DataError(f"{path} is malformed: patch_shape {shape!r} is not three positive integers; re-run the packing")
    if not (isinstance(spacing, list) and len(spacing) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                    for v in spacing)):
        raise DataError(f"{path} is malformed: spacing {spacing!r} is not three positive numbers in mm; "
                        "re-run the packing")


def _check_structure(manifest: Manifest, path: Path) -> None:
    owner: dict[str, str] = {}
    for split, entry in manifest.data["splits"].items():
        try:
            shards = manifest.shards(split)
            subjects = list(entry["subjects"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{path} is malformed: split '{split}' lacks {exc}; re-run the packing") from None
        if sum(s.n for s in shards) != entry.get("n_patches", -1):
            raise DataError(f"{path} is malformed: split '{split}' shard counts do not add up to n_patches")
        for subject in subjects:
            if subject in owner:
                raise DataError(f"{path}: subject '{subject}' is in both '{owner[subject]}' and '{split}'; "
                                "a subject may be in one split only")
            owner[subject] = split


def verify_shards(manifest: Manifest, split: str, mode: str = "full") -> None:
    """Check that every shard of a split is present and unchanged.

    Args:
        mode: ``full`` compares SHA-256 (reads every byte), ``size`` only file sizes, ``none``
            nothing. ``full`` and ``size`` also open each shard and check it holds the patch
            datasets with at least the rows the manifest lists (a manifest that claims more
            patches than a shard holds has the right checksums and would fail only mid-run).

    Raises:
        DataError: a shard is missing, its size or checksum differs from the manifest, or it
            lacks a dataset or rows.
    """
    if mode not in VERIFY_MODES:
        raise DataError(f"unknown verify mode '{mode}'; choose one of: {', '.join(VERIFY_MODES)}")
    if mode == "none":
        return
    for shard in manifest.shards(split):
        path = manifest.root / shard.file
        if not path.is_file():
            raise DataError(f"shard '{path}' listed in the manifest is missing; restore it or re-run the packing")
        size = path.stat().st_size
        if size != shard.bytes:
            raise DataError(f"shard '{path}' has {size} bytes, the manifest says {shard.bytes}: "
                            "the file is truncated or was replaced; re-run the packing")
        if mode == "full" and file_sha256(path) != shard.sha256:
            raise DataError(f"shard '{path}' checksum does not match the manifest: the file is damaged "
                            "or was changed; restore it or re-run the packing")
        open_shard(path, shard.n, ("image", "label", "mask") if manifest.has_mask else ("image", "label")).close()
