"""Packing NIfTI subjects into shards: content, manifest, splits, refusals, compressions."""

from __future__ import annotations

import json

import h5py
import nibabel as nib
import numpy as np
import pytest

from helpers import write_subjects
from hpc_gan.data import pack as packing
from hpc_gan.data.manifest import load_manifest
from hpc_gan.data.nifti import load_volume
from hpc_gan.data.patches import SamplingPlan, extract
from hpc_gan.errors import DataError

pytestmark = pytest.mark.unit
PLAN = SamplingPlan((16, 16, 16), (2, 2, 1), 3, seed=1)


def _pack(src, out, **kwargs):
    subjects = packing.match_subjects(src / "images", src / "labels", src / "masks")
    splits = packing.assign_splits([s.id for s in subjects], (0.5, 0.25, 0.25), seed=0)
    options = dict(plan=PLAN, patches_per_shard=5, progress=False)
    options.update(kwargs)
    return packing.pack(subjects, splits, out, **options)


def test_match_subjects(subjects_dir):
    subjects = packing.match_subjects(subjects_dir / "images", subjects_dir / "labels", subjects_dir / "masks")
    assert [s.id for s in subjects] == ["sub-000", "sub-001", "sub-002", "sub-003"]
    assert subjects[0].label.name == "sub-000_seg.nii.gz"
    (subjects_dir / "labels" / "sub-003_seg.nii.gz").unlink()
    with pytest.raises(DataError, match="subject 'sub-003' has an image but no label"):
        packing.match_subjects(subjects_dir / "images", subjects_dir / "labels")
    with pytest.raises(DataError, match="does not exist"):
        packing.match_subjects(subjects_dir / "nope", subjects_dir / "labels")


def test_splits_are_disjoint_and_complete():
    ids = [f"s{i}" for i in range(47)]
    splits = packing.assign_splits(ids, (0.8, 0.1, 0.1), seed=0)
    members = [sid for part in splits.values() for sid in part]
    assert sorted(members) == sorted(ids)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (37, 5, 5)
    assert packing.assign_splits(ids, (0.8, 0.1, 0.1), seed=0) == splits
    with pytest.raises(DataError, match="'s1' is in both 'train' and 'test'"):
        packing.assign_splits(ids, explicit={"train": ["s1", "s2"], "test": ["s1"]})
    with pytest.raises(DataError, match="summing to 1"):
        packing.assign_splits(ids, (0.5, 0.1, 0.1))


def test_pack_content_matches_sources(subjects_dir, tmp_path):
    manifest = _pack(subjects_dir, tmp_path / "out")
    assert manifest["splits"]["train"]["n_patches"] == 2 * (4 + 3)
    assert manifest["patch_shape"] == [16, 16, 16] and manifest["spacing"] == [0.5, 0.5, 0.8]
    assert manifest["sampling"] == {"patch_shape": [16, 16, 16], "grid": [2, 2, 1], "vessel_patches": 3,
                                    "seed": 1, "padding": "zero"}
    assert set(manifest["sources"]["sub-000"]) >= {"image_sha256", "label_sha256", "mask_sha256", "shape"}
    train = manifest["splits"]["train"]
    assert [s["n"] for s in train["shards"]] == [5, 5, 4]
    with h5py.File(tmp_path / "out" / train["shards"][0]["file"], "r") as f:
        sid, origin = f["subject"][0].decode(), f["origin"][0]
        image, label = f["image"][0], f["label"][0]
        assert f["image"].chunks == (1, 16, 16, 16) and f["image"].compression == "lzf"
        assert f["kind"][:].tolist() == [0, 0, 0, 0, 1]
    assert sid in train["subjects"]
    source_label = load_volume(subjects_dir / "labels" / f"{sid}_seg.nii.gz", "label").data
    np.testing.assert_array_equal(label, extract(source_label, origin, (16, 16, 16)))
    assert image.min() == pytest.approx(-1) and image.max() == pytest.approx(1)
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_pack_is_deterministic_and_parallel_equals_serial(subjects_dir, tmp_path):
    serial = _pack(subjects_dir, tmp_path / "a")
    parallel = _pack(subjects_dir, tmp_path / "b", workers=2)
    for split in ("train", "val", "test"):
        for a, b in zip(serial["splits"][split]["shards"], parallel["splits"][split]["shards"]):
            with h5py.File(tmp_path / "a" / a["file"]) as fa, h5py.File(tmp_path / "b" / b["file"]) as fb:
                for key in ("image", "label", "mask", "origin"):
                    np.testing.assert_array_equal(fa[key][:], fb[key][:])


def test_refuses_existing_dataset_unless_overwrite(subjects_dir, tmp_path):
    out = tmp_path / "out"
    _pack(subjects_dir, out)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(DataError, match="already holds a dataset.*--overwrite"):
        _pack(subjects_dir, out)
    assert (out / "manifest.json").read_bytes() == before
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="shard file"):  # shards without a manifest are still protected
        _pack(subjects_dir, out)
    manifest = _pack(subjects_dir, out, overwrite=True, patches_per_shard=100)
    assert sorted(p.name for p in out.glob("*.h5")) == sorted(
        s["file"] for e in manifest["splits"].values() for s in e["shards"])  # stale shards removed


def test_input_errors_leave_no_dataset(subjects_dir, tmp_path):
    label = subjects_dir / "labels" / "sub-002_seg.nii.gz"
    img = nib.load(str(label))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(label))
    with pytest.raises(DataError, match="sub-002.*empty label"):
        _pack(subjects_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_identifying_header_fields_are_not_copied(tmp_path):
    src = write_subjects(tmp_path / "nifti", n=2)
    path = src / "images" / "sub-000.nii.gz"
    img = nib.load(str(path))
    img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    img.header["descrip"] = b"Jane Doe 1970-01-01"
    img.header["db_name"] = b"HOSPITAL-X"
    nib.save(img, str(path))
    subjects = packing.match_subjects(src / "images", src / "labels")
    packing.pack(subjects, {"train": ["sub-000", "sub-001"]}, tmp_path / "out", PLAN, progress=False)
    for f in (tmp_path / "out").iterdir():
        data = f.read_bytes()
        assert b"Jane Doe" not in data and b"HOSPITAL-X" not in data


@pytest.mark.parametrize("compression", ["lzf", "gzip", "none", "blosc"])
def test_every_compression_reads_back(subjects_dir, tmp_path, compression):
    from hpc_gan.data.dataset import ShardedPatchDataset

    _pack(subjects_dir, tmp_path / "out", compression=compression)
    ds = ShardedPatchDataset(tmp_path / "out", "train")
    assert ds[3].shape == (2, 16, 16, 16)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["compression"] == compression


def test_unknown_compression(subjects_dir, tmp_path):
    with pytest.raises(DataError, match="unknown compression 'zstd'"):
        _pack(subjects_dir, tmp_path / "out", compression="zstd")


def test_manifest_loads(packed):
    manifest = load_manifest(packed)
    assert manifest.count("train") == 4 * (4 + 6) and manifest.has_mask
    assert len(manifest.digest) == 64
