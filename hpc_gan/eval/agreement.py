"""Label–image agreement: does a generated label mark its own image's vessels?

Only :func:`label_contrast` lives here for now (evaluation during training uses it); the
segmenter-based agreement (``segmenter_dice``, ``reference_segmenter``) joins it from the
``metrics`` branch with the same API.
"""

from __future__ import annotations

import numpy as np


def label_contrast(images, labels) -> float:
    """Mean image intensity inside the label minus outside it, averaged over patches.

    Args:
        images: (N, X, Y, Z) float in [-1, 1], e.g. (64, 32, 32, 16).
        labels: (N, X, Y, Z) bool vessel masks of the same shape.

    Returns:
        The mean over the patches whose label has both vessel and background voxels (in [-2, 2];
        vessels are bright in TOF-MRA, so real patches give a clearly positive value), or NaN
        when no patch has both.

    Raises:
        ValueError: shapes that differ or are not 4-D.

    Example:
        >>> images = np.full((1, 4, 4, 2), -1.0); labels = np.zeros((1, 4, 4, 2), bool)
        >>> images[0, :2] = 1.0; labels[0, :2] = True
        >>> label_contrast(images, labels)
        2.0
    """
    images, labels = np.asarray(images, dtype=np.float64), np.asarray(labels, dtype=bool)
    if images.ndim != 4 or images.shape != labels.shape:
        raise ValueError(f"images and labels must both be (N, X, Y, Z); got {images.shape} and {labels.shape}")
    flat_i, flat_l = images.reshape(len(images), -1), labels.reshape(len(labels), -1)
    inside, total = flat_l.sum(axis=1), flat_l.shape[1]
    both = (inside > 0) & (inside < total)
    if not both.any():
        return float("nan")
    mean_in = (flat_i * flat_l).sum(axis=1)[both] / inside[both]
    mean_out = (flat_i * ~flat_l).sum(axis=1)[both] / (total - inside[both])
    return float(np.mean(mean_in - mean_out))
