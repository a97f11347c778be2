"""3D U-Net segmenter of the downstream test (Subramaniam et al., Medical Image Analysis 2022).

The paper's utility test trains a U-Net on synthetic (image, label) pairs and measures its Dice
on real TOF-MRA volumes ("train on synthetic, test on real"). This module holds the network and
its loss; tiled inference over whole volumes lives in :mod:`hpc_gan.eval.inference`.

Architecture for ``channels=(c0, c1, c2, c3)`` (levels = ``len(channels)``):

* encoder level ``i``: 2 x [Conv3d k3 p1 (no bias: BatchNorm follows), BatchNorm3d, ReLU],
  then Dropout; MaxPool3d(2) between levels, so the bottleneck (the last level) sees
  ``spatial / 2**(levels - 1)``;
* decoder level ``i`` (from the bottom up): ConvTranspose3d k2 s2 from ``channels[i + 1]`` to
  ``channels[i]`` (learned upsampling, as in MONAI's ``BasicUNet``; no checkerboard risk since
  kernel == stride), concatenation with the encoder's skip, 2 x [Conv3d k3, BatchNorm, ReLU];
* head: Conv3d k1 to ``out_channels``, then a sigmoid, so the output is a probability per voxel.

The default configuration ``UNet3d()`` has 5,601,121 trainable parameters.

Example:
    >>> net = UNet3d(channels=(8, 16, 32, 64))
    >>> prob = net(torch.randn(2, 1, 32, 32, 16))     # (2, 1, 32, 32, 16), in (0, 1)
    >>> soft_dice_loss(prob, (prob > 0.5).float()).shape
    torch.Size([])
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real

import torch
from torch import nn

# Shared validation helpers (one definition for every network in hpc_gan.models).
from hpc_gan.models.gan import _check_positive_int, _is_int

__all__ = ["UNet3d", "soft_dice_loss"]


def _check_channels(channels: object) -> tuple[int, ...]:
    if (
        isinstance(channels, (str, bytes))
        or not isinstance(channels, Sequence)
        or len(channels) < 2
        or not all(_is_int(c) and c > 0 for c in channels)
    ):
        raise ValueError(
            f"channels must be a sequence of at least 2 positive ints (one per level), "
            f"got {channels!r}"
        )
    return tuple(int(c) for c in channels)


def _check_dropout(dropout: object) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    return float(dropout)


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """2 x [Conv3d k3 p1, BatchNorm3d, ReLU]; spatial shape unchanged."""
    layers: list[nn.Module] = []
    for cin in (in_channels, out_channels):
        layers += [
            nn.Conv3d(cin, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class UNet3d(nn.Module):
    """3D U-Net with a sigmoid output, for binary vessel segmentation of TOF-MRA.

    Args:
        in_channels: input channels (1: the TOF-MRA image).
        out_channels: output channels (1: the vessel probability).
        channels: feature channels per level, top to bottom; ``len(channels)`` is the number of
            levels (4 by default, so inputs are halved 3 times).
        dropout: dropout probability after every encoder block (0 disables it).

    Raises:
        ValueError: if an argument is invalid (the message names the parameter), or in
            :meth:`forward` if the input is not 5D with ``in_channels`` channels and every spatial
            size divisible by ``2 ** (len(channels) - 1)``.

    Example:
        >>> net = UNet3d()                                   # 5,601,121 parameters
        >>> net(torch.randn(1, 1, 128, 128, 64)).shape       # doctest: +SKIP
        torch.Size([1, 1, 128, 128, 64])
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.out_channels = _check_positive_int("out_channels", out_channels)
        self.channels = _check_channels(channels)
        self.dropout = _check_dropout(dropout)

        widths = (self.in_channels, *self.channels)
        self.encoder = nn.ModuleList(
            nn.Sequential(_conv_block(cin, cout), _dropout(self.dropout))
            for cin, cout in zip(widths[:-1], widths[1:])
        )
        self.pool = nn.MaxPool3d(kernel_size=2)
        # Decoder modules are stored top to bottom (index i upsamples channels[i + 1] -> [i]).
        self.upsample = nn.ModuleList(
            nn.ConvTranspose3d(self.channels[i + 1], self.channels[i], kernel_size=2, stride=2)
            for i in range(len(self.channels) - 1)
        )
        self.decoder = nn.ModuleList(
            _conv_block(2 * c, c) for c in self.channels[:-1]
        )
        self.head = nn.Conv3d(self.channels[0], self.out_channels, kernel_size=1)

    @property
    def size_divisor(self) -> int:
        """Every spatial size of the input must be a multiple of this (``2 ** (levels - 1)``)."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Voxel-wise probabilities.

        Args:
            x: (B, in_channels, D, H, W), each of D, H, W divisible by :attr:`size_divisor`.

        Returns:
            (B, out_channels, D, H, W) in (0, 1).

        Raises:
            ValueError: naming the shape, if ``x`` does not have that form.
        """
        self._check_input(x)
        skips = []
        for level, block in enumerate(self.encoder):
            if level:
                x = self.pool(x)
            x = block(x)  # (B, channels[level], D / 2**level, ...)
            skips.append(x)
        x = skips.pop()  # the bottleneck
        for level in reversed(range(len(self.decoder))):
            x = self.upsample[level](x)  # (B, channels[level], D / 2**level, ...)
            x = self.decoder[level](torch.cat((skips[level], x), dim=1))
        return torch.sigmoid(self.head(x))  # (B, out_channels, D, H, W)

    def _check_input(self, x: torch.Tensor) -> None:
        shape = tuple(x.shape)
        if x.dim() != 5 or shape[1] != self.in_channels:
            raise ValueError(
                f"UNet3d expects input of shape (B, {self.in_channels}, D, H, W), got {shape}"
            )
        if any(s % self.size_divisor for s in shape[2:]):
            raise ValueError(
                f"UNet3d with {len(self.channels)} levels needs every spatial size divisible by "
                f"{self.size_divisor}, got input shape {shape}; pad or crop the input"
            )


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Soft Dice loss ``1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)``, batch mean.

    Sums run over all non-batch dimensions of each sample. The ``eps`` in the numerator makes a
    sample with an empty target and an empty prediction score a loss of 0, not 1.

    Args:
        prob: (B, C, D, H, W) probabilities in [0, 1], e.g. the output of :class:`UNet3d`.
        target: binary (or soft) mask of the same shape.
        eps: smoothing constant, > 0.

    Returns:
        Scalar tensor in [0, 1], differentiable with respect to ``prob``.

    Raises:
        ValueError: if the shapes differ, the input has no batch dimension, or ``eps <= 0``.

    Example:
        >>> t = torch.zeros(2, 1, 8, 8, 8); t[:, :, 2:6] = 1
        >>> float(soft_dice_loss(t, t)) < 1e-6
        True
    """
    if prob.shape != target.shape or prob.dim() < 2:
        raise ValueError(
            f"prob and target must have the same shape (B, C, D, H, W), "
            f"got {tuple(prob.shape)} and {tuple(target.shape)}"
        )
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    p = prob.flatten(1)  # (B, N)
    t = target.to(prob.dtype).flatten(1)
    dice = (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)  # (B,)
    return (1 - dice).mean()
