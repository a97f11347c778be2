"""Published MedicalNet weights: pinned Hub files, fetched once into the Hugging Face cache, verified.

Tencent publishes MedicalNet's checkpoints on the Hugging Face Hub
(``TencentMedicalNet/MedicalNet-Resnet10`` etc.). Each entry of :data:`PRETRAINED` pins one file
to a commit of its repository and to the SHA-256 and size of the Git LFS pointer at that commit,
read from the Hub's commit and file pages (the ``source`` of each entry). :func:`fetch` downloads
with ``huggingface_hub`` into its cache (``$HF_HOME/hub``, or ``$HF_HUB_CACHE``) and refuses a file
of another size or digest (deleting it); :func:`cached_path` finds a fetched file without any
network access, which is what compute nodes without internet need. Nothing is ever fetched
implicitly: evaluation on a compute node only reads the cache.

Not pinned (no LFS pointer seen): ``resnet_18_23dataset.pth`` of MedicalNet-Resnet18. ResNet-34
and deeper use MedicalNet's shortcut type A, which :mod:`hpc_gan.models.resnet3d` does not build.

Example:
    >>> path = fetch("medicalnet_resnet10")                # on a login node, once
    >>> model, identity = build_extractor("medicalnet_resnet10", "medicalnet_resnet10")
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hpc_gan.errors import CheckpointError, ConfigError
from hpc_gan.io import file_sha256

__all__ = ["PRETRAINED", "PretrainedWeights", "cache_location", "cached_path", "fetch", "lookup", "verify"]


@dataclass(frozen=True)
class PretrainedWeights:
    """One pinned checkpoint file on the Hub.

    Attributes:
        name: what users type (``--weights medicalnet_resnet10``).
        architecture: key of :data:`hpc_gan.models.resnet3d.ARCHITECTURES` the file fits.
        repo_id: Hub model repository.
        filename: file in the repository.
        revision: the 40-hex commit the file is fetched from (never a branch: it cannot move).
        sha256: SHA-256 of the file (the LFS pointer's oid).
        size: bytes (the LFS pointer's size), or ``None`` where only a rounded size was on record
            (the SHA-256 is checked all the same).
        source: the Hub page where the pin was read.
    """

    name: str
    architecture: str
    repo_id: str
    filename: str
    revision: str
    sha256: str
    size: int | None
    source: str


def _entry(name: str, architecture: str, repo: str, filename: str, revision: str, sha256: str, size: int | None,
           page: str) -> PretrainedWeights:
    return PretrainedWeights(name, architecture, f"TencentMedicalNet/{repo}", filename, revision, sha256, size,
                             f"https://huggingface.co/TencentMedicalNet/{repo}/{page}")


#: Known weights, by the name users give to ``--weights`` and ``hpc_gan weights fetch``.
PRETRAINED: dict[str, PretrainedWeights] = {w.name: w for w in (
    _entry("medicalnet_resnet10", "medicalnet_resnet10", "MedicalNet-Resnet10", "resnet_10.pth",
           "923db3dc91baf34c4fe10246651c7fe4dc675fee",
           "2824951eaef30e115929b89bec72342380b08d14792bda1449974ac849e497c0", 57_456_599,
           "commit/923db3dc91baf34c4fe10246651c7fe4dc675fee"),
    # The 23-dataset file's pointer was read from its file page at a later commit of the same
    # repository (the upload commit's full hash was not on record), hence this revision; that page
    # rounds the size (57.5 MB), so only the digest is pinned.
    _entry("medicalnet_resnet10_23dataset", "medicalnet_resnet10", "MedicalNet-Resnet10", "resnet_10_23dataset.pth",
           "4a4b0ef72be0ddf85a2c0720e0a4855c8ac0f0a8",
           "afa8055f3e47f4a18239495d92a7abc587902c69c31c743de2b2784653b72605", None,
           "blob/4a4b0ef72be0ddf85a2c0720e0a4855c8ac0f0a8/resnet_10_23dataset.pth"),
    _entry("medicalnet_resnet18", "medicalnet_resnet18", "MedicalNet-Resnet18", "resnet_18.pth",
           "ee59c99e39a995fb8c20f2a2650a66161e2df584",
           "38b3a17444c5c18a795355a868e6a2d9ce9318054067f5373d337f55c0f61da3", 131_992_196,
           "commit/ee59c99e39a995fb8c20f2a2650a66161e2df584"),
    _entry("medicalnet_resnet50", "medicalnet_resnet50", "MedicalNet-Resnet50", "resnet_50.pth",
           "02061bf3be4aefd33724688f16dbcc058cdf1f13",
           "5b6189cafbee2f5604a7279b62bc163365aa6a86a377e1dc260a14275cacbd84", 184_885_051,
           "commit/02061bf3be4aefd33724688f16dbcc058cdf1f13"),
    _entry("medicalnet_resnet50_23dataset", "medicalnet_resnet50", "MedicalNet-Resnet50", "resnet_50_23dataset.pth",
           "7cd767ef5bbc0bf26e691b04bc0d25df6d3cbc4b",
           "ff48a62219073fb977fd3f4ddfb8dc1367f0ec156c8d6f6c37e205bd683a246e", 184_885_051,
           "commit/7cd767ef5bbc0bf26e691b04bc0d25df6d3cbc4b"),
)}


def lookup(name: str) -> PretrainedWeights:
    """The pinned entry of ``name``.

    Raises:
        ConfigError: unknown name; the message lists the known ones.
    """
    if name not in PRETRAINED:
        raise ConfigError(f"unknown pretrained weights {name!r}; known: {', '.join(PRETRAINED)} "
                          "(or give the path of a checkpoint file)")
    return PRETRAINED[name]


def cache_location(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where fetched files live: ``cache_dir``, else huggingface_hub's cache (``$HF_HUB_CACHE``, or
    ``$HF_HOME/hub``, default ``~/.cache/huggingface/hub``)."""
    if cache_dir is not None:
        return Path(cache_dir)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _fetch_hint(weights: PretrainedWeights, cache_dir: str | os.PathLike | None) -> str:
    return (f"run `hpc_gan weights fetch {weights.name}` on a login node with internet access; it fills the "
            f"cache '{cache_location(cache_dir)}' (HF_HOME), which this node must see with the same HF_HOME")


def cached_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The fetched file of ``name`` in the cache, found without any network access.

    The file's digest is not checked here: :func:`hpc_gan.models.resnet3d.build_extractor`
    checks it against the pin when it loads the file.

    Args:
        name: a key of :data:`PRETRAINED`.
        cache_dir: the Hub cache; default :func:`cache_location`.

    Returns:
        Path of the file inside the cache's snapshot of the pinned revision.

    Raises:
        ConfigError: unknown name.
        CheckpointError: not fetched yet; the message says where to run the fetch and where the
            cache lives.
    """
    weights = lookup(name)
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(weights.repo_id, weights.filename, cache_dir=cache_dir,
                                   revision=weights.revision)
    if not isinstance(found, str):  # None, or the "known not to exist" marker
        raise CheckpointError(f"pretrained weights {name} are not in the cache; {_fetch_hint(weights, cache_dir)}")
    return Path(found)


def _delete_cached(path: Path) -> None:
    """Remove a cached file: the snapshot's link and the blob it points to."""
    blob = path.resolve()
    for item in {path, blob}:
        try:
            item.unlink()
        except FileNotFoundError:
            pass


def verify(weights: PretrainedWeights, path: Path) -> None:
    """Check a file's size and SHA-256 against the pin; delete it and raise on a mismatch.

    Raises:
        CheckpointError: one line with both digests (or sizes); the file is gone afterwards.
    """
    size = path.stat().st_size
    if weights.size is not None and size != weights.size:
        _delete_cached(path)
        raise CheckpointError(f"{weights.name}: the fetched {weights.filename} has {size} bytes, the pin at "
                              f"{weights.repo_id}@{weights.revision} says {weights.size}: deleted it; fetch again")
    digest = file_sha256(path)
    if digest != weights.sha256:
        _delete_cached(path)
        raise CheckpointError(f"{weights.name}: the fetched {weights.filename} has SHA-256 {digest}, the pin at "
                              f"{weights.repo_id}@{weights.revision} is {weights.sha256}: deleted it; fetch again "
                              "(a proxy or mirror that alters files, or a changed upload)")


def _check_reachable(weights: PretrainedWeights, cache_dir, endpoint: str | None) -> None:
    """One request, no retries: a node without internet gets one line at once instead of
    huggingface_hub's half a minute of retry warnings."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    url = hf_hub_url(weights.repo_id, weights.filename, revision=weights.revision, endpoint=endpoint)
    try:
        get_hf_file_metadata(url, endpoint=endpoint)
    except HfHubHTTPError:
        return  # the Hub answered: the download below names the problem
    except Exception as exc:  # DNS, no route, proxy, timeout, HF_HUB_OFFLINE: the client's own types vary
        cause = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise CheckpointError(f"cannot reach the Hugging Face Hub to fetch {weights.name} ({cause}); "
                              f"{_fetch_hint(weights, cache_dir)}") from None


def fetch(name: str, cache_dir: str | os.PathLike | None = None, endpoint: str | None = None) -> Path:
    """Download the pinned file of ``name`` into the Hub cache (once) and verify it.

    A file already in the cache is verified without network access.

    Args:
        name: a key of :data:`PRETRAINED`.
        cache_dir: the Hub cache; default :func:`cache_location`.
        endpoint: the Hub's address; default huggingface_hub's (``$HF_ENDPOINT``).

    Returns:
        Path of the verified file in the cache.

    Raises:
        ConfigError: unknown name.
        CheckpointError: the Hub cannot be reached (one line: run the fetch on a login node,
            where the cache lives), the file is not at the pinned revision, or it has another
            size or SHA-256 than the pin (the file is deleted).
    """
    weights = lookup(name)
    try:
        path = cached_path(name, cache_dir)
    except CheckpointError:
        path = _download(weights, cache_dir, endpoint)
    verify(weights, path)
    return path


def _download(weights: PretrainedWeights, cache_dir, endpoint: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                        RevisionNotFoundError)

    _check_reachable(weights, cache_dir, endpoint)
    where = f"{weights.repo_id}/{weights.filename}@{weights.revision}"
    try:
        return Path(hf_hub_download(weights.repo_id, weights.filename, revision=weights.revision,
                                    cache_dir=cache_dir, endpoint=endpoint))
    except LocalEntryNotFoundError:  # the connection dropped after the check
        raise CheckpointError(f"lost the connection to the Hugging Face Hub fetching {where}; "
                              f"{_fetch_hint(weights, cache_dir)}") from None
    except (RemoteEntryNotFoundError, RevisionNotFoundError) as exc:
        raise CheckpointError(f"the Hub has no {where} ({exc.__class__.__name__}); the pin of {weights.name} "
                              "in hpc_gan/models/pretrained.py needs updating") from None
    except HfHubHTTPError as exc:  # e.g. 401/403 through a proxy, 5xx after huggingface_hub's retries
        cause = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise CheckpointError(f"the Hub refused {where}: {cause}; {_fetch_hint(weights, cache_dir)}") from None
