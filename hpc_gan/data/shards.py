"""One HDF5 shard file: a few hundred patches, one patch per chunk.

Layout of ``<split>-<index>.h5`` (N patches of shape (X, Y, Z)):

=========== ============== ======= =========================================================
dataset     shape          dtype   meaning
=========== ============== ======= =========================================================
``image``   (N, X, Y, Z)   float32 image patch min-max scaled to [-1, 1]
``label``   (N, X, Y, Z)   uint8   vessel label, exactly 0 or 1
``mask``    (N, X, Y, Z)   uint8   brain mask (only when masks were given)
``subject`` (N,)           str     subject id of each patch (UTF-8; ASCII bytes in version 1)
``origin``  (N, 3)         int32   patch corner in the source volume (may be negative: padding)
``kind``    (N,)           uint8   0 = grid patch, 1 = vessel-centred patch
=========== ============== ======= =========================================================

Files are written under a temporary name and renamed when complete, so a shard with its final
name is always whole. Readers open files read-only with HDF5 file locking off (cluster file
systems often do not support it).

Damage is found when it is read, whatever the manifest verification mode: since format version 2
every patch chunk carries HDF5's Fletcher-32 checksum (``fletcher32=True``), so a flipped byte
fails the read of that patch (as a checksum error, or as a decompression error when the filter
before it trips first). :func:`read_patch` turns such errors, rows beyond the file's end, a
missing dataset and values outside a patch's range (NaN, Inf, |image| > 1, a label not 0/1) into
one line naming the shard and the row. Version 1 shards (no checksums, ASCII subject ids) are
still read; their damage is caught by the value checks and by ``hpc_gan inspect``.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from hpc_gan.errors import DataError
from hpc_gan.io import atomic_path

FORMAT_VERSION = 2  # 2: Fletcher-32 per patch chunk, UTF-8 subject ids
READABLE_VERSIONS = (1, 2)
IMAGE_RANGE_SLACK = 1e-3  # float rounding of min-max scaling and of tanh outputs
COMPRESSIONS = ("lzf", "gzip", "none", "blosc")
PATCH_DATASETS = ("image", "label", "mask")


def compression_options(name: str) -> dict:
    """h5py ``create_dataset`` keyword arguments of a compression name."""
    if name == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if name == "none":
        return {}
    if name == "blosc":
        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    raise DataError(f"unknown compression '{name}'; choose one of: {', '.join(COMPRESSIONS)}")


def write_shard(path: str | os.PathLike, arrays: dict[str, np.ndarray], compression: str = "lzf",
                attrs: dict | None = None) -> None:
    """Write one shard atomically.

    Args:
        path: final file name, e.g. ``shards/train-00000.h5``.
        arrays: ``image`` (N, X, Y, Z) float32, ``label`` uint8, optional ``mask`` uint8, and
            ``subject`` (N,) str, ``origin`` (N, 3) int, ``kind`` (N,) int.
        compression: one of :data:`COMPRESSIONS`.
        attrs: extra file attributes (e.g. split and shard index).
    """
    options = compression_options(compression)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", locking=False) as f:
            f.attrs["format_version"] = FORMAT_VERSION
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
            for name in PATCH_DATASETS:
                if name in arrays:
                    data = arrays[name]
                    f.create_dataset(name, data=data, chunks=(1,) + data.shape[1:], fletcher32=True, **options)
            f.create_dataset("subject", data=[str(s) for s in arrays["subject"]], dtype=h5py.string_dtype("utf-8"))
            f.create_dataset("origin", data=np.asarray(arrays["origin"], dtype=np.int32))
            f.create_dataset("kind", data=np.asarray(arrays["kind"], dtype=np.uint8))


def inspect_advice(path: str | os.PathLike) -> str:
    """What to do about a damaged shard."""
    return f"run `hpc_gan inspect {Path(path).parent}`, then restore the shard or re-run the packing"


def open_shard(path: str | os.PathLike, rows: int | None = None, names: tuple[str, ...] = ()) -> h5py.File:
    """Open a shard read-only without HDF5 file locking and check its structure.

    Args:
        path: the shard file.
        rows: the number of patches the manifest says it holds; the file must hold at least that.
        names: patch datasets that must be present, e.g. ``("image", "label")``.

    Raises:
        DataError: the file is not HDF5, lacks a dataset, or holds fewer rows than the manifest
            says; one line naming the shard and suggesting ``hpc_gan inspect``.
    """
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise DataError(f"shard '{path}' cannot be opened as HDF5 ({exc}); {inspect_advice(path)}") from None
    for name in names:
        if not isinstance(f.get(name), h5py.Dataset):
            f.close()
            raise DataError(f"shard '{path}' has no '{name}' dataset; it is not a complete hpc_gan shard: "
                            "restore it or re-run the packing")
        if rows is not None and f[name].shape[0] < rows:
            held = f[name].shape[0]
            f.close()
            raise DataError(f"shard '{path}' holds {held} '{name}' rows but the manifest lists {rows}; "
                            f"{inspect_advice(path)}")
    return f


def read_patch(f: h5py.File, row: int, out: np.ndarray, names: tuple[str, ...] = ("image", "label")) -> np.ndarray:
    """Read one patch of an open shard into ``out`` and check its values.

    Args:
        f: from :func:`open_shard`.
        row: the patch's row in the shard.
        out: float32 array (len(names), X, Y, Z) filled in place: channel 0 the image, then the
            uint8 datasets converted to float.
        names: the datasets read, image first.

    Returns:
        ``out``.

    Raises:
        DataError: the read failed (a Fletcher-32 checksum or a decompression error: the chunk
            is damaged), or the values are impossible for a patch (NaN, Inf, an image beyond
            [-1, 1], a label or mask not 0/1); one line naming the shard and row.
    """
    where = f"shard '{f.filename}' row {row}"
    advice = inspect_advice(f.filename)
    try:
        f[names[0]].read_direct(out[0], np.s_[row])  # decode straight into the output, no copy
        for channel, name in enumerate(names[1:], start=1):
            binary = f[name][row]
            if binary.max(initial=0) > 1:
                raise DataError(f"{where}: '{name}' holds the value {int(binary.max())!r}, not 0/1: the data is "
                                f"damaged; {advice}")
            out[channel] = binary  # uint8 -> float32
    except (OSError, ValueError) as exc:  # h5py: checksum / filter failures are OSError
        if isinstance(exc, DataError):
            raise
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise DataError(f"{where} cannot be read ({reason}): the file is damaged; {advice}") from None
    image = out[0]
    low, high = float(image.min()), float(image.max())
    if not (np.isfinite(low) and np.isfinite(high)) or min(low, -high) < -1 - IMAGE_RANGE_SLACK:
        bad = int((~np.isfinite(image) | (np.abs(image) > 1 + IMAGE_RANGE_SLACK)).sum())
        raise DataError(f"{where}: the image holds {bad} voxel(s) that are NaN, infinite or outside [-1, 1] "
                        f"(min {low!r}, max {high!r}): the data is damaged; {advice}")
    return out
