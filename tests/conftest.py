"""Shared fixtures: small NIfTI subjects made here (fast, no phantom renderer needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from helpers import write_subjects  # noqa: E402


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
