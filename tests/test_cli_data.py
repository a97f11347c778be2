"""The data command lines: a bad input is one line on stderr, exit status 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import assert_one_line_error
from hpc_gan.cli import main

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parent.parent


def _fails(capsys, argv, *words):
    assert main(argv) == 2
    return assert_one_line_error(capsys, *words)


def _pack_args(src, out, *extra):
    return ["pack", "--images", str(src / "images"), "--labels", str(src / "labels"), "--masks", str(src / "masks"),
            "--out", str(out), "--patch-shape", "16,16,16", "--grid", "2,2,1", "--vessel-patches", "2",
            "--split", "0.5,0.25,0.25", "--no-progress", *extra]


def test_pack_then_inspect(subjects_dir, tmp_path, capsys):
    assert main(_pack_args(subjects_dir, tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert "train:   2 subjects      12 patches" in out
    assert main(["inspect", str(tmp_path / "out")]) == 0
    assert "shards verified (full)" in capsys.readouterr().out


def test_script_wrappers_run(subjects_dir, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "data_prep/pack.py"), *_pack_args(subjects_dir, tmp_path / "o")[1:]],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    bad = subprocess.run([sys.executable, str(REPO / "data_prep/inspect_shards.py"), str(tmp_path / "missing")],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr


def test_existing_output_refused_then_overwritten(subjects_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_pack_args(subjects_dir, out)) == 0
    manifest = (out / "manifest.json").read_bytes()
    _fails(capsys, _pack_args(subjects_dir, out), "already holds a dataset", "--overwrite")
    assert (out / "manifest.json").read_bytes() == manifest
    assert main(_pack_args(subjects_dir, out, "--overwrite", "--seed", "3")) == 0
    assert (out / "manifest.json").read_bytes() != manifest


def _replace(path: Path, array, affine=None):
    old = nib.load(str(path))
    nib.save(nib.Nifti1Image(array, old.affine if affine is None else affine), str(path))


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "images/sub-001.nii.gz").unlink(), ["label(s) without an image: sub-001"]),
    (lambda d: (d / "images/sub-001.nii.gz").write_bytes(b"garbage"), ["sub-001.nii.gz", "not a readable NIfTI"]),
    (lambda d: _replace(d / "images/sub-001.nii.gz", np.zeros((40, 40, 24, 2), np.float32)), ["4 dimensions"]),
    (lambda d: _replace(d / "images/sub-001.nii.gz", np.zeros((40, 40), np.float32)), ["2 dimensions"]),
    (lambda d: _replace(d / "images/sub-001.nii.gz", np.zeros((40, 40, 20), np.float32)), ["shape (40, 40, 24)", "same voxel grid"]),
    (lambda d: _replace(d / "labels/sub-001_seg.nii.gz", np.ones((40, 40, 24), np.uint8), np.diag([1, 1, 1, 1.0])),
     ["different affines"]),
    (lambda d: _replace(d / "images/sub-001.nii.gz", np.full((40, 40, 24), np.inf, np.float32)), ["NaN or Inf"]),
    (lambda d: _replace(d / "labels/sub-001_seg.nii.gz", np.full((40, 40, 24), 3, np.uint8)), ["only 0 and 1"]),
    (lambda d: _replace(d / "labels/sub-001_seg.nii.gz", np.zeros((40, 40, 24), np.uint8)), ["sub-001", "empty label"]),
])
def test_bad_inputs(subjects_dir, tmp_path, capsys, damage, words):
    damage(subjects_dir)
    _fails(capsys, _pack_args(subjects_dir, tmp_path / "out"), *words)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bad_arguments(subjects_dir, tmp_path, capsys):
    _fails(capsys, _pack_args(subjects_dir, tmp_path / "o", "--patch-shape", "64,64,64"), "smaller than the patch")
    _fails(capsys, _pack_args(subjects_dir, tmp_path / "o", "--patch-shape", "16,16"), "give 3")
    _fails(capsys, _pack_args(subjects_dir, tmp_path / "o", "--compression", "zstd"), "unknown compression")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["sub-000", "sub-001"], "val": ["sub-001"]}))
    _fails(capsys, _pack_args(subjects_dir, tmp_path / "o", "--split-file", str(split)),
           "'sub-001' is in both 'train' and 'val'")
    _fails(capsys, ["pack", "--images", str(tmp_path / "none"), "--labels", "x", "--out", "y"], "does not exist")
    assert not (tmp_path / "o").exists()


def test_config_command(capsys):
    assert main(["config", "--variant", "c_sn_mp", "--profile", "smoke"]) == 0
    assert "critic_norm: spectral" in capsys.readouterr().out
    _fails(capsys, ["config", "--variant", "c_sn_mp", "--set", "train.batchsize=2"], "did you mean 'train.batch_size'")
