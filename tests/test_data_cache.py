"""The node-local decoded cache: exact contents, compact batches, build once, crash safety, cleanup."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from helpers import half_exact_copy
from hpc_gan.data import cache as cache_module
from torch.utils.data import DataLoader

from hpc_gan.data.cache import (CacheSettings, CachedPatchDataset, CompactBatch, batch_to_device, open_dataset,
                                pack_label, prefetch, store_bytes, store_dir, unpack_label)
from hpc_gan.data.dataset import PatchLoader, ShardedPatchDataset
from hpc_gan.data.manifest import load_manifest
from hpc_gan.errors import DataError

pytestmark = pytest.mark.unit


@pytest.fixture
def settings(tmp_path):
    return CacheSettings("local_disk", str(tmp_path / "node"))


def cached(root, settings, split="train", **kwargs) -> CachedPatchDataset:
    return open_dataset(root, split, "full", settings, **kwargs)


def test_label_bits_round_trip_for_any_depth():
    rng = np.random.default_rng(0)
    for z in (8, 12, 16, 5):
        label = (rng.random((3, 4, z)) < 0.3).astype(np.uint8)
        packed = pack_label(label)
        assert packed.shape == (3, 4, -(-z // 8))
        assert np.array_equal(unpack_label(torch.from_numpy(packed), z).numpy(), label)
        # the tensor-op path a GPU takes, run on the CPU here
        assert np.array_equal(cache_module._unpack_bits_on_device(torch.from_numpy(packed), z).numpy(), label)


def test_float32_store_equals_the_shards_and_float16_is_one_rounding(packed, tmp_path):
    shards = ShardedPatchDataset(packed, "train")
    exact = cached(packed, CacheSettings("local_disk", str(tmp_path), "float32"), workers=2)
    half = cached(packed, CacheSettings("local_disk", str(tmp_path), "float16"))
    assert len(exact) == len(half) == len(shards) and exact.patch_shape == shards.patch_shape
    for i in range(len(shards)):
        x = shards[i]
        assert torch.equal(exact[i], x)
        assert torch.equal(half[i][0], x[0].half().float()) and torch.equal(half[i][1], x[1])
        assert float((half[i] - x).abs().max()) <= 2.0 ** -12                # the documented bound
        assert half.subject_of(i) == shards.subject_of(i)
    assert half.manifest.digest == shards.manifest.digest
    for ds in (exact, half):
        ds.close()


def test_compact_batches_leave_in_compact_dtypes_and_convert_to_the_shards_batches(packed, settings):
    exact = half_exact_copy(packed, settings.base() / "half_exact")
    shards, ds = ShardedPatchDataset(exact, "train"), cached(exact, settings)
    plain = list(PatchLoader(shards, 4, rank=1, world_size=2, seed=3, num_workers=1).epoch_batches())
    loader = PatchLoader(ds, 4, rank=1, world_size=2, seed=3, compact=True)
    compact = list(loader.epoch_batches())
    assert len(plain) == len(compact) == 5
    for x, c in zip(plain, compact):
        assert isinstance(c, CompactBatch) and c.image.dtype == torch.float16 and c.label.dtype == torch.uint8
        assert c.image.shape == (4, 16, 16, 16) and c.label.shape == (4, 16, 16, 2)
        assert torch.equal(batch_to_device(c, "cpu", torch.float32), x)       # identical float32 batches
    # the same batches gathered in a DataLoader worker (shared-memory buffers)
    order = loader.share.indices(0)
    chunks = [order[i:i + 4].tolist() for i in range(0, 20, 4)]
    from_worker = list(DataLoader(ds.batches(), batch_size=None, sampler=chunks, num_workers=1))
    assert all(torch.equal(a.image, b.image) and torch.equal(a.label, b.label) for a, b in zip(compact, from_worker))
    # without compact=True (evaluation, tstr) a cached split gives float tensors like the shards
    assert torch.equal(next(iter(PatchLoader(ds, 4, seed=3))), next(iter(PatchLoader(shards, 4, seed=3))))
    ds.close()


def test_prefetch_keeps_order_for_any_length_and_stops_early():
    read = lambda chunk: chunk[0] * 10  # noqa: E731
    for n in (0, 1, 2, 3, 7):
        assert list(prefetch(read, [[i] for i in range(n)])) == [10 * i for i in range(n)]
    batches = prefetch(read, [[i] for i in range(100)])
    assert next(batches) == 0
    batches.close()                                    # a run that stops mid-epoch: the thread ends


def test_resume_continues_with_the_next_unseen_patch(packed, settings):
    ds = cached(packed, settings)
    straight = PatchLoader(ds, 3, seed=5, compact=True)
    expected = [b.image for _, b in zip(range(20), straight)]                  # crosses an epoch end
    first = PatchLoader(ds, 3, seed=5, compact=True)
    seen = [b.image for _, b in zip(range(7), first)]
    resumed = PatchLoader(ds, 3, seed=5, compact=True)
    resumed.load_state_dict(first.state_dict())
    seen += [b.image for _, b in zip(range(13), resumed)]
    assert all(torch.equal(a, b) for a, b in zip(expected, seen))
    ds.close()


def test_built_once_then_reused_without_reading_the_shards(packed, settings, tmp_path):
    copy = shutil.copytree(packed, tmp_path / "copy")
    first = cached(copy, settings)
    assert first.store.built
    for shard in copy.glob("train-*.h5"):  # the store no longer needs the shards
        shard.unlink()
    second = cached(copy, settings)
    assert not second.store.built and torch.equal(second[3], first[3])
    first.close()
    second.close()


def test_damaged_shards_build_nothing(packed, settings, tmp_path):
    copy = shutil.copytree(packed, tmp_path / "copy")
    shard = sorted(copy.glob("train-*.h5"))[0]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum does not match"):
        cached(copy, settings)
    assert not store_dir(load_manifest(copy), "train", settings).exists()


def test_a_build_that_fails_or_dies_leaves_nothing_that_looks_complete(packed, settings, monkeypatch):
    def interrupted(jobs, workers):
        raise KeyboardInterrupt("interrupted mid-build")

    monkeypatch.setattr(cache_module, "_decode_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cached(packed, settings)
    store = store_dir(load_manifest(packed), "train", settings)
    assert not list(store.parent.glob(store.name + "*.npy")) and not store.exists()
    assert not list(store.parent.glob(store.name + ".build-*"))            # an exception cleans up
    monkeypatch.undo()
    # a builder killed by a signal leaves its build directory, and an old store without COMPLETE
    (store.parent / (store.name + ".build-4242")).mkdir()
    (store.parent / (store.name + ".build-4242") / "image.npy").write_bytes(b"half")
    store.mkdir()
    ds = cached(packed, settings)                       # the next process builds it and removes the debris
    assert ds.store.built and (store / "COMPLETE").is_file() and len(ds) == 40
    assert not list(store.parent.glob(store.name + ".build-*"))
    ds.close()


def test_last_user_removes_the_store_unless_kept(packed, settings):
    a, b = cached(packed, settings), cached(packed, settings)
    store = a.store.path
    (store.parent / (store.name + ".users") / "999999999-dead").touch()    # a process that died: not a user
    a.close()
    assert store.is_dir()                               # b still uses it
    b.close()
    assert not store.exists() and not list(store.parent.iterdir())
    kept = CacheSettings(settings.mode, settings.directory, keep=True)
    c = cached(packed, kept)
    c.close()
    assert (c.store.path / "COMPLETE").is_file()


def test_too_little_space_is_refused_with_the_figures(packed, settings, monkeypatch):
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 5, 5))
    need = store_bytes(40, (16, 16, 16))
    with pytest.raises(DataError, match=f"needs {need} bytes in .* which has 5 free; set data.cache=local_disk"):
        cached(packed, settings)


def test_settings_and_bases(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="data.cache 'ram' is unknown"):
        CacheSettings("ram")
    with pytest.raises(DataError, match="data.cache_image_dtype 'int8'"):
        CacheSettings("memory", image_dtype="int8")
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path / "slurm"))
    assert CacheSettings("local_disk").base() == tmp_path / "slurm"
    assert CacheSettings("local_disk", str(tmp_path / "x")).base() == tmp_path / "x"
    monkeypatch.setattr(cache_module, "SHARED_MEMORY", tmp_path / "no_shm")
    with pytest.raises(DataError, match="needs .*no_shm.*use data.cache=local_disk"):
        CacheSettings("memory").base()
    # the paper's split: 2350 patches of 128x128x64, float16 image + packed label
    assert store_bytes(2350, (128, 128, 64)) == 2350 * (2 * 2**20 + 2**17)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_memory_mode_lives_in_shared_memory_and_is_removed(packed):
    ds = cached(packed, CacheSettings("memory"))
    assert str(ds.store.path).startswith("/dev/shm/") and ds[0].shape == (2, 16, 16, 16)
    ds.close()
    assert not ds.store.path.exists()


def test_evaluate_reads_the_real_sets_through_the_cache(packed, tmp_path):
    from hpc_gan.eval.evaluate import load_sets

    exact = CacheSettings("local_disk", str(tmp_path), "float32")
    plain, via_cache = (load_sets(str(packed), str(packed), "train", "test", 6, 0, data_cache=c) for c in (None, exact))
    for a, b in ((plain.real, via_cache.real), (plain.heldout, via_cache.heldout)):
        assert isinstance(b.dataset, CachedPatchDataset) and a.indices == b.indices
        assert all(torch.equal(a[i], b[i]) for i in range(len(a)))
    assert not isinstance(via_cache.generated.dataset, CachedPatchDataset)   # read once: not cached


def test_config_fields_are_validated_and_explained():
    from hpc_gan.config import describe, load_config
    from hpc_gan.errors import ConfigError

    cfg = load_config("sn", overrides=["data.cache=local_disk", "data.cache_dir=/scratch/x", "data.cache_keep=true"])
    assert CacheSettings.from_config(cfg.data) == CacheSettings("local_disk", "/scratch/x", "float16", True)
    assert load_config("sn").data.cache == "none"                          # off unless asked for
    with pytest.raises(ConfigError, match="data.cache"):
        load_config("sn", overrides=["data.cache=ram"])
    keys = {row[0] for row in describe()}
    assert {"data.cache", "data.cache_dir", "data.cache_image_dtype", "data.cache_keep"} <= keys


def test_a_damaged_chunk_is_named_by_shard_and_row_when_the_cache_is_built(packed, settings, tmp_path):
    """With data.verify=size (no checksum of whole files) the build reads every patch through the
    checked reader: the shard's Fletcher-32 chunk checksum names the damaged row (issue 13)."""
    from damage import invert_chunk_bytes

    copy = shutil.copytree(packed, tmp_path / "copy")
    shard = sorted(copy.glob("train-*.h5"))[0]
    invert_chunk_bytes(shard, row=1)
    with pytest.raises(DataError, match=rf"shard '.*{shard.name}' row 1 .*damaged; run .hpc_gan inspect"):
        open_dataset(copy, "train", "size", settings)
    assert not store_dir(load_manifest(copy), "train", settings).exists()
