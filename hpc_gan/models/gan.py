"""Generator and critic of the 3D WGANs (Subramaniam et al., Medical Image Analysis 2022).

Both networks are plain :class:`torch.nn.Module` objects: they know nothing about DeepSpeed,
Opacus or distribution, so the same classes serve every variant (gp, dp, sn, sn_mp, c_sn_mp).

The generator maps a latent vector to a two-channel patch: channel 0 is the TOF-MRA image and
channel 1 the vessel label, both in [-1, 1]. The critic maps such a patch to one unbounded score
per sample, returned with shape ``(B,)``.

Example:
    >>> g = Generator(latent_dim=128, ngf=16, patch_shape=(32, 32, 16))
    >>> c = Critic(ndf=16, patch_shape=(32, 32, 16), norm="spectral")
    >>> x = g(g.sample_latent(2))  # (2, 2, 32, 32, 16)
    >>> c(x).shape
    torch.Size([2])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm
from torch.utils.checkpoint import checkpoint

__all__ = [
    "CRITIC_NORMS",
    "INIT_STD",
    "Critic",
    "Generator",
    "count_parameters",
    "init_weights",
    "spectral_norm_buffers",
]

#: Normalisations the critic accepts. "instance": gp and dp; "spectral": sn, sn_mp, c_sn_mp;
#: "group": the differentially private critic (Opacus supports neither BatchNorm nor spectral
#: norm); "none": no normalisation.
CRITIC_NORMS: tuple[str, ...] = ("instance", "spectral", "group", "none")

#: Standard deviation of the N(0, INIT_STD) initialisation of conv and normalisation weights.
INIT_STD = 0.05

_GENERATOR_UPSAMPLINGS = 3  # the generator starts at patch_shape // 8
_CRITIC_DOWNSAMPLINGS = 4  # the critic ends at patch_shape // 16
_LEAKY_SLOPE = 0.2
_MAX_GROUPS = 32
_NORM_TYPES = (nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm3d)


# --------------------------------------------------------------------------- validation


def _is_int(value: object) -> bool:
    # bool is an Integral, but True as a width or patch size is always a mistake.
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_positive_int(name: str, value: object) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_width(name: str, value: object) -> int:
    """Channel widths are halved three times, so they must stay whole down to width / 8."""
    if not _is_int(value) or value < 8 or value % 8:
        raise ValueError(f"{name} must be an int >= 8 divisible by 8, got {value!r}")
    return int(value)


def _check_patch_shape(patch_shape: object) -> tuple[int, int, int]:
    """The critic halves every axis four times, so each must be divisible by 16."""
    factor = 2**_CRITIC_DOWNSAMPLINGS
    if (
        isinstance(patch_shape, (str, bytes))
        or not isinstance(patch_shape, Sequence)
        or len(patch_shape) != 3
        or not all(_is_int(s) and s > 0 and s % factor == 0 for s in patch_shape)
    ):
        raise ValueError(
            f"patch_shape must be 3 positive ints each divisible by {factor}, got {patch_shape!r}"
        )
    return tuple(int(s) for s in patch_shape)  # type: ignore[return-value]


# --------------------------------------------------------------------------- initialisation


def init_weights(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Apply the project's initialisation to every conv and normalisation layer in ``module``.

    Conv3d weights and affine BatchNorm/GroupNorm/InstanceNorm weights are drawn from
    N(0, INIT_STD); their biases are zeroed. Linear layers keep PyTorch's default init. A conv
    under spectral norm has its unnormalised ``original`` weight initialised.

    Args:
        module: the network (or a single layer) to initialise, in place.
        generator: random number generator to draw from; ``None`` uses the global RNG, so
            ``torch.manual_seed`` makes the result reproducible.

    Returns:
        ``module``, for chaining.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv3d):
            _init_tensor(_raw_weight(layer), layer.bias, generator)
        elif isinstance(layer, _NORM_TYPES) and layer.weight is not None:
            _init_tensor(layer.weight, layer.bias, generator)
    return module


def _raw_weight(layer: nn.Module) -> torch.Tensor:
    # Writing to the parametrized `weight` would go through right_inverse; the trainable
    # tensor is `original`.
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


@torch.no_grad()
def _init_tensor(
    weight: torch.Tensor, bias: torch.Tensor | None, generator: torch.Generator | None
) -> None:
    nn.init.normal_(weight, mean=0.0, std=INIT_STD, generator=generator)
    if bias is not None:
        nn.init.zeros_(bias)


# --------------------------------------------------------------------------- utilities


def set_trainable(module: nn.Module, trainable: bool) -> None:
    """Turn ``requires_grad`` of all of ``module``'s parameters on or off (e.g. freeze the critic
    during the generator step)."""
    for p in module.parameters():
        p.requires_grad_(trainable)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters in ``module`` (works on the meta device).

    Args:
        module: any network.
        trainable_only: count only parameters with ``requires_grad``.

    Returns:
        The total number of elements; buffers (BatchNorm running statistics, spectral-norm
        vectors) are never counted.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def spectral_norm_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The power-iteration vectors of every spectral-norm parametrization in ``module``.

    Each rank updates these vectors on its own during training; the trainer uses this to check
    that they agree across ranks or to broadcast them.

    Args:
        module: any network, e.g. a :class:`Critic` built with ``norm="spectral"``.

    Returns:
        ``{name: buffer}`` in ``named_buffers`` order (the same on every rank), e.g.
        ``"net.0.0.parametrizations.weight.0._u"``. The tensors are the live buffers, not copies,
        so in-place collectives update the model. Empty when there is no spectral norm.
    """
    return {
        name: buffer
        for name, buffer in module.named_buffers()
        if name.rsplit(".", 1)[-1] in ("_u", "_v") and ".parametrizations." in f".{name}"
    }


# --------------------------------------------------------------------------- networks


class Generator(nn.Module):
    """DCGAN-style 3D generator producing an image channel and a label channel.

    Latent z (B, latent_dim) -> Linear -> (B, ngf, *patch_shape // 8) -> BatchNorm, ReLU ->
    3 x [nearest Upsample x2, Conv3d k3 halving channels, BatchNorm, ReLU] -> Conv3d k3 to
    ``out_channels`` -> tanh.

    Args:
        latent_dim: length of the N(0, I) latent vector (128 in the paper).
        ngf: channels of the first feature map (512 or 1024 in the paper); divisible by 8.
        patch_shape: output spatial shape (D, H, W), each divisible by 16 so the matching
            critic can downsample it four times.
        out_channels: output channels; 2 = (image, label).

    Raises:
        ValueError: if ``latent_dim``, ``ngf``, ``patch_shape`` or ``out_channels`` is invalid;
            the message names the parameter.

    Example:
        >>> g = Generator(latent_dim=128, ngf=512, patch_shape=(128, 128, 64))
        >>> g(g.sample_latent(4)).shape  # doctest: +SKIP
        torch.Size([4, 2, 128, 128, 64])
    """

    def __init__(
        self,
        latent_dim: int,
        ngf: int,
        patch_shape: tuple[int, int, int],
        out_channels: int = 2,
    ) -> None:
        super().__init__()
        self.latent_dim = _check_positive_int("latent_dim", latent_dim)
        self.ngf = _check_width("ngf", ngf)
        self.patch_shape = _check_patch_shape(patch_shape)
        self.out_channels = _check_positive_int("out_channels", out_channels)
        self.start_shape = tuple(s >> _GENERATOR_UPSAMPLINGS for s in self.patch_shape)
        # Activation checkpointing of the up blocks (train.activation_checkpointing): less memory,
        # one more convolution forward per block in backward. Same results as without.
        self.checkpointing = False

        self.project = nn.Linear(self.latent_dim, self.ngf * math.prod(self.start_shape))
        self.net = nn.Sequential(
            nn.BatchNorm3d(self.ngf),
            nn.ReLU(inplace=True),
            *(self._up_block(self.ngf >> i) for i in range(_GENERATOR_UPSAMPLINGS)),
            nn.Conv3d(self.ngf >> _GENERATOR_UPSAMPLINGS, self.out_channels, 3, 1, 1),
            # tanh matches the [-1, 1] scaling of both the image and the label channel.
            nn.Tanh(),
        )
        init_weights(self)

    @staticmethod
    def _up_block(in_channels: int) -> nn.Sequential:
        # Upsample + conv rather than a transposed conv avoids checkerboard artefacts.
        return nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv3d(in_channels, in_channels // 2, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm3d(in_channels // 2),
            nn.ReLU(inplace=True),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Generate patches.

        Args:
            z: latents of shape (B, latent_dim).

        Returns:
            Patches of shape (B, out_channels, *patch_shape), values in [-1, 1].
        """
        h = self.project(z)  # (B, ngf * s0 * s1 * s2)
        h = h.view(z.shape[0], self.ngf, *self.start_shape)  # (B, ngf, 16, 16, 8) for 128x128x64
        if not (self.checkpointing and torch.is_grad_enabled()):
            return self.net(h)  # (B, out_channels, 128, 128, 64)
        for layer in self.net:
            if isinstance(layer, nn.Sequential):  # an up block: upsample, conv, BatchNorm, ReLU
                # Recompute upsample + conv in backward instead of keeping their large outputs.
                # BatchNorm stays outside: recomputing it would update its running statistics twice.
                h = checkpoint(layer[0:2], h, use_reentrant=False)  # (B, C/2, 2X, 2Y, 2Z)
                h = layer[3](layer[2](h))
            else:
                h = layer(h)
        return h

    def sample_latent(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Draw ``n`` latents from N(0, I).

        Args:
            n: number of latents (>= 0).
            generator: RNG to draw from; ``None`` uses the global RNG. The draw happens on the
                generator's device and is then moved, so a CPU generator gives the same latents
                whatever ``device`` is.
            device: where the latents go; defaults to the device of this module's parameters.
            dtype: defaults to the dtype of this module's parameters (e.g. fp16 under mixed
                precision).

        Returns:
            Tensor of shape (n, latent_dim).

        Raises:
            ValueError: if ``n`` is not a non-negative int.
        """
        if not _is_int(n) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        weight = self.project.weight
        device = torch.device(device) if device is not None else weight.device
        dtype = dtype if dtype is not None else weight.dtype
        draw_device = generator.device if generator is not None else device
        z = torch.randn(n, self.latent_dim, generator=generator, device=draw_device, dtype=dtype)
        return z.to(device)


class Critic(nn.Module):
    """3D WGAN critic: four strided conv blocks and a linear score.

    4 x [Conv3d k3 s2 p1, norm, LeakyReLU(0.2)] with channels in_channels -> ndf/8 -> ndf/4 ->
    ndf/2 -> ndf, then flatten and Linear(ndf * prod(patch_shape // 16) -> 1).

    ``norm`` selects the normalisation (see :data:`CRITIC_NORMS`):

    * ``"instance"``: ``InstanceNorm3d`` without affine parameters (gp, dp).
    * ``"spectral"``: spectral norm on the four convs (not on the Linear), no norm layer
      (sn, sn_mp, c_sn_mp).
    * ``"group"``: ``GroupNorm`` with ``gcd(32, channels)`` groups and affine parameters
      (differentially private training).
    * ``"none"``: nothing.

    Args:
        ndf: channels of the last conv (512 or 1024 in the paper); divisible by 8.
        patch_shape: input spatial shape (D, H, W), each divisible by 16.
        in_channels: input channels; 2 = (image, label).
        norm: one of :data:`CRITIC_NORMS`.

    Raises:
        ValueError: if ``ndf``, ``patch_shape``, ``in_channels`` or ``norm`` is invalid (the
            message names the parameter), or if ``norm="instance"`` and ``patch_shape // 16`` is a
            single voxel, over which instance norm is undefined.

    Example:
        >>> c = Critic(ndf=512, patch_shape=(128, 128, 64), norm="instance")
        >>> c(torch.zeros(4, 2, 128, 128, 64)).shape  # doctest: +SKIP
        torch.Size([4])
    """

    def __init__(
        self,
        ndf: int,
        patch_shape: tuple[int, int, int],
        in_channels: int = 2,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        if norm not in CRITIC_NORMS:
            raise ValueError(f"norm must be one of {list(CRITIC_NORMS)}, got {norm!r}")
        self.ndf = _check_width("ndf", ndf)
        self.patch_shape = _check_patch_shape(patch_shape)
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.norm = norm
        self.end_shape = tuple(s >> _CRITIC_DOWNSAMPLINGS for s in self.patch_shape)
        if norm == "instance" and math.prod(self.end_shape) == 1:
            raise ValueError(
                f"patch_shape {self.patch_shape} leaves one voxel after 4 downsamplings, which "
                "instance norm cannot normalise; use a larger patch_shape or another norm"
            )

        widths = [self.in_channels] + [
            self.ndf >> (_CRITIC_DOWNSAMPLINGS - 1 - i) for i in range(_CRITIC_DOWNSAMPLINGS)
        ]
        self.net = nn.Sequential(*(self._down_block(a, b) for a, b in zip(widths, widths[1:])))
        # Activation checkpointing of the down blocks. Not with spectral norm: recomputing a block
        # would run the power iteration a second time and change the normalised weight.
        self.checkpointing = False
        self.score = nn.Linear(self.ndf * math.prod(self.end_shape), 1)
        init_weights(self)
        if norm == "spectral":
            # Wrapping after init_weights makes the power-iteration vectors match the weights.
            for block in self.net:
                spectral_norm(block[0])

    def _down_block(self, in_channels: int, out_channels: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=2, padding=1),
            self._norm_layer(out_channels),
            # Not in place: Opacus' per-sample hooks and the double backward of the gradient
            # penalty both keep references to these activations.
            nn.LeakyReLU(_LEAKY_SLOPE),
        )

    def _norm_layer(self, channels: int) -> nn.Module:
        if self.norm == "instance":
            return nn.InstanceNorm3d(channels)
        if self.norm == "group":
            # gcd keeps the group count a divisor of the width for any ndf divisible by 8.
            return nn.GroupNorm(math.gcd(_MAX_GROUPS, channels), channels)
        return nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Score patches.

        Args:
            x: patches of shape (B, in_channels, *patch_shape).

        Returns:
            One unbounded score per patch, shape (B,).
        """
        if self.checkpointing and self.norm != "spectral" and torch.is_grad_enabled():
            h = x
            for block in self.net:  # recomputed in backward, the penalty's double backward included
                h = checkpoint(block, h, use_reentrant=False)
        else:
            h = self.net(x)  # (B, ndf, 8, 8, 4) for 128x128x64
        return self.score(h.flatten(1)).squeeze(1)  # (B, 1) -> (B,)
