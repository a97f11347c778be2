"""Vessel-label statistics and their real-vs-generated distances."""

from __future__ import annotations

import numpy as np
import pytest

from hpc_gan.eval.label_stats import compare_label_statistics, label_statistics, plot_label_histograms


def tube(radius: float, shape=(40, 40, 16), centre=(20, 20)) -> np.ndarray:
    """A straight tube along z: voxels within ``radius`` voxels of the axis."""
    x, y = np.ogrid[:shape[0], :shape[1]]
    disk = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= radius**2
    return np.repeat(disk[:, :, None], shape[2], axis=2).astype(np.uint8)


@pytest.mark.parametrize("r", [2, 4, 6])
def test_tube_radius(r):
    radii = label_statistics(tube(r)[None])["radius"]
    assert len(radii) == 16  # the axis, one voxel per slice
    assert r <= np.median(radii) <= r + 1  # distance to the nearest background voxel centre


def test_spacing_gives_millimetres():
    voxels = label_statistics(tube(4)[None])["radius"]
    mm = label_statistics(tube(4)[None], spacing=(0.5, 0.5, 0.8))["radius"]
    np.testing.assert_allclose(mm, voxels * 0.5)


def test_components_fraction_and_empty():
    labels = np.zeros((3, 12, 12, 12), np.uint8)
    labels[0, 1:3, 1:3, 1:3] = 1
    labels[0, 6:9, 6:9, 6:9] = 1
    labels[1, 2, 2, 2] = labels[1, 3, 3, 3] = 1  # diagonal neighbours: one 26-connected component
    stats = label_statistics(labels)
    assert stats["components"].tolist() == [2, 1, 0]
    np.testing.assert_allclose(stats["vessel_fraction"], [35 / 1728, 2 / 1728, 0])
    empty = label_statistics(np.zeros((1, 8, 8, 8), bool))
    assert empty["radius"].size == 0 and empty["components"].tolist() == [0]
    with pytest.raises(ValueError, match="only 0 and 1"):
        label_statistics(labels * 3)


def test_compare_and_plot(tmp_path):
    real = label_statistics(np.stack([tube(r, centre=(20, 10 + r)) for r in (2, 3, 4)]))
    same = compare_label_statistics(real, real)
    assert all(row["wasserstein"] == 0 and row["ks"] == 0 for row in same.values())
    fake = label_statistics(np.stack([tube(r) for r in (5, 6, 7)]))
    apart = compare_label_statistics(real, fake)
    assert apart["radius"]["wasserstein"] > 2 and apart["vessel_fraction"]["ks"] == 1
    assert apart["radius"]["fake_mean"] > apart["radius"]["real_mean"]
    none = compare_label_statistics(real, label_statistics(np.zeros((2, 8, 8, 8), np.uint8)))
    assert np.isnan(none["radius"]["wasserstein"]) and none["radius"]["fake_n"] == 0
    plot_label_histograms(real, fake, tmp_path / "labels.png")
    assert (tmp_path / "labels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
