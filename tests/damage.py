"""Damaging shard files the way storage does, for tests (issue 13)."""

from __future__ import annotations

from pathlib import Path

import h5py


def invert_chunk_bytes(shard: Path, row: int = 0, dataset: str = "image", count: int = 16) -> None:
    """Invert ``count`` bytes in the middle of one patch's stored chunk; the file keeps its size."""
    with h5py.File(shard, "r") as f:
        info = f[dataset].id.get_chunk_info_by_coord((row,) + (0,) * (f[dataset].ndim - 1))
    with open(shard, "r+b") as handle:
        handle.seek(info.byte_offset + info.size // 2)
        data = handle.read(count)
        handle.seek(info.byte_offset + info.size // 2)
        handle.write(bytes(b ^ 0xFF for b in data))
