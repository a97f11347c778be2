"""Figures for the PNGs the toolkit writes: matplotlib's Agg canvas without pyplot (no global
backend state), saved under a temporary name and renamed, so a crash never leaves half a file."""

from __future__ import annotations

import os
from pathlib import Path


def new_figure(figsize: tuple[float, float], dpi: int = 100):
    """A matplotlib ``Figure`` drawn by Agg, e.g. ``new_figure((9, 4.8)).subplots(1, 2)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | os.PathLike, **savefig_options) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parents created) atomically; returns the path."""
    from hpc_gan.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **savefig_options)
    return Path(path)


def save_axial_mip_png(image, label, spacing, path: str | os.PathLike) -> Path:
    """Axial maximum-intensity projections of an (x, y, z) image and its vessel label side by side.

    Args:
        image, label: (x, y, z) arrays of one volume.
        spacing: voxel size in mm (x, y, z); sets the aspect ratio.
        path: the PNG to write.
    """
    fig = new_figure((9, 4.8))
    for ax, vol, title in zip(fig.subplots(1, 2), (image, label), ("image", "vessel label")):
        # Transposed with origin lower: x (right) across, y (anterior) up, as seen from above.
        ax.imshow(vol.max(axis=2).T, origin="lower", cmap="gray", aspect=spacing[1] / spacing[0],
                  interpolation="nearest")
        ax.set(title=f"axial MIP, {title}", xlabel="x (R)", ylabel="y (A)")
    fig.tight_layout()
    return save_png(fig, path)
