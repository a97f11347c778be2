"""Reading shards for training and evaluation: the Dataset, each rank's share, a resumable loader.

* :class:`ShardedPatchDataset` maps a global patch index to (shard, row) and returns a float
  tensor (2, X, Y, Z): image in [-1, 1] and label in {0, 1}. HDF5 files are opened lazily, once
  per process, so every DataLoader worker has its own handles.
* :class:`RankShare` decides which indices a rank reads in an epoch: a permutation seeded by
  (seed, epoch), dealt round-robin to ranks. Shares are disjoint and together complete; they do
  not depend on the number of DataLoader workers.
* :class:`PatchLoader` iterates a rank's batches epoch after epoch and keeps a cursor
  (epoch, position) with ``state_dict()`` / ``load_state_dict()``, so a resumed run continues
  with the next unseen patch. Over a node-local cache (:mod:`hpc_gan.data.cache`) it can hand
  out compact batches read in one gather each (``compact=True``).
"""

from __future__ import annotations

import bisect
import os
import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hpc_gan.data.cache import prefetch
from hpc_gan.data.manifest import Manifest, load_manifest, verify_shards
from hpc_gan.data.shards import open_shard, read_patch
from hpc_gan.errors import DataError

# Signals that SLURM and submitit use for time limits and preemption: the main process handles
# them (checkpoint at a step boundary); DataLoader workers must not die of them first.
PREEMPTION_SIGNALS = tuple(s for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM))


class ShardedPatchDataset(Dataset):
    """Patches of one split of a packed dataset.

    Args:
        root: directory with ``manifest.json`` and the shards.
        split: ``train``, ``val`` or ``test``.
        verify: ``full`` (SHA-256 of every shard), ``size`` or ``none``; done once here.
        with_mask: also return the brain mask as a third channel (when the dataset has masks).

    Example:
        >>> ds = ShardedPatchDataset("data/shards", "train")
        >>> ds[0].shape
        torch.Size([2, 128, 128, 64])

    Raises:
        DataError: missing or malformed manifest, a missing or changed shard, an empty split.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", verify: str = "full",
                 with_mask: bool = False) -> None:
        self.manifest: Manifest = load_manifest(root)
        self.split = split
        self._shards = self.manifest.shards(split)
        verify_shards(self.manifest, split, verify)
        if with_mask and not self.manifest.has_mask:
            raise DataError(f"'{root}' was packed without brain masks; re-pack with --masks to read them")
        self.with_mask = with_mask
        self._starts = np.cumsum([0] + [s.n for s in self._shards]).tolist()
        if len(self) == 0:
            raise DataError(f"split '{split}' of '{root}' holds no patches; pack more subjects into it")
        self._files: dict[int, object] = {}
        self._pid = -1

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def patch_shape(self) -> tuple[int, int, int]:
        return self.manifest.patch_shape

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, row in shard) of a global index."""
        if not 0 <= index < len(self):
            raise IndexError(f"patch index {index} out of range [0, {len(self)})")
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def __getitem__(self, index: int) -> torch.Tensor:
        shard, row = self.locate(int(index))
        out = torch.empty((len(self._names), *self.patch_shape), dtype=torch.float32)  # (2 or 3, X, Y, Z)
        read_patch(self._file(shard), row, out.numpy(), self._names)  # damage -> DataError naming shard, row
        return out

    @property
    def _names(self) -> tuple[str, ...]:
        return ("image", "label", "mask") if self.with_mask else ("image", "label")

    def subject_of(self, index: int) -> str:
        shard, row = self.locate(int(index))
        value = self._file(shard)["subject"][row]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    def _file(self, shard: int):
        if self._pid != os.getpid():  # a forked worker must not share the parent's HDF5 handles
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = open_shard(self.manifest.root / self._shards[shard].file, self._shards[shard].n,
                                            self._names)
        return self._files[shard]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, -1
        return state

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


class RankShare:
    """Which dataset indices one rank reads in each epoch.

    Args:
        n: dataset size.
        rank, world_size: this rank and the number of ranks.
        seed: with the epoch, seeds the permutation (the same on every rank).
        shuffle: permute each epoch; False keeps index order (evaluation).
        even: give every rank exactly n // world_size indices (training needs equal step counts
            on all ranks; the few left over are seen in other epochs' permutations).
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 even: bool = False) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if even and n < world_size:
            raise DataError(f"{n} patches cannot be shared evenly by {world_size} ranks; pack more data or use fewer ranks")
        self.n, self.rank, self.world_size = n, rank, world_size
        self.seed, self.shuffle, self.even = seed, shuffle, even

    def indices(self, epoch: int, start: int = 0) -> np.ndarray:
        """This rank's indices for an epoch, in reading order.

        Args:
            epoch: with the seed, picks the permutation.
            start: deal only the permutation's entries from this global position on (a run
                resumed mid-epoch on another number of ranks: the first ``start`` patches were
                read before). ``start = p * world_size`` deals exactly what is left after each
                rank has read ``p`` patches, so the same world size gives the same reading order.
        """
        if self.shuffle:
            order = np.random.default_rng(np.random.SeedSequence([self.seed, epoch])).permutation(self.n)
        else:
            order = np.arange(self.n)
        count = (self.n - start) // self.world_size if self.even else self.n
        stop = start + count * self.world_size if self.even else self.n
        return order[start + self.rank:stop:self.world_size]


def _ignore_preemption_signals(_worker_id: int) -> None:
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class PatchLoader:
    """A rank's batches, epoch after epoch, with a resumable cursor.

    The cursor advances when a batch is handed to the caller (not when a worker prefetches it),
    so ``state_dict()`` taken between two steps names exactly the next unseen patch. It is kept
    as (epoch, start, position): the epoch's permutation was dealt to the ranks from global
    position ``start`` and each rank has read ``position`` of its share, so ``start + position
    * world_size`` patches of the epoch are read. A cursor restored with another world size
    re-deals the rest of the epoch from there (no patch repeated or skipped within the epoch,
    except the fewer than ``world_size * batch_size`` left over at its end, as always).

    Example:
        >>> loader = PatchLoader(ds, batch_size=4, rank=0, world_size=2, seed=0)
        >>> batch = next(iter(loader))          # (4, 2, 128, 128, 64)
        >>> state = loader.state_dict()         # {'epoch': 0, 'position': 4, ...}
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, shuffle: bool = True, drop_last: bool = True, compact: bool = False) -> None:
        """``compact``: when the dataset is a cached split, yield its
        :class:`~hpc_gan.data.cache.CompactBatch` batches (convert them with
        :func:`~hpc_gan.data.cache.batch_to_device`), read ahead by a thread of this process
        (``num_workers`` does not apply); other datasets always give float tensors."""
        self.dataset = dataset
        self.compact = compact and hasattr(dataset, "read_batch")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.share = RankShare(len(dataset), rank, world_size, seed, shuffle, even=drop_last)
        if drop_last and len(self.share.indices(0)) < batch_size:
            raise DataError(f"each of {world_size} rank(s) gets {len(self.share.indices(0))} patches per epoch, "
                            f"fewer than batch size {batch_size}; lower train.batch_size or pack more patches")
        self.epoch = 0
        self.start = 0  # global position from which the current epoch was dealt
        self.position = 0

    def batches_per_epoch(self) -> int:
        count = len(self.share.indices(self.epoch))
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def epoch_batches(self) -> Iterator[torch.Tensor]:
        """The remaining batches of the current epoch; then the cursor moves to the next epoch."""
        remaining = self.share.indices(self.epoch, self.start)[self.position:]
        if self.drop_last:
            remaining = remaining[: len(remaining) - len(remaining) % self.batch_size]
        if self.compact:  # the same batches, each one gather from the page cache, read ahead by a thread
            chunks = [remaining[i:i + self.batch_size].tolist() for i in range(0, len(remaining), self.batch_size)]
            batches = iter(prefetch(self.dataset.read_batch, chunks))
        else:
            batches = iter(DataLoader(self.dataset, batch_size=self.batch_size, sampler=remaining.tolist(),
                                      num_workers=self.num_workers, drop_last=False,
                                      pin_memory=torch.cuda.is_available(),
                                      worker_init_fn=_ignore_preemption_signals if self.num_workers else None,
                                      persistent_workers=False))
        try:
            for batch in batches:
                self.position += len(batch.image) if self.compact else len(batch)
                yield batch
        except DataError as exc:  # from a worker, torch puts the worker's traceback into the message
            raise DataError(str(exc).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
        finally:
            # Stop the workers now, not when garbage collection gets to the iterator: they ignore
            # SIGTERM (see _ignore_preemption_signals), so multiprocessing's exit-time terminate()
            # cannot end them, and a job leaving with an error would hang in join() at exit.
            shutdown = getattr(batches, "_shutdown_workers", None) or getattr(batches, "close", None)
            if shutdown is not None:
                shutdown()
        self.epoch += 1
        self.start = self.position = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches forever, epoch after epoch."""
        while True:
            yield from self.epoch_batches()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "position": self.position, "seed": self.share.seed,
                "world_size": self.share.world_size, "n": self.share.n, "batch_size": self.batch_size,
                "read": self.start + self.position * self.share.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Restore a cursor; the data and seed must be those it was saved with. Saved with another
        world size, the rest of the epoch is re-dealt from the first unread patch (``read``)."""
        for key in ("n", "seed"):
            if state[key] != self.state_dict()[key]:
                raise DataError(f"cannot resume the data cursor: {key} was {state[key]} when saved and is "
                                f"{self.state_dict()[key]} now; resume with the same data and train.seed")
        self.epoch = int(state["epoch"])
        start, position = int(state.get("start", 0)), int(state["position"])
        if state["world_size"] == self.share.world_size:
            self.start, self.position = start, position
        else:
            self.start, self.position = start + position * int(state["world_size"]), 0
