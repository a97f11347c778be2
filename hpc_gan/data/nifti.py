"""Reading, checking and writing NIfTI volumes without carrying identifying header fields.

Every check raises :class:`~hpc_gan.errors.DataError` with one line naming the file and the fix.
Written files get a fresh header holding only geometry (affine, voxel sizes, units): fields
that can identify a person in a source header (descrip, db_name, aux_file, intent_name, ...)
are never copied.

Geometry comes from one source: the affine nibabel resolves (``img.affine``: the sform when its
code is set, else the qform, else pixdim). ``pixdim`` alone is never read, because header tools
often edit one field and not the other. Every volume is reoriented to the closest canonical
orientation, RAS+ (``nib.as_closest_canonical``'s transform: axis permutations and flips only,
no resampling), so axial, sagittal and coronal acquisitions of a dataset all end up with array
axes (x, y, z) = (left→Right, posterior→Anterior, inferior→Superior); the voxel spacing is the
length of each column of the reoriented affine. The source orientation is kept as its axis codes
(``nib.aff2axcodes``, e.g. ``"LPS"`` or ``"PSR"``) for the manifest.
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
CANONICAL = "RAS"  # the orientation every loaded volume is turned into


@dataclass(frozen=True)
class Volume:
    """A checked 3D volume in RAS+ orientation: ``data`` indexed (x, y, z), its (reoriented)
    affine, its voxel size in mm along x, y, z, and the axis codes the file was stored in."""

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    path: str
    orientation: str = CANONICAL


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
    """Load one 3D NIfTI volume, check it is usable and turn it to RAS+ orientation.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        role: ``"image"``, ``"label"`` or ``"mask"``; labels and masks must hold only 0 and 1.

    Returns:
        A :class:`Volume` whose ``data`` is float32 for images and uint8 for labels and masks,
        e.g. shape (312, 384, 127), reoriented to RAS+; ``spacing`` is the voxel size along
        those axes in mm, from the affine; ``orientation`` the file's own axis codes.

    Raises:
        DataError: missing file, not NIfTI, not 3D, a degenerate affine, non-finite voxels,
            label values outside {0, 1}.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{role} file '{path}' does not exist")
    try:
        img = nib.load(str(path))
        raw = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises several types for foreign or damaged files
        raise DataError(f"{role} file '{path}' is not a readable NIfTI volume ({exc.__class__.__name__}: {exc})") from None
    if raw.ndim == 4 and raw.shape[3] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise DataError(f"{role} file '{path}' has {raw.ndim} dimensions {raw.shape}; a 3D volume is required")
    data = _typed(raw, role, path, img)
    codes = nib.aff2axcodes(affine)
    if None in codes or not np.isfinite(affine).all():
        raise DataError(f"{role} file '{path}' has a degenerate affine (axis codes {codes}, affine "
                        f"{affine[:3].tolist()}); fix its sform/qform before packing")
    data, affine = to_canonical(data, affine)
    spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    return Volume(data=data, affine=affine, spacing=spacing, path=str(path), orientation="".join(codes))


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute and flip a volume's axes to the closest RAS+ orientation (no resampling).

    The same transform as ``nib.as_closest_canonical``, applied to an array already read.

    Args:
        data: (I, J, K) array as stored.
        affine: its 4x4 voxel-to-mm matrix.

    Returns:
        (data reoriented, e.g. (K, I, J) for a sagittal file, as a contiguous array; its affine).
    """
    ornt = nib.orientations.io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return data, affine
    out = np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt))
    return out, affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)


def _scaling(img) -> str:
    """The header scaling that turned stored numbers into the values shown (nibabel keeps it on
    the data proxy once loaded; the in-memory header's copy is reset)."""
    slope, inter = (getattr(img.dataobj, "slope", None), getattr(img.dataobj, "inter", None))
    return f"header scl_slope {float(slope)!r}, scl_inter {float(inter)!r}" if slope is not None else "no header scaling"


def _typed(raw: np.ndarray, role: str, path: Path, img) -> np.ndarray:
    if not np.isfinite(raw).all():
        bad = int((~np.isfinite(raw)).sum())
        raise DataError(f"{role} file '{path}' has {bad} NaN or Inf voxels ({_scaling(img)}); "
                        "fix or remove them before packing")
    if role == "image":
        return np.asarray(raw, dtype=np.float32)
    values = np.unique(raw)  # checked before any cast: 1.0000001 must not pass as 1
    if not np.isin(values, (0, 1)).all():
        wrong = [v for v in values.tolist() if v not in (0, 1)]
        shown = ", ".join(repr(v) for v in wrong[:6])
        raise DataError(f"{role} file '{path}' holds value(s) other than 0 and 1: {shown}"
                        f"{', ...' if len(wrong) > 6 else ''} ({len(wrong)} distinct; {_scaling(img)}); "
                        f"a {role} must hold only 0 and 1")
    return raw.astype(np.uint8)


def check_same_grid(reference: Volume, other: Volume) -> None:
    """Raise DataError unless ``other`` has the shape and affine of ``reference``."""
    if reference.data.shape != other.data.shape:
        raise DataError(f"'{other.path}' has shape {other.data.shape} but '{reference.path}' has {reference.data.shape}; they must be on the same voxel grid")
    if not np.allclose(reference.affine, other.affine, atol=AFFINE_ATOL):
        worst = float(np.abs(reference.affine - other.affine).max())
        raise DataError(f"'{other.path}' and '{reference.path}' have different affines (largest difference {worst!r} "
                        f"mm, tolerance {AFFINE_ATOL!r}); resample them onto one grid before packing")


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
