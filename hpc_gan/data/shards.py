"""One HDF5 shard file: a few hundred patches, one patch per chunk.

Layout of ``<split>-<index>.h5`` (N patches of shape (X, Y, Z)):

=========== ============== ======= =========================================================
dataset     shape          dtype   meaning
=========== ============== ======= =========================================================
``image``   (N, X, Y, Z)   float32 image patch min-max scaled to [-1, 1]
``label``   (N, X, Y, Z)   uint8   vessel label, exactly 0 or 1
``mask``    (N, X, Y, Z)   uint8   brain mask (only when masks were given)
``subject`` (N,)           bytes   subject id of each patch
``origin``  (N, 3)         int32   patch corner in the source volume (may be negative: padding)
``kind``    (N,)           uint8   0 = grid patch, 1 = vessel-centred patch
=========== ============== ======= =========================================================

Files are written under a temporary name and renamed when complete, so a shard with its final
name is always whole. Readers open files read-only with HDF5 file locking off (cluster file
systems often do not support it).
"""

from __future__ import annotations

import os

import h5py
import hdf5plugin
import numpy as np

from hpc_gan.errors import DataError
from hpc_gan.io import atomic_path

FORMAT_VERSION = 1
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
                    f.create_dataset(name, data=data, chunks=(1,) + data.shape[1:], **options)
            f.create_dataset("subject", data=np.asarray(arrays["subject"], dtype="S"))
            f.create_dataset("origin", data=np.asarray(arrays["origin"], dtype=np.int32))
            f.create_dataset("kind", data=np.asarray(arrays["kind"], dtype=np.uint8))


def open_shard(path: str | os.PathLike) -> h5py.File:
    """Open a shard read-only without HDF5 file locking."""
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise DataError(f"shard '{path}' cannot be opened as HDF5 ({exc}); re-run the packing") from None
