"""Reading, checking and writing NIfTI volumes without carrying identifying header fields.

Every check raises :class:`~hpc_gan.errors.DataError` with one line naming the file and the fix.
Written files get a fresh header holding only geometry (affine, voxel sizes, units): fields
that can identify a person in a source header (descrip, db_name, aux_file, intent_name, ...)
are never copied.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from hpc_gan.errors import DataError
from hpc_gan.io import write_bytes_atomic

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Suffixes that name the role of a file rather than the subject: sub-001_label.nii.gz -> sub-001.
_ROLE_SUFFIX = re.compile(r"[_-](img|image|tof|mra|angio|label|labels|seg|vessels?|mask|brainmask|brain_mask)$", re.I)
AFFINE_ATOL = 1e-3  # mm; scanners write affines with float32 rounding


@dataclass(frozen=True)
class Volume:
    """A checked 3D volume: ``data`` indexed (x, y, z) as stored, its affine and voxel size in mm."""

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    path: str


def subject_id(path: str | os.PathLike) -> str:
    """Subject id of a NIfTI file name: the name without extension and without a role suffix.

    Example:
        >>> subject_id("labels/sub-007_seg.nii.gz")
        'sub-007'
    """
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _ROLE_SUFFIX.sub("", name)


def list_nifti(directory: str | os.PathLike, role: str) -> dict[str, Path]:
    """Map subject id -> file for every NIfTI file in ``directory``.

    Raises:
        DataError: the directory is missing, holds no NIfTI file, or two files map to one id.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{role} directory '{directory}' does not exist; pass the folder holding the {role} .nii.gz files")
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if not path.name.endswith(NIFTI_SUFFIXES):
            continue
        sid = subject_id(path)
        if sid in found:
            raise DataError(f"{role}: '{found[sid].name}' and '{path.name}' both map to subject id '{sid}'; rename one")
        found[sid] = path
    if not found:
        raise DataError(f"{role} directory '{directory}' holds no .nii or .nii.gz file")
    return found


def load_volume(path: str | os.PathLike, role: str = "image") -> Volume:
    """Load one 3D NIfTI volume and check it is usable.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        role: ``"image"``, ``"label"`` or ``"mask"``; labels and masks must hold only 0 and 1.

    Returns:
        A :class:`Volume` whose ``data`` is float32 for images and uint8 for labels and masks,
        e.g. shape (312, 384, 127).

    Raises:
        DataError: missing file, not NIfTI, not 3D, non-finite voxels, label values outside {0, 1}.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{role} file '{path}' does not exist")
    try:
        img = nib.load(str(path))
        raw = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises several types for foreign or damaged files
        raise DataError(f"{role} file '{path}' is not a readable NIfTI volume ({exc.__class__.__name__}: {exc})") from None
    if raw.ndim == 4 and raw.shape[3] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise DataError(f"{role} file '{path}' has {raw.ndim} dimensions {raw.shape}; a 3D volume is required")
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    data = _typed(raw, role, path)
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), spacing=spacing, path=str(path))


def _typed(raw: np.ndarray, role: str, path: Path) -> np.ndarray:
    data = np.asarray(raw, dtype=np.float32)
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise DataError(f"{role} file '{path}' has {bad} NaN or Inf voxels; fix or remove them before packing")
    if role == "image":
        return data
    values = np.unique(data)
    if not np.isin(values, (0.0, 1.0)).all():
        shown = ", ".join(f"{v:g}" for v in values[:6])
        raise DataError(f"{role} file '{path}' holds values {{{shown}{', ...' if len(values) > 6 else ''}}}; a {role} must hold only 0 and 1")
    return data.astype(np.uint8)


def check_same_grid(reference: Volume, other: Volume) -> None:
    """Raise DataError unless ``other`` has the shape and affine of ``reference``."""
    if reference.data.shape != other.data.shape:
        raise DataError(f"'{other.path}' has shape {other.data.shape} but '{reference.path}' has {reference.data.shape}; they must be on the same voxel grid")
    if not np.allclose(reference.affine, other.affine, atol=AFFINE_ATOL):
        raise DataError(f"'{other.path}' and '{reference.path}' have different affines; resample them onto one grid before packing")


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, is_label: bool = False) -> None:
    """Write a volume with a fresh, geometry-only header (nothing identifying), atomically.

    The bytes depend only on the arguments (gzip mtime 0), so the same volume gives the same file.

    Args:
        array: (x, y, z) data; its dtype is kept.
        affine: 4x4 voxel-to-mm matrix, stored as both qform and sform (code 1, scanner).
        path: destination ``.nii.gz``; written to a temporary name first, then renamed.
        is_label: mark the file's intent as a label map.
    """
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if is_label:
        img.header.set_intent("label")
    write_bytes_atomic(path, gzip.compress(img.to_bytes(), compresslevel=4, mtime=0))
