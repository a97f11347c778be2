"""Helpers shared by test modules (fixtures live in conftest.py; test modules import these)."""

from __future__ import annotations

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


# --------------------------------------------------------------------------- MedicalNet checkpoints

def _medicalnet_head(in_channels: int, classes: int = 2):
    """MedicalNet's segmentation head ``conv_seg``, whose keys a checkpoint carries."""
    from torch import nn

    return nn.Sequential(
        nn.ConvTranspose3d(in_channels, 32, 2, stride=2), nn.BatchNorm3d(32), nn.ReLU(inplace=True),
        nn.Conv3d(32, 32, 3, padding=1, bias=False), nn.BatchNorm3d(32), nn.ReLU(inplace=True),
        nn.Conv3d(32, classes, 1, bias=False),
    )


def medicalnet_model(name: str = "medicalnet_resnet10", seed: int = 1):
    """A "trained" network in MedicalNet's layout (with its ``conv_seg`` head): random weights and
    non-trivial BatchNorm statistics. torch is imported here: conftest imports this module."""
    import torch
    from torch import nn

    from hpc_gan.models.resnet3d import build_resnet3d

    torch.manual_seed(seed)
    model = build_resnet3d(name)
    model.conv_seg = _medicalnet_head(model.feature_dim)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


def save_medicalnet(model, path, wrap=True, prefix="module.", drop=()):
    """Save like MedicalNet's train.py: DataParallel keys inside {"state_dict": ...}."""
    import torch

    state = {prefix + k: v for k, v in model.state_dict().items() if not any(d in k for d in drop)}
    torch.save({"epoch": 200, "state_dict": state} if wrap else state, path)
    return path


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
