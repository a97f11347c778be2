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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", **savefig_options)
    os.replace(tmp, path)
    return path
