"""Node-local decoded cache: a split decoded once per node into compact arrays every process maps.

Without it every rank decodes its share of the HDF5 shards again in every epoch and moves
float32 patches from its DataLoader workers (docs/SCALING.md). With ``data.cache`` set to
``memory`` or ``local_disk`` the first process on a node that opens a split

1. takes the store's lock (``fcntl.flock``: node-local; one process builds, the others wait),
2. checks the shards against the manifest (``data.verify``: once per node, not once per rank),
3. decodes them into a build directory beside the store and renames it into place when whole,

and every process on the node then maps the store read-only (``numpy.load(mmap_mode="r")``:
one copy in the page cache, shared by all). A training rank reads whole batches with one
prefetch thread (:func:`prefetch`; DataLoader workers would only add a hand-over per batch),
evaluation reads single patches, in workers or not. The store is keyed
by the manifest's SHA-256, the split and the image dtype; a store directory with its final name
was renamed there after its ``COMPLETE`` marker was written, so a build that dies half-way
leaves only a ``.build-*`` directory that the next builder removes.

Store ``<base>/hpc_gan-cache-v1-<digest[:16]>-<split>-<dtype>/``:

=============== =================== ======= ===================================================
file            shape               dtype   meaning
=============== =================== ======= ===================================================
``image.npy``   (N, X, Y, Z)        float16 the shards' image in [-1, 1] (or float32, see below)
``label.npy``   (N, X, Y, ⌈Z/8⌉)    uint8   the label's bits along Z (``numpy.packbits``, little)
``subject.npy`` (N,)                bytes   subject id of each patch
``meta.json``                               manifest digest, split, N, patch shape, dtypes
``COMPLETE``                                written last
=============== =================== ======= ===================================================

Precision: float16 keeps 11 significant bits, so a value of [-1, 1] changes by at most 2**-12
(2.4e-4). That is below half the step of a scanner's intensities after min-max scaling whenever
the scaled range spans fewer than 4096 levels (12 bit), and it is exactly the rounding that the
fp16 variants (``sn_mp``, ``c_sn_mp``) apply to each batch anyway: for them the cache changes no
value. fp32 runs that need the shards' values bit for bit set ``data.cache_image_dtype=float32``
(twice the image bytes). Labels are exact.

Batches leave the loader compact (:class:`CompactBatch`) and become float on the rank's device
(:func:`batch_to_device`). The store is removed when the last process on the node that opened
it exits (a registry of process ids beside it), unless ``data.cache_keep`` is set. A job killed
outright (SIGKILL, node failure) cannot remove it: ``$SLURM_TMPDIR`` goes with the job, a
``/dev/shm`` store stays until a later job with the same data reuses and removes it or the
node's epilogue clears ``/dev/shm``.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, get_worker_info

from hpc_gan.data.manifest import Manifest, load_manifest, verify_shards
from hpc_gan.data.shards import open_shard, read_patch
from hpc_gan.errors import DataError, HpcGanError
from hpc_gan.io import fsync_path, write_json_atomic, write_text_atomic

CACHE_MODES = ("none", "memory", "local_disk")
IMAGE_DTYPES = ("float16", "float32")
SHARED_MEMORY = Path("/dev/shm")
COMPLETE = "COMPLETE"
STORE_VERSION = 1


@dataclass(frozen=True)
class CacheSettings:
    """How a split is cached (the ``data.cache*`` config fields).

    Args:
        mode: ``none``, ``memory`` (``/dev/shm``) or ``local_disk``.
        directory: base directory of ``local_disk``; empty = ``$SLURM_TMPDIR``, else the system
            temp directory. Ignored by ``memory``.
        image_dtype: ``float16`` or ``float32``.
        keep: leave the store in place when the last process using it exits.
    """

    mode: str = "none"
    directory: str = ""
    image_dtype: str = "float16"
    keep: bool = False

    def __post_init__(self) -> None:
        if self.mode not in CACHE_MODES:
            raise DataError(f"data.cache '{self.mode}' is unknown; choose one of: {', '.join(CACHE_MODES)}")
        if self.image_dtype not in IMAGE_DTYPES:
            raise DataError(f"data.cache_image_dtype '{self.image_dtype}' is unknown; choose one of: "
                            f"{', '.join(IMAGE_DTYPES)}")

    @classmethod
    def from_config(cls, data) -> "CacheSettings":
        """From a :class:`hpc_gan.config.DataConfig`."""
        return cls(data.cache, data.cache_dir, data.cache_image_dtype, data.cache_keep)

    def base(self) -> Path:
        """The directory the store lives in (created for ``local_disk``).

        Raises:
            DataError: ``memory`` on a system without ``/dev/shm``.
        """
        if self.mode == "memory":
            if not SHARED_MEMORY.is_dir():
                raise DataError(f"data.cache=memory needs {SHARED_MEMORY}, which this system lacks; "
                                "use data.cache=local_disk")
            return SHARED_MEMORY
        base = Path(self.directory or os.environ.get("SLURM_TMPDIR") or tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        return base


class CompactBatch(NamedTuple):
    """A batch as it leaves the loader of a cached split (``len(batch.image)`` patches).

    image: (B, X, Y, Z) float16 (or float32) in [-1, 1];
    label: (B, X, Y, ⌈Z/8⌉) uint8, the label's bits along Z (:func:`unpack_label`).
    """

    image: torch.Tensor
    label: torch.Tensor


def store_bytes(n: int, patch_shape: tuple[int, int, int], image_dtype: str = "float16") -> int:
    """Bytes of a store of ``n`` patches, e.g. 2350 of (128, 128, 64) in float16: 5,236,326,400."""
    x, y, z = patch_shape
    return n * (x * y * z * np.dtype(image_dtype).itemsize + x * y * -(-z // 8))


def pack_label(label: np.ndarray) -> np.ndarray:
    """(..., Z) uint8 in {0, 1} -> (..., ⌈Z/8⌉) uint8: bit k of byte j is voxel 8j + k."""
    return np.packbits(label, axis=-1, bitorder="little")


def unpack_label(packed: torch.Tensor, z: int) -> torch.Tensor:
    """Inverse of :func:`pack_label` on any device: (..., ⌈Z/8⌉) uint8 -> (..., Z) uint8."""
    if packed.device.type == "cpu":  # numpy's C loop: 25x faster than the tensor ops on a CPU
        return torch.from_numpy(np.unpackbits(packed.numpy(), axis=-1, count=z, bitorder="little"))
    return _unpack_bits_on_device(packed, z)


def _unpack_bits_on_device(packed: torch.Tensor, z: int) -> torch.Tensor:
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1                     # (..., ⌈Z/8⌉, 8)
    return bits.flatten(-2)[..., :z]


def batch_to_device(batch, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A loader's batch as (B, 2, X, Y, Z) ``dtype`` on ``device``: image in [-1, 1], label in {0, 1}.

    A :class:`CompactBatch` crosses to the device in its compact dtypes (half the bytes of
    float32, the label an eighth of uint8) and is converted there; a float batch (shards read
    directly) is moved and cast. For float16 batches and float32/float16 training both give the
    same values as casting the float32 patch (one rounding either way); bf16 rounds twice.
    """
    if not isinstance(batch, CompactBatch):
        return batch.to(device, dtype, non_blocking=True)
    image = batch.image.to(device, non_blocking=True)             # (B, X, Y, Z)
    label = unpack_label(batch.label.to(device, non_blocking=True), image.shape[-1])
    out = torch.empty((image.shape[0], 2, *image.shape[1:]), device=image.device, dtype=dtype)
    if out.device.type == "cpu" and dtype == torch.float32:  # numpy converts float16 twice as fast here
        np.copyto(out.numpy()[:, 0], image.numpy())
    else:
        out[:, 0].copy_(image)
    out[:, 1].copy_(label)
    return out


def prefetch(read: Callable[[list[int]], CompactBatch], chunks: list[list[int]], depth: int = 2) -> Iterator[CompactBatch]:
    """``read(chunk)`` of every chunk, in order, by one background thread up to ``depth`` chunks
    ahead. A cached batch is one gather from the page cache (numpy releases the GIL while it
    copies), so a thread overlaps it with the training step without the cost of handing batches
    between processes (docs/BENCHMARKS.md: DataLoader workers deliver less than this)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpc_gan-prefetch") as pool:
        pending = deque(pool.submit(read, chunk) for chunk in chunks[:depth])
        for chunk in chunks[depth:] + [None] * min(depth, len(chunks)):
            batch = pending.popleft().result()
            if chunk is not None:
                pending.append(pool.submit(read, chunk))
            yield batch


# --------------------------------------------------------------------------- the store


def store_dir(manifest: Manifest, split: str, settings: CacheSettings) -> Path:
    return settings.base() / f"hpc_gan-cache-v{STORE_VERSION}-{manifest.digest[:16]}-{split}-{settings.image_dtype}"


@contextlib.contextmanager
def _node_lock(path: Path):
    """Exclusive lock of ``path`` (a lock file) among the processes of this node.

    The lock file may be removed by the holder (the last user cleaning up), so after taking the
    lock we check that the name still refers to the file we locked, and retry otherwise."""
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _alive(user: str) -> bool:
    """Whether the process of a registry entry ``<pid>-<tag>`` still runs (node-local ids)."""
    try:
        os.kill(int(user.split("-")[0]), 0)
    except ValueError:
        return False
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process with this id: alive
        return True
    return True


class NodeCache:
    """One split's store on this node: built once (under the node lock), used by this process.

    Args:
        manifest: the packed dataset's manifest.
        split: the split to cache.
        settings: :class:`CacheSettings` (mode not ``none``).
        verify: how the builder checks the shards first (``full``, ``size``, ``none``).
        workers: processes that decode shards in parallel while building.

    Raises:
        DataError: damaged shards (from the verification), too little free space for the store.
    """

    def __init__(self, manifest: Manifest, split: str, settings: CacheSettings, verify: str = "full",
                 workers: int = 1) -> None:
        self.manifest, self.split, self.settings = manifest, split, settings
        self.path = store_dir(manifest, split, settings)
        self._lock = self.path.with_name(self.path.name + ".lock")
        self._users = self.path.with_name(self.path.name + ".users")
        self._pid = os.getpid()
        self._me = f"{self._pid}-{uuid.uuid4().hex[:8]}"  # one entry per opening (a process may open twice)
        self.built = False
        with _node_lock(self._lock):
            if not (self.path / COMPLETE).is_file():
                self._build(verify, workers)
                self.built = True
            self._users.mkdir(exist_ok=True)
            (self._users / self._me).touch()
        self._released = False
        atexit.register(self.release)

    def _build(self, verify: str, workers: int) -> None:
        # what a killed builder left (we hold the lock: nobody else is building)
        for stale in [*self.path.parent.glob(self.path.name + ".build-*"), self.path]:
            shutil.rmtree(stale, ignore_errors=True)
        verify_shards(self.manifest, self.split, verify)
        shards = self.manifest.shards(self.split)
        n, shape = sum(s.n for s in shards), self.manifest.patch_shape
        need, free = store_bytes(n, shape, self.settings.image_dtype), shutil.disk_usage(self.path.parent).free
        if need > free:
            raise DataError(f"the {self.settings.mode} cache of split '{self.split}' needs {need} bytes in "
                            f"'{self.path.parent}', which has {free} free; set data.cache=local_disk with a larger "
                            "data.cache_dir, or data.cache=none")
        build = self.path.with_name(f"{self.path.name}.build-{self._pid}")
        build.mkdir()
        try:
            self._write(build, shards, n, shape, workers)
        except BaseException:  # an error or an interrupt: leave nothing behind (a kill leaves build-*)
            shutil.rmtree(build, ignore_errors=True)
            raise
        os.replace(build, self.path)
        fsync_path(self.path.parent)

    def _write(self, build: Path, shards: list, n: int, shape: tuple[int, int, int], workers: int) -> None:
        x, y, z = shape
        np.lib.format.open_memmap(build / "image.npy", "w+", self.settings.image_dtype, (n, x, y, z))
        np.lib.format.open_memmap(build / "label.npy", "w+", np.uint8, (n, x, y, -(-z // 8)))
        jobs = [(str(self.manifest.root / s.file), start, str(build))
                for s, start in zip(shards, np.cumsum([0] + [s.n for s in shards]).tolist())]
        subjects = _decode_all(jobs, workers)
        np.save(build / "subject.npy", np.asarray(subjects, dtype="S"))
        for name in ("image.npy", "label.npy", "subject.npy"):
            fsync_path(build / name)
        write_json_atomic(build / "meta.json", {
            "version": STORE_VERSION, "manifest_sha256": self.manifest.digest, "split": self.split, "n": n,
            "patch_shape": list(shape), "image_dtype": self.settings.image_dtype, "label": "packbits-little-z"})
        write_text_atomic(build / COMPLETE, "")

    def release(self) -> None:
        """This process no longer uses the store; the last user on the node removes it (unless kept)."""
        if self._released or os.getpid() != self._pid:  # forked workers never registered
            return
        self._released = True
        with _node_lock(self._lock):
            (self._users / self._me).unlink(missing_ok=True)
            users = [p for p in self._users.iterdir() if _alive(p.name)] if self._users.is_dir() else []
            if users or self.settings.keep:
                return
            shutil.rmtree(self.path, ignore_errors=True)
            shutil.rmtree(self._users, ignore_errors=True)
            self._lock.unlink(missing_ok=True)


def _decode_all(jobs: list[tuple[str, int, str]], workers: int) -> list[bytes]:
    """Decode every (shard, first row, build dir) job; returns the subject ids in row order."""
    if workers <= 1 or len(jobs) == 1:
        parts = [_decode_shard(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            parts = list(pool.map(_decode_shard, *zip(*jobs)))
    return [subject for part in parts for subject in part]


def _decode_shard(shard: str, start: int, build: str) -> list[bytes]:
    """Decode one shard into rows [start, start + n) of the build's arrays (a process of its own
    may run this: each opens the arrays and writes only its rows)."""
    image = np.load(Path(build) / "image.npy", mmap_mode="r+")
    label = np.load(Path(build) / "label.npy", mmap_mode="r+")
    buffer = np.empty((2, *image.shape[1:]), np.float32)
    with open_shard(shard) as f:
        for row in range(f["image"].shape[0]):
            read_patch(f, row, buffer)  # checked: a damaged chunk or impossible values name shard and row
            image[start + row] = buffer[0]                           # float32 -> store dtype
            label[start + row] = pack_label(buffer[1].astype(np.uint8))
        subjects = list(f["subject"][:])
    image.flush()
    label.flush()
    return subjects


# --------------------------------------------------------------------------- reading


class CachedPatchDataset(Dataset):
    """A cached split, read like :class:`~hpc_gan.data.dataset.ShardedPatchDataset`.

    ``dataset[i]`` is the (2, X, Y, Z) float32 patch (image in [-1, 1], label in {0, 1}) that the
    shards give (image rounded to the store's dtype); :meth:`read_batch` gives a whole batch
    as a :class:`CompactBatch` in one read, which is what
    :class:`~hpc_gan.data.dataset.PatchLoader` uses with ``compact=True``.

    Example:
        >>> ds = open_dataset("data/shards", "train", cache=CacheSettings("memory"))
        >>> ds[0].shape, ds.read_batch([3, 1]).image.shape
        (torch.Size([2, 128, 128, 64]), torch.Size([2, 128, 128, 64]))
    """

    def __init__(self, store: NodeCache) -> None:
        self.store = store
        self.manifest = store.manifest
        self.split = store.split
        meta = json.loads((store.path / "meta.json").read_text())
        self._n, self._shape = int(meta["n"]), tuple(meta["patch_shape"])
        self._arrays: dict[str, np.ndarray] = {}
        self._pid = -1

    def __len__(self) -> int:
        return self._n

    @property
    def patch_shape(self) -> tuple[int, int, int]:
        return self._shape

    def _array(self, name: str) -> np.ndarray:
        if self._pid != os.getpid():  # each process maps the files itself
            self._arrays, self._pid = {}, os.getpid()
        if name not in self._arrays:
            self._arrays[name] = np.load(self.store.path / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    def __getitem__(self, index: int) -> torch.Tensor:
        index = int(index)
        if not 0 <= index < self._n:
            raise IndexError(f"patch index {index} out of range [0, {self._n})")
        out = torch.empty((2, *self._shape), dtype=torch.float32)   # (2, X, Y, Z)
        view = out.numpy()
        view[0] = self._array("image")[index]                           # store dtype -> float32
        view[1] = np.unpackbits(self._array("label")[index], axis=-1, count=self._shape[2], bitorder="little")
        return out

    def read_batch(self, indices: list[int]) -> CompactBatch:
        """Patches ``indices`` in that order, compact: one gather per array, straight into shared
        memory inside a DataLoader worker (so handing the batch over copies nothing more)."""
        image, label = self._array("image"), self._array("label")
        if min(indices) < 0 or max(indices) >= self._n:
            raise IndexError(f"patch indices {min(indices)}..{max(indices)} out of range [0, {self._n})")
        out_image = _batch_buffer((len(indices), *image.shape[1:]), image.dtype)
        out_label = _batch_buffer((len(indices), *label.shape[1:]), label.dtype)
        # mode="clip" (indices are checked above): with "raise" numpy gathers into a temporary first
        np.take(image, indices, axis=0, out=out_image.numpy(), mode="clip")
        np.take(label, indices, axis=0, out=out_label.numpy(), mode="clip")
        return CompactBatch(out_image, out_label)

    def batches(self) -> "BatchView":
        """A Dataset whose item ``[i, j, ...]`` is the :class:`CompactBatch` of those indices."""
        return BatchView(self)

    def subject_of(self, index: int) -> str:
        return bytes(self._array("subject")[int(index)]).decode()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"], state["_pid"] = {}, -1
        return state

    def unmap(self) -> None:
        """Drop this process's mappings (the next read maps the files again)."""
        self._arrays = {}

    def close(self) -> None:
        """Unmap the arrays and release this process's use of the store."""
        self.unmap()
        self.store.release()


class BatchView(Dataset):
    """``view[indices]`` = ``dataset.read_batch(indices)`` (for a DataLoader with ``batch_size=None``)."""

    def __init__(self, dataset: CachedPatchDataset) -> None:
        self.dataset = dataset

    def __getitem__(self, indices: list[int]) -> CompactBatch:
        return self.dataset.read_batch(indices)


def _batch_buffer(shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
    """Where a batch is gathered: in shared memory inside a DataLoader worker (the batch travels
    to the main process through it), page-locked when a GPU will receive it (an asynchronous copy
    needs that; PyTorch caches such buffers), else ordinary memory."""
    torch_dtype = torch.from_numpy(np.empty(0, dtype)).dtype
    if get_worker_info() is not None:
        return torch.empty(shape, dtype=torch_dtype).share_memory_()
    return torch.empty(shape, dtype=torch_dtype, pin_memory=torch.cuda.is_available())


# --------------------------------------------------------------------------- opening


def open_dataset(root: str | os.PathLike, split: str = "train", verify: str = "full",
                 cache: CacheSettings | None = None, workers: int = 1):
    """A split of a packed dataset, cached on this node or read from the shards.

    Args:
        root: directory with ``manifest.json`` and the shards.
        split: ``train``, ``val`` or ``test``.
        verify: how the shards are checked (by the builder when cached; a store already built
            on this node was checked when it was built).
        cache: :class:`CacheSettings`; None or mode ``none`` reads the shards directly.
        workers: processes decoding shards when this call builds the store.

    Returns:
        A :class:`CachedPatchDataset` or a :class:`~hpc_gan.data.dataset.ShardedPatchDataset`.

    Raises:
        DataError: see :class:`NodeCache` and ``ShardedPatchDataset``.
    """
    from hpc_gan.data.dataset import ShardedPatchDataset

    if cache is None or cache.mode == "none":
        return ShardedPatchDataset(root, split, verify=verify)
    manifest = load_manifest(root)
    if manifest.count(split) == 0:
        raise DataError(f"split '{split}' of '{root}' holds no patches; pack more subjects into it")
    return CachedPatchDataset(NodeCache(manifest, split, cache, verify, workers))


def open_cached_split(root: str | os.PathLike, split: str, verify: str, cache: CacheSettings,
                      workers: int = 1) -> CachedPatchDataset:
    """:func:`open_dataset` on every rank of a job (a collective when torch.distributed is up):
    each node builds its store once; when any rank fails, every rank raises the first error, so
    none waits forever for a rank that stopped."""
    dataset, error = None, ""
    try:
        dataset = open_dataset(root, split, verify, cache, workers)
    except HpcGanError as exc:
        error = str(exc)
    if dist.is_available() and dist.is_initialized():
        errors = [""] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), "")
    if error:
        if dataset is not None:
            dataset.close()
        raise DataError(error)
    return dataset
