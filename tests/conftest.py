"""Shared fixtures: small NIfTI subjects made here (fast, no phantom renderer needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from hpc_gan.data.nifti import save_nifti  # noqa: E402

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


@pytest.fixture
def subjects_dir(tmp_path) -> Path:
    """Four small subjects: images/, labels/ (with a _seg suffix), masks/ (with a _mask suffix)."""
    return write_subjects(tmp_path / "nifti")


@pytest.fixture(scope="session")
def packed(tmp_path_factory) -> Path:
    """A packed dataset of 6 subjects with 16x16x16 patches (shared read-only by tests)."""
    from hpc_gan.data import pack as packing
    from hpc_gan.data.patches import SamplingPlan

    root = tmp_path_factory.mktemp("packed")
    src = write_subjects(root / "nifti", n=6)
    subjects = packing.match_subjects(src / "images", src / "labels", src / "masks")
    splits = packing.assign_splits([s.id for s in subjects], (4 / 6, 1 / 6, 1 / 6), seed=0)
    packing.pack(subjects, splits, root / "shards", SamplingPlan((16, 16, 16), (2, 2, 1), 6, 0),
                 patches_per_shard=7, progress=False)
    return root / "shards"


@pytest.fixture(scope="session")
def smoke_shards(tmp_path_factory) -> Path:
    """Shards with the smoke profile's 32x32x16 patches: 3 train subjects x 5 patches (an epoch
    is 3 steps on 2 ranks at batch 2, so short runs cross epoch boundaries)."""
    from hpc_gan.data import pack as packing
    from hpc_gan.data.patches import SamplingPlan

    root = tmp_path_factory.mktemp("smoke")
    src = write_subjects(root / "nifti", n=5)
    subjects = packing.match_subjects(src / "images", src / "labels", src / "masks")
    splits = {"train": ["sub-000", "sub-001", "sub-002"], "val": ["sub-003"], "test": ["sub-004"]}
    packing.pack(subjects, splits, root / "shards", SamplingPlan((32, 32, 16), (1, 1, 1), 4, 0), progress=False)
    return root / "shards"


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 600):
    """Run a script under torchrun with a free port; returns the CompletedProcess."""
    import subprocess
    import sys

    from hpc_gan.dist import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_",
                                                                     "SLURM_", "PMI_", "OMPI_"))}
    env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
