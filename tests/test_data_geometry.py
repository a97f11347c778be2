"""Geometry from one source (the affine), one orientation per dataset, exact values in errors (issue 13)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from helpers import assert_one_line_error, tiny_subject, write_subjects
from hpc_gan.cli import main
from hpc_gan.data.nifti import load_volume
from hpc_gan.errors import DataError

pytestmark = pytest.mark.unit


def _pack_args(src, out, *extra):
    return ["pack", "--images", str(src / "images"), "--labels", str(src / "labels"), "--out", str(out),
            "--patch-shape", "16,16,16", "--grid", "2,2,1", "--vessel-patches", "2", "--split", "0.5,0.25,0.25",
            "--no-progress", *extra]


def _save_raw(array, affine, path, zooms=None):
    img = nib.Nifti1Image(array, affine)
    if zooms is not None:
        img.header.set_zooms(zooms)
    nib.save(img, str(path))


def test_spacing_comes_from_the_affine_not_pixdim(tmp_path, capsys):
    """sform says 0.5 x 0.5 x 0.8 mm, pixdim says 1 x 1 x 1: the manifest records the affine's spacing."""
    src = tmp_path / "src"
    for sub in ("images", "labels"):
        (src / sub).mkdir(parents=True)
    for i in range(4):
        image, label, _, _ = tiny_subject(seed=i)
        _save_raw(image, np.diag([0.5, 0.5, 0.8, 1]), src / "images" / f"sub-{i}.nii.gz", zooms=(1, 1, 1))
        _save_raw(label, np.diag([0.5, 0.5, 0.8, 1]), src / "labels" / f"sub-{i}_seg.nii.gz", zooms=(1, 1, 1))
    assert nib.load(str(src / "images/sub-0.nii.gz")).header.get_zooms() == (1, 1, 1)  # the input is as handed
    assert load_volume(src / "images/sub-0.nii.gz").spacing == pytest.approx((0.5, 0.5, 0.8))
    assert main(_pack_args(src, tmp_path / "out")) == 0
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["spacing"] == [0.5, 0.5, 0.8]
    assert manifest["orientation"] == "RAS"
    assert all(s["spacing"] == [0.5, 0.5, 0.8] and s["orientation"] == "RAS" for s in manifest["sources"].values())
    # the spacing flows on: bAVD in mm of a one-voxel shift along x is half a millimetre, not one
    from hpc_gan.eval.segmentation import segmentation_scores

    truth = load_volume(src / "labels/sub-0_seg.nii.gz", "label")
    shifted = np.roll(truth.data, 1, axis=0)
    assert segmentation_scores(shifted, truth.data, truth.spacing)["bavd_mm"] == pytest.approx(
        0.5 * segmentation_scores(shifted, truth.data, truth.spacing)["bavd_voxels"])


def _orientations(image: np.ndarray, affine: np.ndarray):
    """The same physical volume stored three ways: RAS axial, LPS (DICOM-like) axial, and sagittal."""
    nx, ny = image.shape[:2]
    yield "RAS", image, affine
    # LPS: x and y reversed; new voxel (i, j, k) is old (nx-1-i, ny-1-j, k)
    yield "LPS", image[::-1, ::-1, :], affine @ np.array(
        [[-1, 0, 0, nx - 1], [0, -1, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    # sagittal: stored axes (z, x, y); stored voxel (k, i, j) is old (i, j, k)
    yield "SRA", np.transpose(image, (2, 0, 1)), affine @ np.array(
        [[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])


def test_every_orientation_loads_as_the_same_ras_volume(tmp_path):
    image, _, _, affine = tiny_subject()
    for codes, data, aff in _orientations(image, affine):
        path = tmp_path / f"{codes}.nii.gz"
        _save_raw(np.ascontiguousarray(data), aff, path)
        volume = load_volume(path)
        assert volume.orientation == codes
        np.testing.assert_array_equal(volume.data, image)
        np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
        assert volume.spacing == pytest.approx((0.5, 0.5, 0.8))


def test_sagittal_and_axial_subjects_pack_into_one_orientation(tmp_path, capsys):
    """A dataset mixing axial (RAS) and sagittal acquisitions: every patch ends up in RAS, and the
    manifest says how each source was stored; the patches equal those of an all-axial dataset."""
    axial, mixed = write_subjects(tmp_path / "axial"), write_subjects(tmp_path / "mixed")
    for sid in ("sub-001", "sub-003"):
        for role, name in (("images", f"{sid}.nii.gz"), ("labels", f"{sid}_seg.nii.gz"), ("masks", f"{sid}_mask.nii.gz")):
            img = nib.load(str(axial / role / name))
            _, data, aff = list(_orientations(np.asarray(img.dataobj), img.affine))[2]
            _save_raw(np.ascontiguousarray(data), aff, mixed / role / name)
    assert main(_pack_args(axial, tmp_path / "a")) == 0
    assert main(_pack_args(mixed, tmp_path / "m")) == 0
    a, m = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("a", "m"))
    assert {s: v["orientation"] for s, v in m["sources"].items()} == {
        "sub-000": "RAS", "sub-001": "SRA", "sub-002": "RAS", "sub-003": "SRA"}
    assert m["spacing"] == a["spacing"] == [0.5, 0.5, 0.8]
    import h5py

    for split in ("train", "val", "test"):
        for sa, sm in zip(a["splits"][split]["shards"], m["splits"][split]["shards"]):
            with h5py.File(tmp_path / "a" / sa["file"]) as fa, h5py.File(tmp_path / "m" / sm["file"]) as fm:
                for key in ("image", "label", "origin"):
                    np.testing.assert_array_equal(fa[key][:], fm[key][:])


def test_label_values_and_header_scaling_are_shown_exactly(tmp_path):
    """A label of 1.0000001 must not be accepted as 1 nor printed as 1; the scaling is named."""
    _, label, _, affine = tiny_subject()
    img = nib.Nifti1Image(label.astype(np.float64) * 1.0000001, affine)
    nib.save(img, str(tmp_path / "l.nii"))
    with pytest.raises(DataError, match=r"1\.0000001.*scl_slope") as err:
        load_volume(tmp_path / "l.nii", "label")
    assert "\n" not in str(err.value)
    scaled = nib.Nifti1Image(label.astype(np.int16), affine)
    scaled.header.set_slope_inter(1.5, 0.0)
    nib.save(scaled, str(tmp_path / "s.nii"))
    with pytest.raises(DataError, match=r"1\.5 .*scl_slope 1\.5, scl_inter 0\.0"):
        load_volume(tmp_path / "s.nii", "label")


def test_non_ascii_subject_ids_are_stored_as_utf8(subjects_dir, tmp_path, capsys):
    """sub-ä01 used to pass the checks and then fail in the writer with UnicodeEncodeError."""
    for role, suffix in (("images", ""), ("labels", "_seg"), ("masks", "_mask")):
        (subjects_dir / role / f"sub-000{suffix}.nii.gz").rename(subjects_dir / role / f"sub-ä01{suffix}.nii.gz")
    assert main(_pack_args(subjects_dir, tmp_path / "out", "--split", "1,0,0")) == 0
    from hpc_gan.data.dataset import ShardedPatchDataset

    ds = ShardedPatchDataset(tmp_path / "out", "train")
    assert "sub-ä01" in {ds.subject_of(i) for i in range(len(ds))}
    assert "sub-ä01" in json.loads((tmp_path / "out/manifest.json").read_text(encoding="utf-8"))["sources"]


def test_degenerate_affine_is_one_line(tmp_path):
    image, *_ = tiny_subject()
    img = nib.Nifti1Image(image, None)
    img.set_sform(np.diag([0.5, 0.5, 0.0, 1.0]), code=1)  # a header tool zeroed one column
    nib.save(img, str(tmp_path / "z.nii.gz"))
    with pytest.raises(DataError, match="degenerate affine"):
        load_volume(tmp_path / "z.nii.gz")


def test_pack_refuses_negative_seed(subjects_dir, tmp_path, capsys):
    assert main(_pack_args(subjects_dir, tmp_path / "o", "--seed", "-1")) == 2
    assert_one_line_error(capsys, "--seed", "-1", "0 or more")


def test_a_failing_value_is_never_printed_as_a_passing_one():
    """PRD's histogram check used to print a sum of 1.0000011 as 'sums to 1'."""
    from hpc_gan.eval.prd import _histogram

    with pytest.raises(ValueError, match=r"sums to 1\.000001"):
        _histogram([0.5, 0.5000011], "eval_dist")
