"""3D ResNet feature extractor in the layout of Tencent MedicalNet (Chen et al., "Med3D", 2019).

The paper's evaluation (Subramaniam et al. 2022) embeds each image patch with a MedicalNet
ResNet-10 and computes FID/PRD on the 512-d globally average-pooled output of ``layer4``. The
modules here carry MedicalNet's names, so its published checkpoints (``resnet_10.pth``,
``resnet_18.pth``, ``resnet_50.pth``) load with ``strict=True``:

* ``conv1`` Conv3d(1, 64, k7, s2, p3, no bias), ``bn1``, ``relu``, ``maxpool`` MaxPool3d(k3, s2, p1);
* ``layer1`` (64, stride 1), ``layer2`` (128, stride 2), ``layer3`` (256, stride 1, dilation 2),
  ``layer4`` (512, stride 1, dilation 4) of :class:`BasicBlock` (resnet10: [1, 1, 1, 1],
  resnet18: [2, 2, 2, 2]) or :class:`Bottleneck` (resnet50: [3, 4, 6, 3], expansion 4);
* a block's ``downsample`` is ``Sequential(Conv3d k1 stride s, BatchNorm3d)`` whenever the stride
  or the width changes (MedicalNet's ``shortcut_type="B"``).

MedicalNet's segmentation head ``conv_seg`` is not built: a checkpoint's ``conv_seg.*`` keys are
ignored. The total stride is 8, so a (B, 1, 32, 32, 16) input reaches ``layer4`` as
(B, 512, 4, 4, 2) and its feature vector is (B, 512).

The MedicalNet weights are not shipped: ``hpc_gan weights fetch medicalnet_resnet10`` downloads
the pinned, digest-checked file into the Hugging Face cache (:mod:`hpc_gan.models.pretrained`),
and ``weights="medicalnet_resnet10"`` then finds it there without network access. Without
weights :func:`build_extractor` returns a fixed-seed random network whose identity says it is not
comparable with published FIDs (its FIDs are only comparable with each other).

Example:
    >>> model, identity = build_extractor("medicalnet_resnet10")          # random, seed 0
    >>> x = medicalnet_normalise(torch.rand(2, 1, 32, 32, 16) * 2 - 1,
    ...                          torch.Generator().manual_seed(0))
    >>> model(x).shape
    torch.Size([2, 512])
    >>> identity["comparable"]
    False
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from hpc_gan.io import file_sha256
from hpc_gan.errors import CheckpointError, ConfigError
from hpc_gan.models import pretrained

__all__ = [
    "ARCHITECTURES",
    "RANDOM_NOTE",
    "BasicBlock",
    "Bottleneck",
    "ResNet3d",
    "build_extractor",
    "build_resnet3d",
    "medicalnet_normalise",
    "state_dict_sha256",
]

#: Extractor names -> (block, blocks per layer), as in MedicalNet's ``models/resnet.py``.
ARCHITECTURES: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "medicalnet_resnet10": ("basic", (1, 1, 1, 1)),
    "medicalnet_resnet18": ("basic", (2, 2, 2, 2)),
    "medicalnet_resnet50": ("bottleneck", (3, 4, 6, 3)),
}

RANDOM_NOTE = "randomly initialised extractor: not comparable with published FIDs"

_WIDTHS = (64, 128, 256, 512)
_STRIDES = (1, 2, 1, 1)
_DILATIONS = (1, 1, 2, 4)  # MedicalNet keeps layer3/4 at 1/8 resolution and dilates instead
_HEAD_PREFIX = "conv_seg."
_PARALLEL_PREFIX = "module."
# BatchNorm's batch counter only matters in training; older checkpoints do not have it.
_OPTIONAL_SUFFIX = ".num_batches_tracked"


# --------------------------------------------------------------------------- network


def _conv3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    # padding = dilation keeps the spatial size at stride 1 for any dilation.
    return nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=dilation,
                     dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3x3 convolutions with a residual connection (ResNet-10/18/34).

    Args:
        in_channels: input width.
        channels: output width (``expansion`` = 1).
        stride: stride of the first convolution.
        dilation: dilation of both convolutions.
        downsample: the shortcut's projection, or ``None`` for the identity.
    """

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3(in_channels, channels, stride, dilation)
        self.bn1 = nn.BatchNorm3d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3(channels, channels, 1, dilation)
        self.bn2 = nn.BatchNorm3d(channels)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    """1x1x1 -> 3x3x3 -> 1x1x1 convolutions with a residual connection (ResNet-50 and deeper).

    Args:
        in_channels: input width.
        channels: width of the inner convolutions; the output is ``channels * 4``.
        stride: stride of the 3x3x3 convolution.
        dilation: dilation of the 3x3x3 convolution.
        downsample: the shortcut's projection, or ``None`` for the identity.
    """

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(channels)
        self.conv2 = _conv3(channels, channels, stride, dilation)
        self.bn2 = nn.BatchNorm3d(channels)
        self.conv3 = nn.Conv3d(channels, channels * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(channels * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


_BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet3d(nn.Module):
    """MedicalNet's 3D ResNet without its segmentation head; ``forward`` returns pooled features.

    Args:
        block: ``"basic"`` or ``"bottleneck"``.
        layers: blocks in ``layer1`` .. ``layer4``, e.g. ``(1, 1, 1, 1)`` for ResNet-10.
        in_channels: input channels (MedicalNet: 1, one MR/CT intensity channel).

    Attributes:
        feature_dim: length of the feature vector, 512 x block expansion (512 or 2048).

    Raises:
        ValueError: unknown ``block`` or a ``layers`` entry below 1.

    Example:
        >>> net = ResNet3d("basic", (1, 1, 1, 1))
        >>> net(torch.zeros(2, 1, 32, 32, 16)).shape
        torch.Size([2, 512])
        >>> net.forward_maps(torch.zeros(2, 1, 32, 32, 16)).shape
        torch.Size([2, 512, 4, 4, 2])
    """

    def __init__(self, block: str, layers: Sequence[int], in_channels: int = 1) -> None:
        super().__init__()
        if block not in _BLOCKS:
            raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {block!r}")
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be 4 block counts >= 1, got {layers!r}")
        block_type = _BLOCKS[block]
        self.conv1 = nn.Conv3d(in_channels, 64, kernel_size=7, stride=(2, 2, 2), padding=(3, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        width = 64
        for i, (n, channels, stride, dilation) in enumerate(zip(layers, _WIDTHS, _STRIDES, _DILATIONS), start=1):
            layer, width = _make_layer(block_type, width, channels, int(n), stride, dilation)
            self.add_module(f"layer{i}", layer)
        self.feature_dim = width

    def forward_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``layer4``'s output.

        Args:
            x: (B, in_channels, X, Y, Z) normalised volumes.

        Returns:
            (B, feature_dim, ceil(X/8), ceil(Y/8), ceil(Z/8)), e.g. (B, 512, 4, 4, 2) for 32x32x16.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, X/4, Y/4, Z/4)
        x = self.layer2(self.layer1(x))                        # (B, 128, X/8, Y/8, Z/8)
        return self.layer4(self.layer3(x))                     # (B, 512, X/8, Y/8, Z/8), dilated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled ``layer4`` features.

        Args:
            x: (B, in_channels, X, Y, Z) normalised volumes (see :func:`medicalnet_normalise`).

        Returns:
            (B, feature_dim): (B, 512) for ResNet-10/18, (B, 2048) for ResNet-50.
        """
        return self.forward_maps(x).mean(dim=(2, 3, 4))


def _make_layer(block_type, in_channels: int, channels: int, n: int, stride: int,
                dilation: int) -> tuple[nn.Sequential, int]:
    out_channels = channels * block_type.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm3d(out_channels),
        )
    blocks = [block_type(in_channels, channels, stride, dilation, downsample)]
    blocks += [block_type(out_channels, channels, 1, dilation) for _ in range(n - 1)]
    return nn.Sequential(*blocks), out_channels


def build_resnet3d(name: str = "medicalnet_resnet10") -> ResNet3d:
    """An untrained :class:`ResNet3d` of a named architecture (PyTorch's default init).

    Args:
        name: one of :data:`ARCHITECTURES`.

    Returns:
        The network in training mode; build it under ``torch.device("meta")`` to count
        parameters without allocating them.

    Raises:
        ConfigError: unknown name; the message lists the known ones.
    """
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown feature extractor {name!r}; choose one of {sorted(ARCHITECTURES)}")
    block, layers = ARCHITECTURES[name]
    return ResNet3d(block, layers)


# --------------------------------------------------------------------------- initialisation


@torch.no_grad()
def _init_random(model: nn.Module, seed: int) -> None:
    """MedicalNet's own init, drawn from one seeded generator in ``model.modules()`` order:
    Kaiming normal (fan_out, ReLU gain) for every conv, BatchNorm weight 1 and bias 0, running
    mean 0 and variance 1 (so in eval mode BatchNorm is the identity)."""
    generator = torch.Generator().manual_seed(int(seed))
    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=generator)
        elif isinstance(module, nn.BatchNorm3d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            module.reset_running_stats()


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A SHA-256 of a state dict that depends only on its contents, not on pickling details.

    The digest covers, in the dict's order, each key, dtype, shape and the tensor's bytes
    (contiguous, on the CPU). Equal weights give equal digests in any process or run.

    Args:
        state_dict: e.g. ``model.state_dict()``.

    Returns:
        64 hex characters.
    """
    digest = hashlib.sha256()
    for key, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, 0-d included
    return digest.hexdigest()


# --------------------------------------------------------------------------- checkpoints


def _read_checkpoint(path: Path, expected_sha256: str | None) -> tuple[dict[str, torch.Tensor], str]:
    if not path.is_file():
        raise CheckpointError(f"feature extractor weights '{path}' not found; give the path of a MedicalNet "
                              "checkpoint (e.g. resnet_10.pth) or leave weights unset for a random extractor")
    sha256 = file_sha256(path)
    if expected_sha256 is not None and sha256 != expected_sha256.lower():
        raise CheckpointError(f"feature extractor weights '{path}' have SHA-256 {sha256}, expected "
                              f"{expected_sha256}: the file is another or a damaged checkpoint; fetch it again")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        # torch's own text is several lines (and suggests weights_only=False, unsafe for foreign files)
        raise CheckpointError(f"cannot read feature extractor weights '{path}' ({exc.__class__.__name__}): it is not "
                              "a PyTorch checkpoint, or a truncated or damaged one; give a MedicalNet .pth file "
                              "(e.g. resnet_10.pth)") from None
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"'{path}' holds no state dict (a mapping of names to tensors, or "
                              "{'state_dict': ...}); is it a MedicalNet checkpoint?")
    return dict(loaded), sha256


def _medicalnet_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DataParallel's ``module.`` and drop the segmentation head ``conv_seg.*``."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(_PARALLEL_PREFIX):
            key = key[len(_PARALLEL_PREFIX):]
        if not key.startswith(_HEAD_PREFIX):
            out[key] = value
    return out


def _check_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path, name: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith(_OPTIONAL_SUFFIX)]
    unexpected = [k for k in state_dict if k not in expected]
    hint = f"is '{path}' a MedicalNet checkpoint of the {name} architecture?"
    if missing:
        raise CheckpointError(f"'{path}' does not fit {name}: missing key '{missing[0]}' "
                              f"({len(missing)} missing in all); {hint}")
    if unexpected:
        raise CheckpointError(f"'{path}' does not fit {name}: unexpected key '{unexpected[0]}' "
                              f"({len(unexpected)} unexpected in all); {hint}")
    for key, value in state_dict.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"'{path}' does not fit {name}: '{key}' has shape {tuple(value.shape)}, "
                                  f"the model's is {tuple(expected[key].shape)}; {hint}")


def _resolve_pinned(name: str, weights: str, expected_sha256: str | None) -> tuple[Path, str, str]:
    """(cached file, its pinned SHA-256, a note naming its source) of a name in ``pretrained.PRETRAINED``."""
    pin = pretrained.lookup(weights)
    if pin.architecture != name:
        raise ConfigError(f"weights {weights} fit {pin.architecture}, not the extractor {name}; "
                          f"pass --extractor {pin.architecture} (or other weights)")
    if expected_sha256 is not None and expected_sha256.lower() != pin.sha256:
        raise CheckpointError(f"--weights-sha256 {expected_sha256} contradicts the pinned SHA-256 {pin.sha256} "
                              f"of {weights}; drop --weights-sha256 (pinned weights are always checked)")
    note = f"MedicalNet weights (Chen et al. 2019): {pin.repo_id}/{pin.filename}@{pin.revision[:7]}"
    return pretrained.cached_path(weights), pin.sha256, note


def build_extractor(name: str = "medicalnet_resnet10", weights: str | os.PathLike | None = None,
                    seed: int = 0, expected_sha256: str | None = None) -> tuple[ResNet3d, dict]:
    """The frozen feature extractor and a record of exactly which one it is.

    ``weights`` may name pinned Hub weights (a key of :data:`hpc_gan.models.pretrained.PRETRAINED`,
    e.g. ``"medicalnet_resnet10"``): the file fetched by ``hpc_gan weights fetch`` is then read from
    the Hugging Face cache, without network access, and its SHA-256 must equal the pin.

    With ``weights``, a MedicalNet checkpoint is loaded: a raw state dict or
    ``{"state_dict": ...}``, keys optionally prefixed ``module.`` (DataParallel), ``conv_seg.*``
    ignored; everything else must match the architecture exactly (BatchNorm's
    ``num_batches_tracked`` may be absent). Without ``weights``, the network is initialised from
    ``torch.Generator().manual_seed(seed)`` as MedicalNet initialises before training (see
    ``_init_random``); such features are deterministic per seed but meaningless for comparison
    with published FIDs.

    Args:
        name: one of :data:`ARCHITECTURES` (the paper uses ``"medicalnet_resnet10"``).
        weights: name of pinned weights, path of a MedicalNet checkpoint, or ``None`` for the
            random extractor.
        seed: seed of the random extractor (ignored with ``weights``).
        expected_sha256: if given, the checkpoint file's SHA-256 must equal it.

    Returns:
        ``(model, identity)``. The model is in eval mode with ``requires_grad=False`` on every
        parameter; ``model(x)`` maps (B, 1, X, Y, Z) to (B, 512) (resnet10/18) or (B, 2048)
        (resnet50). ``identity`` is JSON-ready: ``{"name", "weights" (path or "random"), "seed"
        (None with weights), "sha256" (of the file, or :func:`state_dict_sha256` of the random
        weights), "comparable" (True only with weights), "note"}``.

    Raises:
        ConfigError: unknown ``name``, or pinned weights of another architecture.
        CheckpointError: the weights file is missing (pinned weights: not fetched yet, the
            message says where to fetch them), unreadable, has another SHA-256 than
            ``expected_sha256`` or the pin, or does not fit the architecture (the message names
            the first missing or unexpected key, or the first key whose shape differs).
    """
    # Built on the meta device and materialised uninitialised: every value is then set below,
    # from `seed` or from the file, and PyTorch's default init never draws from the global RNG.
    with torch.device("meta"):
        model = build_resnet3d(name)
    model.to_empty(device="cpu")
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.reset_running_stats()  # a checkpoint may lack num_batches_tracked
    if weights is None:
        _init_random(model, seed)
        identity = {"name": name, "weights": "random", "seed": int(seed),
                    "sha256": state_dict_sha256(model.state_dict()), "comparable": False, "note": RANDOM_NOTE}
    else:
        path, note = Path(weights), "MedicalNet weights (Chen et al. 2019)"
        if str(weights) in pretrained.PRETRAINED:
            path, expected_sha256, note = _resolve_pinned(name, str(weights), expected_sha256)
        raw, sha256 = _read_checkpoint(path, expected_sha256)
        state_dict = _medicalnet_keys(raw)
        _check_keys(model, state_dict, path, name)
        model.load_state_dict(state_dict, strict=True)
        identity = {"name": name, "weights": str(path), "seed": None, "sha256": sha256, "comparable": True,
                    "note": note}
    model.eval()
    model.requires_grad_(False)
    return model, identity


# --------------------------------------------------------------------------- input normalisation


def medicalnet_normalise(image: torch.Tensor, generator: torch.Generator,
                         value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """MedicalNet's input normalisation, with seeded background noise.

    MedicalNet (``datasets/brains18.py``) z-scores each volume with the mean and (population)
    standard deviation of its voxels ``> 0`` and replaces the voxels ``== 0`` with N(0, 1) noise.
    Our patches are min-max scaled to ``value_range`` (default [-1, 1]), so each is first mapped
    to [0, 1] by ``(x - low) / (high - low)``; then:

    * **background** = voxels whose mapped value is ``<= 0``, i.e. ``x <= low``: after min-max
      scaling these are exactly the patch's minimum voxels (for generated patches, tanh outputs
      that saturate at -1). Values below ``low`` are also background (MedicalNet would z-score
      them; our inputs never have them).
    * **foreground** = every other voxel; it is z-scored with its own mean and std (ddof 0).

    The original GAN evaluation drew the noise from NumPy's unseeded global RNG, so its FIDs
    changed from run to run; here it comes from ``generator`` (one draw of ``image.shape``), so
    equal seeds give equal outputs. Degenerate volumes, where MedicalNet would divide by zero,
    are defined too: a volume without foreground becomes pure noise, and a constant foreground
    becomes 0 (std taken as 1).

    Args:
        image: (B, 1, X, Y, Z) patches in ``value_range``.
        generator: seeded RNG for the background noise; the noise is drawn on its device and
            moved to ``image``'s, so a CPU generator gives the same result on any device.
        value_range: (low, high) of the input scaling; ``(0, 1)`` for labels stored in {0, 1}.

    Returns:
        float32 tensor of ``image``'s shape and device.

    Raises:
        ValueError: ``image`` is not (B, 1, X, Y, Z), or ``high <= low``.

    Example:
        >>> x = torch.rand(2, 1, 32, 32, 16) * 2 - 1                # (2, 1, 32, 32, 16) in [-1, 1]
        >>> medicalnet_normalise(x, torch.Generator().manual_seed(0)).shape
        torch.Size([2, 1, 32, 32, 16])
    """
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"image must have shape (B, 1, X, Y, Z), got {tuple(image.shape)}")
    low, high = (float(v) for v in value_range)
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range!r}")
    x = (image.double() - low) / (high - low)                     # (B, 1, X, Y, Z) in [0, 1]
    foreground = x > 0
    n = foreground.sum(dim=(1, 2, 3, 4), keepdim=True)            # (B, 1, 1, 1, 1)
    masked = torch.where(foreground, x, torch.zeros_like(x))
    mean = masked.sum(dim=(1, 2, 3, 4), keepdim=True) / n.clamp(min=1)
    centred = torch.where(foreground, x - mean, torch.zeros_like(x))
    std = (centred.square().sum(dim=(1, 2, 3, 4), keepdim=True) / n.clamp(min=1)).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    noise = torch.randn(image.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return torch.where(foreground, (centred / std).float(), noise.to(image.device))

