"""Downstream segmentation scores: DSC, bAVD, their edge cases, figures and tables."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from hpc_gan.errors import DataError
from hpc_gan.eval.segmentation import (BAVD_METHODS, DENSE_FRACTION, bavd, bavd_method, box_plots_png, check_pair,
                                       dice, error_map_png, error_map_rgb, segmentation_scores, summary_table,
                                       write_csv)

pytestmark = pytest.mark.unit
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ANISO = (0.5, 0.5, 0.8)


def empty(shape=(10, 10, 10)) -> np.ndarray:
    return np.zeros(shape, bool)


def voxels(*points, shape=(10, 10, 10)) -> np.ndarray:
    mask = empty(shape)
    for p in points:
        mask[p] = True
    return mask


def cube(start=2, size=4, shape=(10, 10, 10)) -> np.ndarray:
    mask = empty(shape)
    mask[start:start + size, start:start + size, start:start + size] = True
    return mask


def brute_force_bavd(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    """The definition, with nearest neighbours found by a k-d tree over voxel centres in mm."""
    g, s = np.argwhere(truth) * np.asarray(spacing), np.argwhere(pred) * np.asarray(spacing)
    d_gs, _ = cKDTree(s).query(g)
    d_sg, _ = cKDTree(g).query(s)
    return (d_gs.sum() + d_sg.sum()) / (2 * len(g))


# --------------------------------------------------------------------------- known answers


def test_identical_masks():
    mask = cube()
    assert dice(mask, mask) == 1.0
    assert bavd(mask, mask) == 0.0 and bavd(mask, mask, ANISO) == 0.0


def test_two_voxels_three_apart():
    pred, truth = voxels((2, 5, 5)), voxels((5, 5, 5))        # 3 voxels apart along x
    assert dice(pred, truth) == 0.0
    assert bavd(pred, truth) == pytest.approx((3 + 3) / (2 * 1))
    along_z = voxels((5, 5, 2)), voxels((5, 5, 5))
    assert bavd(*along_z, spacing=ANISO) == pytest.approx(3 * 0.8)
    assert bavd(pred, truth, spacing=ANISO) == pytest.approx(3 * 0.5)


def test_cube_shifted_by_one_voxel():
    truth = cube(start=2, size=4)
    pred = np.roll(truth, 1, axis=0)
    # 48 of 64 voxels overlap; one 4x4 face of each cube lies 1 voxel from the other, the rest 0.
    assert dice(pred, truth) == pytest.approx(2 * 48 / 128)
    assert bavd(pred, truth) == pytest.approx((16 * 1 + 16 * 1) / (2 * 64))
    assert bavd(pred, truth, ANISO) == pytest.approx((16 * 0.5 + 16 * 0.5) / (2 * 64))


def test_balanced_denominator_is_truth_size():
    truth = voxels((5, 5, 5))
    pred = voxels((5, 5, 5), (5, 5, 7))                       # one extra voxel 2 away
    assert bavd(pred, truth) == pytest.approx((0 + 0 + 2) / (2 * 1))
    assert bavd(truth, pred) == pytest.approx((0 + 2 + 0) / (2 * 2))


def all_pairs_bavd(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    """The definition by brute force: every pairwise distance between voxel centres in mm."""
    g, s = np.argwhere(truth) * np.asarray(spacing), np.argwhere(pred) * np.asarray(spacing)
    pairs = np.sqrt(((g[:, None, :] - s[None, :, :]) ** 2).sum(-1))         # (|G|, |S|)
    return (pairs.min(axis=1).sum() + pairs.min(axis=0).sum()) / (2 * len(g))


@pytest.mark.parametrize("method", BAVD_METHODS)
@pytest.mark.parametrize("density", [0.02, 0.3])
def test_every_bavd_method_equals_all_pairs_brute_force(method, density):
    """Sparse and dense masks (with solid blobs, so interior voxels exist), anisotropic spacing."""
    rng = np.random.default_rng(7)
    shape = (14, 12, 10)
    truth, pred = rng.random(shape) < density, rng.random(shape) < density
    truth[2:7, 2:7, 2:6] = True                                       # interior voxels the tree skips
    pred[4:9, 3:8, 3:7] = True
    for spacing in ((1.0, 1.0, 1.0), ANISO, (0.3, 1.7, 0.9)):
        assert abs(bavd(pred, truth, spacing, method=method) - all_pairs_bavd(pred, truth, spacing)) < 1e-9


def test_bavd_auto_rule_picks_kdtree_for_sparse_and_transforms_for_dense_labels():
    rng = np.random.default_rng(0)
    sparse = rng.random((20, 20, 20)) < 0.02, rng.random((20, 20, 20)) < 0.02
    dense = rng.random((20, 20, 20)) < 0.4, rng.random((20, 20, 20)) < 0.4
    assert np.mean(sparse[0] ^ sparse[1]) <= DENSE_FRACTION < np.mean(dense[0] ^ dense[1])
    assert bavd_method(*sparse) == "kdtree" and bavd_method(*dense) == "distance_transform"


def test_bavd_unknown_method_is_refused():
    with pytest.raises(DataError, match="'exact'"):
        bavd(cube(), cube(), method="exact")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bavd_matches_brute_force_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    shape = (13, 11, 9)
    truth, pred = rng.random(shape) < 0.05, rng.random(shape) < 0.08
    for spacing in ((1.0, 1.0, 1.0), ANISO, (0.3, 1.7, 0.9)):
        assert abs(bavd(pred, truth, spacing) - brute_force_bavd(pred, truth, spacing)) < 1e-9


def test_accepts_zero_one_integers():
    truth = cube().astype(np.uint8)
    assert dice(truth, truth) == 1.0 and bavd(truth.astype(float), truth) == 0.0


# --------------------------------------------------------------------------- edge cases


def test_both_empty():
    assert dice(empty(), empty()) == 1.0
    assert bavd(empty(), empty()) == 0.0


def test_empty_prediction():
    assert dice(empty(), cube()) == 0.0
    assert bavd(empty(), cube()) == math.inf


def test_empty_truth():
    assert dice(cube(), empty()) == 0.0
    assert bavd(cube(), empty(), ANISO) == math.inf


def test_shape_mismatch_names_both_shapes():
    for fn in (dice, bavd):
        with pytest.raises(DataError, match=r"\(10, 10, 10\).*\(10, 10, 9\)"):
            fn(empty(), empty((10, 10, 9)))


def test_bad_masks_and_spacing():
    with pytest.raises(DataError, match="3-D"):
        dice(np.zeros((4, 4), bool), np.zeros((4, 4), bool))
    with pytest.raises(DataError, match="only 0 and 1"):
        dice(np.full((4, 4, 4), 2), empty((4, 4, 4)))
    with pytest.raises(DataError, match="spacing"):
        bavd(cube(), cube(), spacing=(1.0, 0.0, 1.0))
    with pytest.raises(DataError, match="spacing"):
        bavd(cube(), cube(), spacing=(1.0, 1.0))


def test_check_pair():
    pred, truth = check_pair(cube().astype(np.uint8), cube(), ANISO, np.float32(ANISO))
    assert pred.dtype == bool and truth.dtype == bool
    with pytest.raises(DataError, match=r"prediction spacing \(0.5, 0.5, 0.8\) differs.*\(0.5, 0.5, 1.0\)"):
        check_pair(cube(), cube(), ANISO, (0.5, 0.5, 1.0))
    with pytest.raises(DataError, match="shape"):
        check_pair(cube(), empty((9, 10, 10)), ANISO, ANISO)


# --------------------------------------------------------------------------- per-subject scores


def test_scores_without_and_with_brain_mask():
    truth = voxels((5, 5, 5), (1, 1, 1))
    pred = voxels((5, 5, 5), (1, 1, 4))                        # the miss lies outside the brain
    brain = empty()
    brain[3:8, 3:8, 3:8] = True
    plain = segmentation_scores(pred, truth, ANISO)
    assert set(plain) == {"dsc", "bavd_voxels", "bavd_mm"}
    assert plain["dsc"] == 0.5
    assert plain["bavd_voxels"] == pytest.approx((0 + 3 + 0 + 3) / (2 * 2))
    assert plain["bavd_mm"] == pytest.approx((3 * 0.8 + 3 * 0.8) / (2 * 2))
    scores = segmentation_scores(pred, truth, ANISO, brain_mask=brain.astype(np.uint8))
    assert {k: scores[k] for k in plain} == plain
    assert scores["intracranial_dsc"] == 1.0
    assert scores["intracranial_bavd_voxels"] == 0.0 and scores["intracranial_bavd_mm"] == 0.0


def test_brain_mask_shape_checked():
    with pytest.raises(DataError, match="brain mask shape"):
        segmentation_scores(cube(), cube(), ANISO, brain_mask=empty((10, 10, 9)))


# --------------------------------------------------------------------------- figures


def test_error_map_colours():
    image = np.zeros((6, 6, 4))
    image[0, 0, 0] = 2.0
    truth = voxels((1, 1, 0), (2, 2, 0), (4, 4, 0), (4, 4, 2), shape=(6, 6, 4))
    pred = voxels((1, 1, 0), (3, 3, 1), (4, 4, 0), shape=(6, 6, 4))
    rgb = error_map_rgb(image, pred, truth, axis=2)            # (6, 6, 3)
    assert rgb.shape == (6, 6, 3)
    np.testing.assert_allclose(rgb[0, 0], 1.0)                  # brightest MIP pixel: white
    np.testing.assert_allclose(rgb[5, 5], 0.0)                  # background: black
    np.testing.assert_allclose(rgb[1, 1], (1.0, 0.0, 0.0))      # true positive: red
    np.testing.assert_allclose(rgb[3, 3], (0.0, 0.8, 0.0))      # false positive: green
    np.testing.assert_allclose(rgb[2, 2], (1.0, 0.9, 0.0))      # false negative: yellow
    np.testing.assert_allclose(rgb[4, 4], (1.0, 0.9, 0.0))      # a miss behind a hit stays visible


def test_error_map_png(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.random((20, 24, 8))
    error_map_png(image, cube(shape=(20, 24, 8), size=3), cube(start=3, size=3, shape=(20, 24, 8)),
                  tmp_path / "map.png", spacing=ANISO)
    assert (tmp_path / "map.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(DataError, match="axis"):
        error_map_png(image, image > 2, image > 2, tmp_path / "bad.png", axis=3)


def test_box_plots_png(tmp_path):
    scores = {"real": {"dsc": [0.8, 0.85, 0.9], "bavd_voxels": [0.5, 0.7, math.inf],
                       "intracranial_dsc": [0.9, 0.92, 0.95], "intracranial_bavd_voxels": [0.2, 0.3, 0.4]},
              "gp": {"dsc": [0.7, 0.75], "bavd_voxels": [1.0, 1.2]}}
    box_plots_png(scores, tmp_path / "box.png")
    assert (tmp_path / "box.png").read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(DataError, match="bavd_key"):
        box_plots_png(scores, tmp_path / "x.png", bavd_key="hd95")


# --------------------------------------------------------------------------- tables


ROWS = [{"source": "real", "subject": "s1", "dsc": 0.8, "bavd_voxels": 1.0, "bavd_mm": 0.5,
         "intracranial_dsc": 0.9, "intracranial_bavd_voxels": 0.4, "intracranial_bavd_mm": 0.2},
        {"source": "real", "subject": "s2", "dsc": 0.9, "bavd_voxels": 2.0, "bavd_mm": 1.5,
         "intracranial_dsc": 0.95, "intracranial_bavd_voxels": 0.6, "intracranial_bavd_mm": 0.4},
        {"source": "gp", "subject": "s1", "dsc": 0.7, "bavd_voxels": math.inf, "bavd_mm": math.inf}]


def test_summary_table():
    lines = summary_table(ROWS).splitlines()
    assert lines[0] == ("| source | n | all DSC | all bAVD (voxels) | all bAVD (mm) | intracranial DSC | "
                        "intracranial bAVD (voxels) | intracranial bAVD (mm) |")
    assert lines[1] == "|---|---:|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == ("| real | 2 | 0.850 (0.071) | 1.50 (0.71) | 1.00 (0.71) | 0.925 (0.035) | "
                        "0.50 (0.14) | 0.30 (0.14) |")
    assert lines[3] == "| gp | 1 | 0.700 | inf | inf | – | – | – |"
    no_mask = summary_table([{k: v for k, v in r.items() if not k.startswith("intra")} for r in ROWS])
    assert "intracranial" not in no_mask
    with pytest.raises(DataError, match="source"):
        summary_table([{"dsc": 1.0}])


def test_write_csv(tmp_path):
    write_csv(ROWS, tmp_path / "scores.csv")
    with open(tmp_path / "scores.csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == list(ROWS[0])
    assert read[2]["intracranial_dsc"] == "" and float(read[2]["bavd_mm"]) == math.inf
    assert float(read[1]["bavd_voxels"]) == 2.0


# --------------------------------------------------------------------------- benchmark


def test_bavd_benchmark_quick_run():
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "bavd.py"
    done = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["agreement"]["max_abs_diff_sampled_terms_mm"] < 1e-9
    assert result["kdtree"]["abs_diff_vs_bavd"] < 1e-9
    assert result["bavd_seconds"] > 0 and result["brute_force_extrapolated_seconds"] > 0
