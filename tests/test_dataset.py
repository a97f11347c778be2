"""Reading shards: the Dataset, verification, rank shares and the resumable cursor."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from hpc_gan.data.dataset import PatchLoader, RankShare, ShardedPatchDataset
from hpc_gan.errors import DataError

pytestmark = pytest.mark.unit


@pytest.fixture
def copy(packed, tmp_path):
    """A private copy of the packed dataset that a test may damage."""
    return shutil.copytree(packed, tmp_path / "shards")


def test_items_are_two_channel_float_patches(packed):
    ds = ShardedPatchDataset(packed, "train")
    assert len(ds) == 40
    x = ds[len(ds) - 1]
    assert x.shape == (2, 16, 16, 16) and x.dtype == torch.float32
    assert -1 <= float(x[0].min()) and float(x[0].max()) <= 1
    assert set(torch.unique(x[1]).tolist()) <= {0.0, 1.0}
    assert ShardedPatchDataset(packed, "train", with_mask=True)[0].shape == (3, 16, 16, 16)
    with pytest.raises(IndexError):
        ds[40]


def test_checksum_mismatch_is_detected(copy):
    shard = sorted(copy.glob("train-*.h5"))[0]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"shard '.*{shard.name}' checksum does not match"):
        ShardedPatchDataset(copy, "train", verify="full")
    ShardedPatchDataset(copy, "train", verify="size")  # same size: only the full check sees it


def test_truncated_and_missing_shards(copy):
    shards = sorted(copy.glob("train-*.h5"))
    shards[0].write_bytes(shards[0].read_bytes()[:1000])
    with pytest.raises(DataError, match="truncated"):
        ShardedPatchDataset(copy, "train", verify="size")
    with pytest.raises(DataError, match="cannot be opened as HDF5"):  # unverified: fails on first read
        ShardedPatchDataset(copy, "train", verify="none")[0]
    shards[0].unlink()
    ShardedPatchDataset(copy, "val", verify="size")  # other splits stay readable
    with pytest.raises(DataError, match="is missing"):
        ShardedPatchDataset(copy, "train", verify="full")


def test_missing_and_malformed_manifest(copy, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ShardedPatchDataset(tmp_path / "nowhere")
    manifest = copy / "manifest.json"
    good = json.loads(manifest.read_text())
    manifest.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        ShardedPatchDataset(copy)
    manifest.write_text(json.dumps({k: v for k, v in good.items() if k != "splits"}))
    with pytest.raises(DataError, match="malformed: missing splits"):
        ShardedPatchDataset(copy)
    broken = dict(good, splits=dict(good["splits"], test=dict(good["splits"]["test"],
                                                             subjects=good["splits"]["train"]["subjects"][:1])))
    manifest.write_text(json.dumps(broken))
    with pytest.raises(DataError, match="is in both 'train' and 'test'"):
        ShardedPatchDataset(copy)
    manifest.unlink()
    with pytest.raises(DataError, match="no manifest.json"):
        ShardedPatchDataset(copy)
    manifest.write_text(json.dumps(good))
    with pytest.raises(DataError, match="split 'nope' is not in"):
        ShardedPatchDataset(copy, "nope")


@pytest.mark.parametrize("n, world", [(40, 1), (40, 3), (41, 4), (7, 2)])
def test_rank_shares_are_disjoint_complete_and_deterministic(n, world):
    for epoch in (0, 1):
        shares = [RankShare(n, r, world, seed=5).indices(epoch) for r in range(world)]
        joined = np.concatenate(shares)
        assert len(joined) == n and len(set(joined.tolist())) == n
        even = [RankShare(n, r, world, seed=5, even=True).indices(epoch) for r in range(world)]
        assert {len(s) for s in even} == {n // world}
        assert len(set(np.concatenate(even).tolist())) == (n // world) * world
    a, b = RankShare(n, 0, world, 5).indices(0), RankShare(n, 0, world, 5).indices(1)
    assert n < 8 or not np.array_equal(a, b)  # a new permutation each epoch
    np.testing.assert_array_equal(a, RankShare(n, 0, world, 5).indices(0))


def _stream(loader, batches):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == batches:
            return torch.cat(out)


def test_order_independent_of_worker_count(packed):
    ds = ShardedPatchDataset(packed, "train", verify="none")
    a = _stream(PatchLoader(ds, 3, rank=1, world_size=2, seed=0, num_workers=0), 8)
    b = _stream(PatchLoader(ds, 3, rank=1, world_size=2, seed=0, num_workers=2), 8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cursor_resumes_with_the_next_unseen_patch(packed):
    ds = ShardedPatchDataset(packed, "train", verify="none")
    straight = _stream(PatchLoader(ds, 3, rank=0, world_size=2, seed=4), 15)  # crosses 2 epoch ends
    first = PatchLoader(ds, 3, rank=0, world_size=2, seed=4)
    head = _stream(first, 8)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["position"] == 3 * (8 - first.batches_per_epoch())
    resumed = PatchLoader(ds, 3, rank=0, world_size=2, seed=4)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    torch.testing.assert_close(torch.cat([head, _stream(resumed, 7)]), straight, rtol=0, atol=0)
    other = PatchLoader(ds, 3, rank=0, world_size=2, seed=5)
    with pytest.raises(DataError, match="seed was 4 when saved and is 5 now"):
        other.load_state_dict(state)


class _Indices(torch.utils.data.Dataset):
    """Patch i is the number i: what a loader reads is visible."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(index)


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (2, 3)])
def test_cursor_redeals_the_rest_of_the_epoch_on_another_world_size(old, new):
    n, batch = 23, 2
    readers = [PatchLoader(_Indices(n), batch, rank=r, world_size=old, seed=7) for r in range(old)]
    streams = [iter(loader) for loader in readers]
    seen = [int(i) for _ in range(2) for stream in streams for i in next(stream)]  # 2 steps on every rank
    state = json.loads(json.dumps(readers[0].state_dict()))
    assert state["read"] == len(seen) == 2 * batch * old
    resumed = [PatchLoader(_Indices(n), batch, rank=r, world_size=new, seed=7) for r in range(new)]
    for loader in resumed:
        loader.load_state_dict(state)
    rest = [int(i) for loader in resumed for b in loader.epoch_batches() for i in b]
    order = RankShare(n, seed=7).indices(0).tolist()  # the epoch's permutation
    assert sorted(seen) == sorted(order[:len(seen)])           # what was read before is the permutation's head
    assert not set(seen) & set(rest) and len(set(rest)) == len(rest)  # nothing repeated
    assert set(rest) <= set(order[len(seen):])
    assert n - len(seen) - len(rest) < new * batch              # only the epoch's short tail is left out
    assert all(loader.epoch == 1 and loader.state_dict()["read"] == 0 for loader in resumed)


def test_batch_larger_than_share(packed):
    ds = ShardedPatchDataset(packed, "val", verify="none")
    with pytest.raises(DataError, match="fewer than batch size"):
        PatchLoader(ds, batch_size=64, world_size=2)
