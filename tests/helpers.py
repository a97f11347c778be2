"""Helpers shared by test modules (fixtures live in conftest.py; test modules import these)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hpc_gan.data.nifti import save_nifti

SPACING = (0.5, 0.5, 0.8)


def tiny_subject(shape=(40, 40, 24), seed=0):
    """An image with a bright straight 'vessel' along z and its label and brain mask."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 5, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    cx, cy = shape[0] // 2 + seed % 5, shape[1] // 2
    label[cx - 2:cx + 2, cy - 2:cy + 2, :] = 1
    image[label == 1] += 200
    mask = np.zeros(shape, np.uint8)
    mask[4:-4, 4:-4, 2:-2] = 1
    affine = np.diag(SPACING + (1.0,))
    return image, label, mask, affine


def write_subjects(root: Path, n: int = 4, shape=(40, 40, 24)) -> Path:
    for sub in ("images", "labels", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, label, mask, affine = tiny_subject(shape, seed=i)
        save_nifti(image, affine, root / "images" / f"sub-{i:03d}.nii.gz")
        save_nifti(label, affine, root / "labels" / f"sub-{i:03d}_seg.nii.gz")
        save_nifti(mask, affine, root / "masks" / f"sub-{i:03d}_mask.nii.gz")
    return root


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 600):
    """Run a script under torchrun with a free port; returns the CompletedProcess."""
    import subprocess
    import sys

    from hpc_gan.dist import free_port, without_launcher_env

    port = free_port()
    env = without_launcher_env()
    env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(capsys, *words: str) -> str:
    """The command printed one `error: ...` line on stderr naming every word."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    for word in words:
        assert word in err, err
    return err


def half_exact_copy(src: Path, dst: Path) -> Path:
    """A copy of a packed dataset whose images are exactly representable in float16 (each value
    rounded once), its manifest updated to the new shard sizes and checksums: the data on which a
    float16 cache must give bit-identical float32 batches."""
    import json
    import shutil

    import h5py

    from hpc_gan.io import file_sha256

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = dst / shard["file"]
            with h5py.File(path, "r+", locking=False) as f:
                f["image"][...] = f["image"][...].astype(np.float16).astype(np.float32)
            shard["bytes"], shard["sha256"] = path.stat().st_size, file_sha256(path)
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst
