"""Feature extraction across ranks and batch sizes, gathering, and the real-statistics cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_gan.dist import free_port, without_launcher_env
from hpc_gan.eval.features import RealStatsCache, extract_features, gather_features, noise_generator
from hpc_gan.models.resnet3d import build_extractor

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "mp"))
from features_ranks import N_PATCHES, tiny_dataset  # noqa: E402

TOL = 1e-6   # convolutions round differently for different batch sizes; features are ~0.1-1


@pytest.fixture(scope="module")
def extractor():
    return build_extractor("medicalnet_resnet10", seed=0)[0]


@pytest.fixture(scope="module")
def dataset():
    return tiny_dataset()


@pytest.fixture(scope="module")
def reference(dataset, extractor):
    return extract_features(dataset, extractor, batch_size=1, seed=3)


@pytest.mark.unit
def test_single_rank_covers_the_dataset_in_order(reference):
    features, indices = reference
    assert features.shape == (N_PATCHES, 512) and features.dtype == np.float64
    assert indices.tolist() == list(range(N_PATCHES)) and indices.dtype == np.int64
    assert np.isfinite(features).all() and features.std() > 0


@pytest.mark.unit
@pytest.mark.parametrize("batch_size", [2, 5, 16])
def test_features_do_not_depend_on_batch_size(dataset, extractor, reference, batch_size):
    features, indices = extract_features(dataset, extractor, batch_size=batch_size, seed=3)
    assert indices.tolist() == reference[1].tolist()
    np.testing.assert_allclose(features, reference[0], rtol=0, atol=TOL)


@pytest.mark.unit
@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_ranks_share_every_index_once_and_reproduce_one_rank(dataset, extractor, reference, world_size):
    shares = [extract_features(dataset, extractor, rank=r, world_size=world_size, batch_size=2, seed=3)
              for r in range(world_size)]
    indices = np.concatenate([i for _, i in shares])
    assert sorted(indices.tolist()) == list(range(N_PATCHES))           # each index exactly once
    for features, share in shares:
        assert features.shape == (len(share), 512)
        assert share.tolist() == sorted(share.tolist())                 # index order within a rank
    merged = gather_features(np.concatenate([f for f, _ in shares]), indices, world_size=1)
    np.testing.assert_allclose(merged, reference[0], rtol=0, atol=TOL)


@pytest.mark.unit
def test_seed_and_channel_change_the_features(dataset, extractor, reference):
    other_seed, _ = extract_features(dataset, extractor, seed=4)
    label, _ = extract_features(dataset, extractor, channel=1, seed=3)
    assert np.abs(other_seed - reference[0]).max() > 1e-4               # the background noise differs
    assert np.abs(label - reference[0]).max() > 1e-3
    with pytest.raises(ValueError, match="channel 2 is not in"):
        extract_features(dataset, extractor, channel=2)
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(dataset, extractor, batch_size=0)


@pytest.mark.unit
def test_noise_generators_are_distinct_per_seed_and_index():
    draws = {(s, i): noise_generator(s, i).initial_seed() for s in range(3) for i in range(3)}
    assert len(set(draws.values())) == 9
    assert noise_generator(1, 2).initial_seed() == noise_generator(1, 2).initial_seed()


@pytest.mark.unit
def test_gather_without_a_process_group_sorts_and_checks(extractor):
    features = np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(gather_features(features, np.array([5, 1, 3]), 1), features[[1, 2, 0]])
    with pytest.raises(ValueError, match="more than one rank"):
        gather_features(features, np.array([1, 1, 2]), 1)
    with pytest.raises(ValueError, match="one row per index"):
        gather_features(features, np.array([1, 2]), 1)
    empty, idx = extract_features(tiny_dataset(2), extractor, rank=2, world_size=3)
    assert empty.shape == (0, 512) and idx.size == 0


# --------------------------------------------------------------------------- statistics cache

@pytest.mark.unit
def test_cache_round_trip_is_atomic(tmp_path):
    cache = RealStatsCache(tmp_path / "cache")
    key = RealStatsCache.key("m" * 64, "e" * 64, "test", 0)
    assert cache.get(key) is None
    rng = np.random.default_rng(0)
    arrays = {"count": np.array(7.0), "sum": rng.normal(size=4), "outer_sum": rng.normal(size=(4, 4))}
    path = cache.put(key, arrays)
    assert path == tmp_path / "cache" / f"{key}.npz" and path.is_file()
    assert os.listdir(tmp_path / "cache") == [path.name]                    # no temporary file left
    loaded = cache.get(key)
    assert set(loaded) == set(arrays)
    for name, value in arrays.items():
        np.testing.assert_array_equal(loaded[name], value)
        assert loaded[name].dtype == np.float64
    cache.put(key, {"count": np.array(8.0)})                                # overwrite
    assert cache.get(key)["count"] == 8.0


@pytest.mark.unit
def test_cache_key_changes_with_every_part():
    base = ("a" * 64, "b" * 64, "test", 0)
    keys = {RealStatsCache.key(*base),
            RealStatsCache.key("c" * 64, *base[1:]),
            RealStatsCache.key(base[0], "d" * 64, *base[2:]),
            RealStatsCache.key(*base[:2], "val", 0),
            RealStatsCache.key(*base[:3], 1)}
    assert len(keys) == 5
    assert RealStatsCache.key(*base) == RealStatsCache.key(*base)
    assert RealStatsCache.key(*base).startswith("test-c0-")


@pytest.mark.unit
def test_cache_rejects_unsafe_keys_and_ignores_damaged_entries(tmp_path, caplog):
    cache = RealStatsCache(tmp_path)
    for bad in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(ValueError, match="cache key"):
            cache.path(bad)
    with pytest.raises(ValueError, match="split"):
        RealStatsCache.key("a", "b", "../train", 0)
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    assert cache.get("broken") is None
    assert "unreadable" in caplog.text


# --------------------------------------------------------------------------- two real ranks

@pytest.mark.multiprocess
@pytest.mark.timeout(130)
def test_two_ranks_gather_the_single_process_features(tmp_path):
    env = without_launcher_env()
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(REPO / "tests" / "mp" / "features_ranks.py"), str(report)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert output.count("OK rank=") == 2, output[-4000:]
    result = json.loads(report.read_text())
    assert result["shape"] == [N_PATCHES, 512] and result["max_abs_diff"] < 1e-5
    assert result["shares"] == [[0, 2, 4, 6], [1, 3, 5]]
    assert result["identity"]["comparable"] is False


@pytest.mark.unit
def test_sharded_patch_dataset_image_and_label_channels(packed, extractor):
    from hpc_gan.data.dataset import ShardedPatchDataset

    ds = ShardedPatchDataset(packed, "train", verify="size")
    n = min(len(ds), 6)
    subset = torch.utils.data.Subset(ds, range(n))
    image, indices = extract_features(subset, extractor, batch_size=4)
    assert image.shape == (n, 512) and indices.tolist() == list(range(n))
    # The dataset's labels are {0, 1}; value_range=(0, 1) makes 0 the background, as for images.
    label, _ = extract_features(subset, extractor, channel=1, value_range=(0.0, 1.0))
    assert np.isfinite(label).all() and np.abs(label - image).max() > 1e-3
