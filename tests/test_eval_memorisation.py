"""Memorisation audit: a copying generator is flagged, a fresh one is not; chunking and ranks agree."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpc_gan.eval import memorisation as audit
from hpc_gan.eval.memorisation import (closest_pairs_png, memorisation_audit, memorisation_audit_distributed,
                                      nearest_distances)

pytestmark = pytest.mark.unit

SHAPE = (16, 16, 8)


def smooth_patches(n: int, seed: int) -> torch.Tensor:
    """(n, 2, 16, 16, 8) random smooth volumes in [-1, 1] and their {0, 1} "vessel" labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *SHAPE, generator=g, dtype=torch.float64)
    for _ in range(2):
        x = F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
    image = torch.tanh(x / x.std())
    return torch.cat([image, (image > 0.5).double()], dim=1)


def features(patches: torch.Tensor) -> np.ndarray:
    """A stand-in extractor: the image downsampled by 4, (n, 32)."""
    return F.avg_pool3d(patches[:, :1], 4).flatten(1).numpy()


@pytest.fixture(scope="module")
def sets():
    return {"train": smooth_patches(64, 0), "heldout": smooth_patches(64, 1), "fresh": smooth_patches(64, 2)}


def test_memorising_generator_is_flagged(sets):
    train = sets["train"]
    picks = torch.randperm(64, generator=torch.Generator().manual_seed(3))[:40]
    copies = train[picks] + 1e-4 * torch.randn(40, 2, *SHAPE, generator=torch.Generator().manual_seed(4),
                                               dtype=torch.float64)
    result = memorisation_audit(copies, train, sets["heldout"], features(copies), features(train),
                                features(sets["heldout"]), top=5)
    for space in ("voxel", "feature"):
        figures = result[space]
        assert figures["fraction_below_heldout_p1"] == 1.0 and figures["n_below"] == 40
        assert len(figures["near_copies"]) == 5
        assert [c["distance"] for c in figures["near_copies"]] == sorted(c["distance"] for c in figures["near_copies"])
        for copy in figures["near_copies"]:
            assert copy["train_index"] == int(picks[copy["generated_index"]])
        assert figures["median_generated_to_train"] < 0.1 * figures["median_heldout_to_train"]
    assert result["voxel"]["channels"] == [0, 1] and result["percentile"] == 1.0


def test_fresh_generator_is_not_flagged(sets):
    result = memorisation_audit(sets["fresh"], sets["train"], sets["heldout"], features(sets["fresh"]),
                                features(sets["train"]), features(sets["heldout"]))
    for space in ("voxel", "feature"):
        figures = result[space]
        assert figures["fraction_below_heldout_p1"] <= 0.1
        assert len(figures["near_copies"]) == figures["n_below"]
        assert figures["median_generated_to_train"] == pytest.approx(figures["median_heldout_to_train"], rel=0.2)


def test_image_channel_only_and_no_heldout(sets):
    train = sets["train"]
    image_only = train.clone()
    image_only[:, 1] = 1 - image_only[:, 1]                       # same images, inverted labels
    result = memorisation_audit(image_only, train, None, channels=(0,))
    assert result["voxel"]["median_generated_to_train"] == 0.0 and result["voxel"]["threshold"] is None
    assert result["voxel"]["near_copies"] == [] and result["feature"] is None
    assert memorisation_audit(image_only, train, None)["voxel"]["min_generated_to_train"] > 0


def test_chunked_equals_unchunked(sets):
    queries, reference = sets["fresh"], sets["train"]
    whole = nearest_distances(queries, reference, chunk=1024)
    for chunk in (1, 7, 64):
        d, i = nearest_distances(queries, reference, chunk=chunk)
        np.testing.assert_array_equal(d, whole[0])
        np.testing.assert_array_equal(i, whole[1])
    flat = queries.flatten(1).numpy()
    brute = np.linalg.norm(flat[:, None] - reference.flatten(1).numpy()[None], axis=-1)
    np.testing.assert_allclose(whole[0], brute.min(axis=1), rtol=1e-12)
    np.testing.assert_array_equal(whole[1], brute.argmin(axis=1))


def test_exclude_self_and_datasets(sets):
    train = sets["train"]
    d, i = nearest_distances(train, train, chunk=5)
    assert (d == 0).all() and (i == np.arange(64)).all()
    d_ex, i_ex = nearest_distances(train, train, chunk=5, exclude_self=True)
    brute = torch.cdist(train.flatten(1), train.flatten(1)).fill_diagonal_(float("inf"))
    np.testing.assert_allclose(d_ex, brute.min(dim=1).values.numpy(), rtol=1e-12)
    assert (i_ex != np.arange(64)).all()
    as_dataset = [train[k].float() for k in range(64)]           # a map-style dataset of (C, X, Y, Z) items
    np.testing.assert_array_equal(nearest_distances(as_dataset, train.float(), chunk=9)[1], np.arange(64))


def test_distributed_shares_equal_single(sets, monkeypatch):
    """Three ranks as threads, all_gather_object faked with a barrier: every rank gets the single report."""
    args = (sets["fresh"][:13], sets["train"], sets["heldout"][:11], features(sets["fresh"][:13]),
            features(sets["train"]), features(sets["heldout"][:11]))
    single = memorisation_audit(*args, percentile=20.0, voxel_chunk=4, chunk=5)
    world, slots, barrier, local = 3, [None] * 3, threading.Barrier(3, timeout=30), threading.local()

    def all_gather_object(obj, world_size):
        slots[local.rank] = obj
        barrier.wait()
        gathered = list(slots)
        barrier.wait()                                    # nobody overwrites a slot before all have read
        return gathered

    def run(rank):
        local.rank = rank
        return memorisation_audit_distributed(*args, percentile=20.0, voxel_chunk=4, chunk=5, rank=rank,
                                              world_size=world)

    monkeypatch.setattr(audit, "_all_gather_object", all_gather_object)
    with ThreadPoolExecutor(world) as pool:
        reports = list(pool.map(run, range(world)))
    assert all(report == single for report in reports)
    assert single["voxel"]["n_below"] > 0                 # the comparison covers near_copies too


def test_shares_concatenate_to_single(sets):
    queries, reference = sets["fresh"][:10], sets["train"]
    whole = nearest_distances(queries, reference, chunk=4)
    parts = [(np.arange(r, 10, 4), *nearest_distances(queries, reference, 4, query_indices=np.arange(r, 10, 4)))
             for r in range(4)]
    d, i = audit._assemble(parts, 10)
    np.testing.assert_array_equal(d, whole[0])
    np.testing.assert_array_equal(i, whole[1])


def test_bad_arguments(sets):
    with pytest.raises(ValueError, match="percentile"):
        memorisation_audit(sets["fresh"], sets["train"], sets["heldout"], percentile=101)
    with pytest.raises(ValueError, match="both generated_feat and train_feat"):
        memorisation_audit(sets["fresh"], sets["train"], sets["heldout"], generated_feat=np.zeros((64, 2)))
    with pytest.raises(ValueError, match="D="):
        nearest_distances(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="chunk"):
        nearest_distances(np.zeros((2, 3)), np.zeros((2, 3)), chunk=0)
    with pytest.raises(ValueError, match="rank 3"):
        memorisation_audit_distributed(sets["fresh"], sets["train"], None, rank=3, world_size=2)


def test_closest_pairs_png(sets, tmp_path):
    train = sets["train"]
    result = memorisation_audit(train[[5, 9]], train, sets["heldout"], top=2)
    path = closest_pairs_png(train[[5, 9]], train, result["voxel"]["near_copies"], tmp_path / "out" / "pairs.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread
    assert imread(path).shape[0] > 300                               # two rows of pairs
    empty = closest_pairs_png(train, train, [], tmp_path / "none.png")
    assert empty.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
