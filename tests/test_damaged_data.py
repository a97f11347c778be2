"""Damaged or inconsistent shards are named (shard and row) wherever they are read (issue 13)."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from damage import invert_chunk_bytes
from helpers import assert_one_line_error
from hpc_gan.cli import main
from hpc_gan.data.dataset import PatchLoader, ShardedPatchDataset
from hpc_gan.errors import DataError

pytestmark = pytest.mark.unit


@pytest.fixture
def damaged(packed, tmp_path):
    """A copy of the packed set whose first test shard has 16 inverted bytes in row 1's image
    chunk (same size: ``data.verify: size`` cannot see it)."""
    root = tmp_path / "damaged"
    shutil.copytree(packed, root)
    shard = root / "test-00000.h5"
    size = shard.stat().st_size
    invert_chunk_bytes(shard, row=1)
    assert shard.stat().st_size == size
    return root


def _one_line(exc: pytest.ExceptionInfo, *words: str) -> None:
    text = str(exc.value)
    assert "\n" not in text, text
    for word in words:
        assert word in text, text


def test_the_damaged_row_fails_its_checksum_whatever_the_verify_mode(damaged):
    ds = ShardedPatchDataset(damaged, "test", verify="size")
    ds[0]  # undamaged rows still read
    with pytest.raises(DataError) as exc:
        ds[1]
    _one_line(exc, "test-00000.h5", "row 1", f"hpc_gan inspect {damaged}")
    ds.close()
    with h5py.File(damaged / "test-00000.h5") as f:
        assert f["image"].fletcher32 and f["label"].fletcher32 and f.attrs["format_version"] == 2


def test_evaluate_names_the_damaged_shard_and_writes_no_report(packed, damaged, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["evaluate", "--samples", str(packed), "--real", str(damaged), "--out", str(out),
                 "--agreement-steps", "1"]) == 2
    assert_one_line_error(capsys, "test-00000.h5", "row 1", "hpc_gan inspect")
    assert not out.exists()


def test_a_worker_s_damaged_read_is_one_line(packed, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(packed, root)
    invert_chunk_bytes(root / "train-00000.h5", row=0)
    loader = PatchLoader(ShardedPatchDataset(root, "train", verify="size"), batch_size=2, num_workers=1,
                         shuffle=False)
    with pytest.raises(DataError) as exc:
        next(iter(loader))
    _one_line(exc, "train-00000.h5", "row 0")


def _rewrite(shard, drop=None, image=None, fletcher32=True):
    """Rewrite a shard, dropping a dataset or replacing the images (as an older writer would)."""
    with h5py.File(shard) as f:
        arrays = {k: f[k][:] for k in f if k != drop}
        attrs = dict(f.attrs)
    if image is not None:
        arrays["image"] = image(arrays["image"])
    shard.unlink()
    with h5py.File(shard, "w") as f:
        f.attrs.update(attrs)
        for k, v in arrays.items():
            chunks = (1,) + v.shape[1:] if v.ndim == 4 else None
            f.create_dataset(k, data=v, chunks=chunks, fletcher32=fletcher32 and chunks is not None)


def test_version_1_shards_without_checksums_are_checked_by_value(packed, tmp_path):
    root = tmp_path / "v1"
    shutil.copytree(packed, root)

    def damage(images):
        images[2, :4, :4, :4] = np.nan
        images[3, 0, 0, 0] = 3.5
        return images

    _rewrite(root / "train-00000.h5", image=damage, fletcher32=False)
    ds = ShardedPatchDataset(root, "train", verify="none")
    with pytest.raises(DataError) as exc:
        ds[2]
    _one_line(exc, "train-00000.h5", "row 2", "64 voxel(s)", "NaN")
    with pytest.raises(DataError) as exc:
        ds[3]
    _one_line(exc, "row 3", "max 3.5")


def test_a_shard_without_labels_is_named(packed, tmp_path):
    root = tmp_path / "nolabel"
    shutil.copytree(packed, root)
    _rewrite(root / "val-00000.h5", drop="label")
    ds = ShardedPatchDataset(root, "val", verify="none")
    with pytest.raises(DataError) as exc:
        ds[0]
    _one_line(exc, "val-00000.h5", "no 'label' dataset")
    manifest = json.loads((root / "manifest.json").read_text())
    for shard in manifest["splits"]["val"]["shards"]:  # as if a writer had produced it like this
        shard["bytes"] = (root / shard["file"]).stat().st_size
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as exc:
        ShardedPatchDataset(root, "val", verify="size")
    _one_line(exc, "val-00000.h5", "no 'label' dataset")


def test_a_manifest_claiming_more_patches_than_a_shard_holds_is_named(packed, tmp_path):
    """The shard is unchanged (verify=full passes); the manifest's count is wrong."""
    root = tmp_path / "count"
    shutil.copytree(packed, root)
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["splits"]["val"]
    entry["shards"][-1]["n"] += 3
    entry["n_patches"] += 3
    (root / "manifest.json").write_text(json.dumps(manifest))
    last = entry["shards"][-1]["file"]
    for verify in ("full", "size"):  # the shards' checksums and sizes are right: opening them tells
        with pytest.raises(DataError) as exc:
            ShardedPatchDataset(root, "val", verify=verify)
        _one_line(exc, last, "the manifest lists")
    ds = ShardedPatchDataset(root, "val", verify="none")  # and reading, when not verified first
    with pytest.raises(DataError) as exc:
        ds[len(ds) - 1]
    _one_line(exc, last, "the manifest lists")
    assert main(["inspect", str(root)]) == 2


def test_damaged_manifest_bytes_are_one_line(packed, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(packed, root)
    raw = bytearray((root / "manifest.json").read_bytes())
    raw[10:26] = bytes(b ^ 0xFF for b in raw[10:26])  # not even UTF-8 any more
    (root / "manifest.json").write_bytes(bytes(raw))
    with pytest.raises(DataError) as exc:
        ShardedPatchDataset(root, "train")
    _one_line(exc, "manifest.json", "not valid JSON")
    from hpc_gan.sample import training_spacing  # sampling must not guess a spacing around it

    with pytest.raises(DataError) as exc:
        training_spacing({"config": {"data": {"root": str(root)}}})
    _one_line(exc, "voxel spacing", "manifest.json")


@pytest.mark.parametrize("spacing", [[0.5, 0.5], [0.5, -1, 0.8], [0.5, "x", 0.8]])
def test_a_manifest_with_an_impossible_spacing_is_refused(packed, tmp_path, spacing):
    root = tmp_path / "s"
    shutil.copytree(packed, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["spacing"] = spacing
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="spacing"):
        ShardedPatchDataset(root, "train")


def test_tstr_names_the_damaged_shard(packed, damaged, tmp_path, capsys):
    """A damaged validation shard stops the U-Net training with the shard and row named."""
    invert_chunk_bytes(damaged / "val-00000.h5", row=0)
    nifti = packed.parent / "nifti"
    argv = ["tstr", "--real", str(damaged), "--images", str(nifti / "images"), "--labels", str(nifti / "labels"),
            "--source", "real", "--out", str(tmp_path / "t"), "--steps", "1", "--val-every", "1", "--batch", "2",
            "--channels", "2", "4", "8", "16"]
    assert main(argv) == 2
    assert_one_line_error(capsys, "val-00000.h5", "row 0", "hpc_gan inspect")


def test_training_with_verify_size_stops_at_the_damaged_patch(smoke_shards, tmp_path):
    """The smoke profile's `data.verify: size` cannot see bytes changed in place; the read does,
    in a DataLoader worker, and the job exits with one line (it used to hang at exit, joining a
    worker that ignores SIGTERM)."""
    import os
    import subprocess
    import sys

    root = tmp_path / "shards"
    shutil.copytree(smoke_shards, root)
    invert_chunk_bytes(root / "train-00000.h5", row=3)
    done = subprocess.run([sys.executable, "-m", "hpc_gan.train", "--variant", "sn", "--profile", "smoke",
                           "--set", f"data.root={root}", "--set", f"output_root={tmp_path / 'runs'}",
                           "--set", "train.max_steps=12", "--set", "data.verify=size", "--set", "train.num_workers=1"],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr.strip().splitlines()[-1]
    assert err.startswith("error: rank 0: shard") and "train-00000.h5' row 3" in err and "hpc_gan inspect" in err
