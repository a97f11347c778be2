"""NIfTI checks and patch sampling."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from hpc_gan.data import nifti, patches
from hpc_gan.errors import DataError

pytestmark = pytest.mark.unit


def _write(path, array, affine=None, descrip=b""):
    img = nib.Nifti1Image(array, np.eye(4) if affine is None else affine)
    img.header["descrip"] = descrip
    nib.save(img, str(path))
    return path


def test_subject_ids_strip_extension_and_role():
    assert nifti.subject_id("a/sub-007_seg.nii.gz") == "sub-007"
    assert nifti.subject_id("sub-007_mask.nii") == "sub-007"
    assert nifti.subject_id("P12-TOF.nii.gz") == "P12"
    assert nifti.subject_id("P12.nii.gz") == "P12"


def test_load_checks(tmp_path):
    ok = _write(tmp_path / "ok.nii.gz", np.zeros((20, 20, 10), np.float32), np.diag([0.5, 0.5, 0.8, 1]))
    vol = nifti.load_volume(ok)
    assert vol.spacing == pytest.approx((0.5, 0.5, 0.8)) and vol.data.dtype == np.float32
    squeezed = _write(tmp_path / "sq.nii.gz", np.zeros((20, 20, 10, 1), np.float32))
    assert nifti.load_volume(squeezed).data.shape == (20, 20, 10)
    cases = {
        "missing": (tmp_path / "nope.nii.gz", "image", "does not exist"),
        "not nifti": ((tmp_path / "x.nii.gz"), "image", "not a readable NIfTI"),
        "4d": (_write(tmp_path / "4d.nii.gz", np.zeros((8, 8, 8, 3), np.float32)), "image", "4 dimensions"),
        "2d": (_write(tmp_path / "2d.nii.gz", np.zeros((8, 8), np.float32)), "image", "2 dimensions"),
        "nan": (_write(tmp_path / "nan.nii.gz", np.full((8, 8, 8), np.nan, np.float32)), "image", "NaN or Inf"),
        "label values": (_write(tmp_path / "l.nii.gz", np.full((8, 8, 8), 2, np.uint8)), "label", "only 0 and 1"),
    }
    (tmp_path / "x.nii.gz").write_bytes(b"this is not a volume")
    for name, (path, role, words) in cases.items():
        with pytest.raises(DataError, match=words):
            nifti.load_volume(path, role)


def test_grid_mismatch(tmp_path):
    a = nifti.load_volume(_write(tmp_path / "a.nii.gz", np.zeros((8, 8, 8), np.float32)))
    b = nifti.load_volume(_write(tmp_path / "b.nii.gz", np.zeros((8, 8, 9), np.float32)))
    c = nifti.load_volume(_write(tmp_path / "c.nii.gz", np.zeros((8, 8, 8), np.float32), np.diag([2, 1, 1, 1])))
    with pytest.raises(DataError, match="shape"):
        nifti.check_same_grid(a, b)
    with pytest.raises(DataError, match="different affines"):
        nifti.check_same_grid(a, c)


def test_save_nifti_writes_geometry_only(tmp_path):
    src = _write(tmp_path / "src.nii.gz", np.ones((8, 8, 8), np.float32), np.diag([0.5, 0.5, 0.8, 1]),
                 descrip=b"Patient: Jane Doe")
    vol = nifti.load_volume(src)
    nifti.save_nifti(vol.data, vol.affine, tmp_path / "out.nii.gz")
    header = nib.load(str(tmp_path / "out.nii.gz")).header
    assert header["descrip"].item() == b"" and header["db_name"].item() == b""
    assert header["aux_file"].item() == b"" and header["intent_name"].item() == b""
    assert header.get_zooms() == pytest.approx((0.5, 0.5, 0.8))


def test_paper_grid_on_paper_volume():
    origins = patches.grid_origins((312, 384, 127), (128, 128, 64), (3, 3, 2))
    assert origins.shape == (18, 3)
    assert origins.min(axis=0).tolist() == [0, 0, 0]
    assert (origins.max(axis=0) + (128, 128, 64)).tolist() == [312, 384, 127]


def test_extract_pads_with_zeros():
    vol = np.arange(1000, dtype=np.float32).reshape(10, 10, 10) + 1
    patch = patches.extract(vol, np.array([-2, 7, 3]), (4, 4, 4))
    assert patch.shape == (4, 4, 4)
    assert (patch[:2] == 0).all() and (patch[:, 3:] == 0).all()
    np.testing.assert_array_equal(patch[2:, :3], vol[0:2, 7:10, 3:7])


def test_vessel_patches_are_centred_on_vessels():
    label = np.zeros((40, 40, 20), np.uint8)
    label[5, 30, 2] = label[20, 20, 10] = 1
    rng = np.random.default_rng(0)
    origins = patches.vessel_origins(label, (16, 16, 8), 10, rng)
    centres = origins + np.array([8, 8, 4])
    for c in centres:
        assert label[tuple(c)] == 1
    assert (origins < 0).any()  # the vessel near the border needs padding


def test_empty_label_and_small_volume_are_errors():
    plan = patches.SamplingPlan((16, 16, 8), (2, 2, 1), 4, 0)
    with pytest.raises(DataError, match="empty label"):
        patches.plan_origins(np.zeros((32, 32, 16), np.uint8), plan, 0, "sub-1")
    with pytest.raises(DataError, match="smaller than the patch"):
        patches.plan_origins(np.ones((32, 10, 16), np.uint8), plan, 0, "sub-1")


def test_plan_is_deterministic_per_subject():
    label = (np.random.default_rng(1).random((32, 32, 16)) > 0.9).astype(np.uint8)
    plan = patches.SamplingPlan((16, 16, 8), (2, 2, 2), 5, seed=3)
    a, b = patches.plan_origins(label, plan, 0), patches.plan_origins(label, plan, 0)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 8 + 5
    assert not np.array_equal(a, patches.plan_origins(label, plan, 1))


def test_minmax_normalise():
    out = patches.minmax_normalise(np.array([[[2.0, 4.0, 6.0]]]))
    np.testing.assert_allclose(out, [[[-1.0, 0.0, 1.0]]])
    assert (patches.minmax_normalise(np.full((2, 2, 2), 5.0)) == -1).all()
