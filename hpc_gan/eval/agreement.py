"""Label–image agreement: does each generated label mark the vessels of its own generated image?

A generated pair is only useful for training a segmenter if its label channel marks the vessels
that its image channel shows. FID, PRD and the label statistics look at each channel's
distribution, not at this pairing; two figures measure it here, each for the generated pairs and
for held-out real pairs (the baseline: what a correct pairing scores at this patch size):

* **Segmenter DSC** (:func:`segmenter_dice`). A reference 3D U-Net is trained on REAL training
  patches to predict the label from the image (:func:`train_reference_segmenter`, cached by
  :func:`reference_segmenter`). Applied to a patch's image and thresholded at 0.5, its
  prediction is compared with the patch's own label: the mean over patches of
  DSC = 2|S ∩ L| / (|S| + |L|). A label that marks its image's vessels scores about what real
  pairs score; a label shifted off them, or taken from another patch, scores lower. A patch whose
  prediction and label are both empty scores 1.0 (nothing to mark and nothing marked: the pair
  agrees; this is :func:`hpc_gan.eval.segmentation.dice`'s convention), one where only one of
  them is empty 0.0.
* **Label contrast** (:func:`label_contrast`). For each patch holding both label and background
  voxels: mean image intensity inside the label − mean intensity outside it, in the image's
  [-1, 1] units (TOF-MRA vessels are bright, so a right label gives a clearly positive
  contrast); the mean over those patches. It needs no trained model, but it only sees
  brightness, not shape.

Each figure's ``ratio`` is generated / real, which a target such as "agreement ≥ 0.8× the real
data's" reads directly.

Example (32×32×16 patches; ``train_set`` yields ``(2, 32, 32, 16)`` tensors, image in [-1, 1]):

    >>> seg = train_reference_segmenter(train_set, steps=300)               # doctest: +SKIP
    >>> figures = agreement_figures(gen_img, gen_lab, real_img, real_lab, seg)  # doctest: +SKIP
    >>> figures["segmenter_dice"]["ratio"]                                  # doctest: +SKIP
    0.93
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

SEGMENTER_VERSION = 1   # part of the cache key: bump when the recipe below changes
THRESHOLD = 0.5


# --------------------------------------------------------------------------- the two figures


def _images_labels(images: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if images.dim() != 4 or images.shape != labels.shape:
        raise ValueError(f"images and labels must both be (N, X, Y, Z) of one shape, got {tuple(images.shape)} "
                         f"and {tuple(labels.shape)}")
    return images.detach().to("cpu", torch.float64), labels.detach().cpu() > 0.5


def per_patch_contrast(images: Any, labels: Any) -> np.ndarray:
    """Mean image inside the label − mean image outside it, per patch (NaN where the label is
    empty or fills the patch).

    Args:
        images: ``(N, X, Y, Z)`` float in [-1, 1] (array or tensor).
        labels: ``(N, X, Y, Z)`` bool (or {0, 1}).

    Returns:
        ``(N,)`` float64.

    Raises:
        ValueError: shapes differ or are not 4-D.
    """
    images, labels = _images_labels(images, labels)
    inside = labels.flatten(1).sum(1)                                         # (N,)
    outside = labels[0].numel() - inside
    total = images.flatten(1).sum(1)
    fg = (images * labels).flatten(1).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        contrast = fg.numpy() / inside.numpy() - (total - fg).numpy() / outside.numpy()
    contrast[(inside == 0).numpy() | (outside == 0).numpy()] = np.nan
    return contrast


def label_contrast(images: Any, labels: Any) -> float:
    """Label contrast: the mean, over patches with both label and background voxels, of
    (mean image inside the label − mean image outside it), in the image's [-1, 1] units.

    Args:
        images: ``(N, X, Y, Z)`` float in [-1, 1], e.g. ``patches[:, 0]`` of ``(N, 2, 32, 32, 16)``.
        labels: ``(N, X, Y, Z)`` bool, e.g. ``patches[:, 1] > 0.5``.

    Returns:
        The contrast (positive where labels mark bright voxels), NaN if no patch has both label
        and background voxels.

    Raises:
        ValueError: shapes differ or are not 4-D.

    Example:
        >>> img = -np.ones((1, 8, 8, 4)); lab = np.zeros((1, 8, 8, 4), bool)
        >>> img[0, 2:4] = lab[0, 2:4] = 1
        >>> label_contrast(img, lab)
        2.0
    """
    return _nanmean(per_patch_contrast(images, labels))


@torch.no_grad()
def per_patch_dice(segmenter: torch.nn.Module, images: Any, labels: Any, batch: int = 8) -> np.ndarray:
    """DSC of the segmenter's prediction (threshold 0.5) on each image against its label.

    Args:
        segmenter: ``(B, 1, X, Y, Z)`` image -> probability model, e.g. :func:`reference_segmenter`'s.
        images: ``(N, X, Y, Z)`` float in [-1, 1].
        labels: ``(N, X, Y, Z)`` bool.
        batch: patches per forward pass.

    Returns:
        ``(N,)`` float64 in [0, 1]; 1.0 where prediction and label are both empty.

    Raises:
        ValueError: shapes differ or are not 4-D, or ``batch < 1``.
    """
    from hpc_gan.eval.segmentation import dice

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    images, labels = _images_labels(images, labels)
    was_training = segmenter.training
    segmenter.eval()
    device = next(segmenter.parameters()).device
    scores = []
    for start in range(0, len(images), batch):
        x = images[start:start + batch, None].to(device, torch.float32)        # (B, 1, X, Y, Z)
        pred = (segmenter(x)[:, 0] >= THRESHOLD).cpu().numpy()
        scores += [dice(p, t) for p, t in zip(pred, labels[start:start + batch].numpy())]
    segmenter.train(was_training)
    return np.asarray(scores, dtype=np.float64)


def segmenter_dice(segmenter: torch.nn.Module, images: Any, labels: Any, batch: int = 8) -> float:
    """Segmenter DSC: the mean over patches of the DSC between the segmenter's prediction on the
    image (threshold 0.5) and the patch's own label; a patch where both are empty counts as 1.0.

    Args:
        segmenter: the reference segmenter (:func:`reference_segmenter`).
        images: ``(N, X, Y, Z)`` float in [-1, 1], e.g. of ``(N, 2, 32, 32, 16)`` patches.
        labels: ``(N, X, Y, Z)`` bool.
        batch: patches per forward pass.

    Returns:
        The mean DSC in [0, 1] (NaN for N = 0).

    Raises:
        ValueError: as :func:`per_patch_dice`.
    """
    return _nanmean(per_patch_dice(segmenter, images, labels, batch))


def agreement_figures(gen_images: Any, gen_labels: Any, real_images: Any, real_labels: Any,
                      segmenter: torch.nn.Module) -> dict:
    """Both figures for generated pairs and for held-out real pairs, and their ratios.

    Args:
        gen_images: ``(N, X, Y, Z)`` generated images in [-1, 1]; gen_labels: their ``(N, X, Y, Z)``
            bool labels.
        real_images: ``(M, X, Y, Z)`` held-out real images; real_labels: their labels.
        segmenter: the reference segmenter, trained on real training patches.

    Returns:
        ``{"segmenter_dice": {"generated", "real", "ratio"}, "contrast": {...}}``, ratio =
        generated / real (NaN where real is 0 or NaN).

    Raises:
        ValueError: as :func:`per_patch_dice`.
    """
    return summarise(per_patch_dice(segmenter, gen_images, gen_labels), per_patch_contrast(gen_images, gen_labels),
                     per_patch_dice(segmenter, real_images, real_labels), per_patch_contrast(real_images, real_labels))


def summarise(gen_dice: np.ndarray, gen_contrast: np.ndarray, real_dice: np.ndarray,
              real_contrast: np.ndarray) -> dict:
    """:func:`agreement_figures`'s dict from per-patch values (e.g. gathered batch by batch)."""
    out = {}
    for name, gen, real in (("segmenter_dice", gen_dice, real_dice), ("contrast", gen_contrast, real_contrast)):
        g, r = _nanmean(gen), _nanmean(real)
        out[name] = {"generated": g, "real": r, "ratio": g / r if np.isfinite(r) and r != 0 else float("nan")}
    return out


def subset_figures(subset, segmenter: torch.nn.Module, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch DSC and contrast of a dataset of ``(2, X, Y, Z)`` patches, ``batch`` patches in
    memory at a time (full-size sets do not fit at once).

    Returns:
        ``(dice, contrast)``, two ``(len(subset),)`` float64 arrays.
    """
    dices, contrasts = [], []
    for start in range(0, len(subset), batch):
        items = torch.stack([subset[i] for i in range(start, min(start + batch, len(subset)))])  # (B, 2, X, Y, Z)
        images, labels = items[:, 0], items[:, 1] > 0.5
        dices.append(per_patch_dice(segmenter, images, labels, batch))
        contrasts.append(per_patch_contrast(images, labels))
    return np.concatenate(dices or [np.empty(0)]), np.concatenate(contrasts or [np.empty(0)])


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


# --------------------------------------------------------------------------- the reference segmenter


def train_reference_segmenter(dataset, *, steps: int = 300, batch: int = 8, lr: float = 1e-3,
                              channels: Sequence[int] = (8, 16, 32), seed: int = 0,
                              device: str | torch.device | None = None) -> torch.nn.Module:
    """A small 3D U-Net trained on real patches to predict the label from the image.

    The TSTR training loop (:func:`hpc_gan.eval.tstr.soft_dice_steps`: Adam, soft Dice) for a
    fixed number of steps, no dropout and no early stopping: a measuring instrument, the same for
    every run it scores. Deterministic for a seed on the CPU (initialisation and batch order are
    seeded; the caller's global RNG state is left as it was). On 32×32×16 patches with one
    intra-op thread on two shared CPU cores: 0.28 s per step at batch 8 (300 steps ≈ 1.5 min) when
    quiet, 239 s for 300 steps at load average 7; 60 steps at batch 4 ≈ 15 s. Two threads on
    cores other jobs keep busy can be many times slower than one.

    Args:
        dataset: REAL training patches, items ``(2, X, Y, Z)``: image in [-1, 1], label in {0, 1}
            (a :class:`~hpc_gan.data.dataset.ShardedPatchDataset` or a ``Subset`` of one); X, Y,
            Z divisible by ``2 ** (len(channels) - 1)``.
        steps: optimiser steps.
        batch: patches per step (at most ``len(dataset)``).
        lr: Adam learning rate.
        channels: the U-Net's feature channels per level.
        seed: initialisation and batch-order seed.
        device: where to train (default CPU).

    Returns:
        The trained :class:`~hpc_gan.models.unet.UNet3d`, in eval mode.

    Raises:
        ValueError: ``steps < 1``, or the U-Net's own argument errors.
        DataError: fewer patches than ``batch``.
    """
    from hpc_gan.eval.tstr import soft_dice_steps
    from hpc_gan.models.unet import UNet3d

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet3d(in_channels=1, out_channels=1, channels=tuple(channels), dropout=0.0).to(device or "cpu")
        for step, loss in soft_dice_steps(model, dataset, steps, batch=batch, lr=lr, seed=seed):
            if step == steps or step % 100 == 0:
                log.debug("reference segmenter step %d: soft Dice loss %.4f", step, loss.item())
    return model.eval()


def reference_segmenter(real_root: str, split: str = "train", *, cache_dir: str | None = None, seed: int = 0,
                        data_cache=None, **train_kwargs) -> tuple[torch.nn.Module, dict]:
    """:func:`train_reference_segmenter` on a packed split, cached on disk.

    The cache file ``<cache_dir>/segmenter-<key>.pt`` (a state dict, written to a temporary name
    and renamed, so concurrent jobs never read half a file) is keyed by the SHA-256 of the data
    manifest's digest, the split and the training settings.

    Args:
        real_root: packed real data (directory with ``manifest.json``).
        split: the split to train on (the real training split).
        cache_dir: directory of cached segmenters; None trains every time.
        seed: see :func:`train_reference_segmenter`.
        **train_kwargs: ``steps``, ``batch``, ``lr``, ``channels``, ``device``.

    Returns:
        ``(segmenter in eval mode, identity)``; identity holds ``key``, ``manifest_digest``,
        ``split``, ``n_patches``, the settings (``steps``, ``batch``, ``lr``, ``channels``,
        ``seed``, ``version``) and ``cached`` (whether it was read from the cache).

    Raises:
        DataError: a missing or malformed dataset, or too few patches for the batch.
        TypeError: an unknown keyword in ``train_kwargs``.
    """
    from hpc_gan.data.dataset import ShardedPatchDataset
    from hpc_gan.models.unet import UNet3d

    dataset = ShardedPatchDataset(real_root, split, verify="size")
    device = train_kwargs.pop("device", None)
    unknown = set(train_kwargs) - {"steps", "batch", "lr", "channels"}
    if unknown:
        raise TypeError(f"reference_segmenter got unknown settings {sorted(unknown)}; use steps, batch, lr, channels")
    settings = {"steps": 300, "batch": 8, "lr": 1e-3, "channels": [8, 16, 32], **train_kwargs, "seed": seed,
                "version": SEGMENTER_VERSION}
    settings["channels"] = [int(c) for c in settings["channels"]]
    key = hashlib.sha256(json.dumps({"manifest": dataset.manifest.digest, "split": split, **settings},
                                    sort_keys=True).encode()).hexdigest()
    identity = {"key": key, "manifest_digest": dataset.manifest.digest, "split": split, "n_patches": len(dataset),
                **settings, "cached": False}
    path = Path(cache_dir) / f"segmenter-{key[:32]}.pt" if cache_dir else None
    if path is not None and path.is_file():
        model = UNet3d(in_channels=1, out_channels=1, channels=tuple(settings["channels"]), dropout=0.0)
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # a damaged cache file is a miss, not a failed evaluation
            log.warning("cached reference segmenter %s is unreadable (%s); training it again", path,
                        exc.__class__.__name__)
        else:
            log.info("reference segmenter from the cache %s", path)
            return model.to(device or "cpu").eval(), {**identity, "cached": True}
    train = {k: settings[k] for k in ("steps", "batch", "lr", "channels")}
    if data_cache is not None and data_cache.mode != "none":  # training reads the split many times
        from hpc_gan.data.cache import open_dataset

        dataset = open_dataset(real_root, split, "none", data_cache)  # checked above (size)
    model = train_reference_segmenter(dataset, seed=seed, device=device, **train)
    if path is not None:
        from hpc_gan.io import torch_save_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        torch_save_atomic({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return model, identity
