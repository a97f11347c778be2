"""The downstream 3D U-Net, its soft Dice loss, and sliding-window inference over whole volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hpc_gan.data.patches import minmax_normalise
from hpc_gan.eval.inference import predict_mask, sliding_window_predict, tile_starts
from hpc_gan.models.gan import count_parameters
from hpc_gan.models.unet import UNet3d, soft_dice_loss

pytestmark = pytest.mark.unit

TINY = (4, 8, 8, 8)


# --------------------------------------------------------------------------- UNet3d


def test_output_shape_and_range():
    torch.manual_seed(0)
    net = UNet3d(channels=(8, 16, 32, 64))
    with torch.no_grad():
        prob = net(torch.randn(2, 1, 32, 32, 16))
    assert prob.shape == (2, 1, 32, 32, 16)
    assert float(prob.min()) > 0 and float(prob.max()) < 1


def _conv(cin, cout, k, bias=False):
    return cin * cout * k**3 + (cout if bias else 0)


def _block(cin, cout):  # 2 x [conv (no bias), BN (weight + bias)]
    return _conv(cin, cout, 3) + 2 * cout + _conv(cout, cout, 3) + 2 * cout


def test_default_parameter_count_on_meta():
    with torch.device("meta"):
        net = UNet3d()
    ch = (32, 64, 128, 256)
    widths = (1, *ch)
    expected = sum(_block(a, b) for a, b in zip(widths[:-1], widths[1:]))
    expected += sum(_conv(ch[i + 1], ch[i], 2, bias=True) + _block(2 * ch[i], ch[i])
                    for i in range(3))
    expected += _conv(ch[0], 1, 1, bias=True)
    assert count_parameters(net) == expected == 5_601_121


def test_forward_rejects_indivisible_shape():
    net = UNet3d(channels=TINY)
    with pytest.raises(ValueError, match=r"divisible by 8.*\(1, 1, 16, 16, 12\)"):
        net(torch.zeros(1, 1, 16, 16, 12))
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        net(torch.zeros(1, 2, 16, 16, 16))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"in_channels": 0}, "in_channels"),
        ({"out_channels": 1.5}, "out_channels"),
        ({"channels": (8,)}, "channels"),
        ({"channels": (8, 0)}, "channels"),
        ({"channels": "abc"}, "channels"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
    ],
)
def test_invalid_arguments_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        UNet3d(**kwargs)


# --------------------------------------------------------------------------- soft Dice


def test_soft_dice_loss_limits():
    t = torch.zeros(2, 1, 8, 8, 8)
    t[:, :, 2:6, 2:6] = 1
    assert float(soft_dice_loss(t, t)) == pytest.approx(0, abs=1e-6)
    empty = torch.zeros_like(t)
    assert float(soft_dice_loss(empty, empty)) == pytest.approx(0, abs=1e-6)
    assert float(soft_dice_loss(1 - t, t)) == pytest.approx(1, abs=1e-6)


def test_soft_dice_loss_is_per_sample_mean():
    t = torch.zeros(2, 1, 4, 4, 4)
    t[:, :, :2] = 1
    p = t.clone()
    p[1] = 1 - t[1]  # sample 0 perfect, sample 1 disjoint
    assert float(soft_dice_loss(p, t)) == pytest.approx(0.5, abs=1e-6)


def test_soft_dice_loss_is_differentiable():
    logits = torch.zeros(1, 1, 4, 4, 4, requires_grad=True)
    target = (torch.rand(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    soft_dice_loss(torch.sigmoid(logits), target).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert float(logits.grad.abs().sum()) > 0


def test_soft_dice_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        soft_dice_loss(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 2))


def _tube_task(batch: int = 4, shape=(16, 16, 8)):
    """A bright tube along z at a random (x, y) in noise, and its mask."""
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    masks = torch.zeros(batch, 1, *shape)
    for b in range(batch):
        cx, cy = torch.randint(4, shape[0] - 4, (2,), generator=g).tolist()
        disk = ((xs - cx) ** 2 + (ys - cy) ** 2) <= 4
        masks[b, 0] = disk[..., None].float().expand(shape)
    images = masks + 0.3 * torch.randn(masks.shape, generator=g)
    return images, masks


def test_few_steps_reduce_dice_loss():
    torch.manual_seed(0)
    images, masks = _tube_task()
    net = UNet3d(channels=(4, 8, 16), dropout=0.0)  # 3 levels: fast on a shared CPU
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    losses = []
    for _ in range(10):  # seeds 0-2 all end 0.08-0.19 below the start
        loss = soft_dice_loss(net(images), masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


# --------------------------------------------------------------------------- sliding window


class Pointwise(nn.Module):
    """A 1x1x1 conv + sigmoid: receptive field of one voxel, so tiling cannot change a value."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 1, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.fill_(0.7)
            self.conv.bias.fill_(-0.2)

    def forward(self, x):
        return torch.sigmoid(self.conv(x))


class HalfShift(nn.Module):
    """Maps a [-1, 1] tile to [0, 1] unchanged otherwise: exposes the tile normalisation."""

    def forward(self, x):
        return ((x + 1) / 2).clamp(0, 1)


class Ones(nn.Module):
    def forward(self, x):
        return torch.ones_like(x)


def _volume(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _whole(model, volume):
    with torch.no_grad():
        return model(torch.from_numpy(volume)[None, None].float())[0, 0].numpy()


def test_tile_starts():
    assert tile_starts(10, 4, 0.5) == [0, 2, 4, 6]
    assert tile_starts(9, 4, 0.0) == [0, 4, 5]
    assert tile_starts(8, 4, 0.0) == [0, 4]
    assert tile_starts(3, 4, 0.5) == [0]
    assert tile_starts(5, 1, 0.9) == [0, 1, 2, 3, 4]  # stride never 0


@pytest.mark.parametrize(
    "shape, patch, overlap",
    [
        ((16, 16, 8), (8, 8, 4), 0.0),  # exactly divisible, no overlap
        ((16, 16, 8), (8, 8, 4), 0.5),
        ((19, 13, 7), (8, 8, 4), 0.5),  # non-divisible: last tile flush, cropped back
        ((5, 6, 3), (8, 8, 4), 0.5),  # smaller than the patch: padded
        ((20, 5, 9), (8, 8, 4), 0.25),  # mixed
    ],
)
@pytest.mark.parametrize("weighting", ["uniform", "gaussian"])
def test_tiled_equals_whole_for_pointwise_model(shape, patch, overlap, weighting):
    model, volume = Pointwise(), _volume(shape)
    prob = sliding_window_predict(model, volume, patch, overlap=overlap, batch_size=3,
                                  normalise=False, weighting=weighting)
    assert prob.shape == shape and prob.dtype == np.float32
    np.testing.assert_allclose(prob, _whole(model, volume), atol=1e-6)


def test_accepts_tensor_and_restores_training_mode():
    model = Pointwise().train()
    volume = _volume((9, 9, 5))
    prob = sliding_window_predict(model, torch.from_numpy(volume), (4, 4, 4), normalise=False)
    np.testing.assert_allclose(prob, _whole(model, volume), atol=1e-6)
    assert model.training


@pytest.mark.parametrize("shape", [(16, 16, 8), (19, 13, 7), (3, 20, 2)])
def test_every_voxel_covered(shape):
    prob = sliding_window_predict(Ones(), _volume(shape), (8, 8, 4), overlap=0.5)
    np.testing.assert_array_equal(prob, np.ones(shape, np.float32))


@pytest.mark.parametrize("shape", [(8, 8, 4), (5, 7, 3)])  # one tile: exact, and padded
def test_single_tile_is_minmax_normalised(shape):
    volume = _volume(shape) * 50 + 300
    prob = sliding_window_predict(HalfShift(), volume, (8, 8, 4))
    np.testing.assert_allclose(prob, (minmax_normalise(volume) + 1) / 2, atol=1e-6)


def test_normalisation_is_per_tile():
    # Two tiles along x with no overlap; each must be scaled by its own range.
    volume = np.concatenate([_volume((4, 4, 4), 1), _volume((4, 4, 4), 2) * 10 + 5])
    prob = sliding_window_predict(HalfShift(), volume, (4, 4, 4), overlap=0.0)
    expected = np.concatenate([(minmax_normalise(volume[:4]) + 1) / 2,
                               (minmax_normalise(volume[4:]) + 1) / 2])
    np.testing.assert_allclose(prob, expected, atol=1e-6)


def test_unet_end_to_end_on_volume():
    torch.manual_seed(0)
    net = UNet3d(channels=TINY)
    prob = sliding_window_predict(net, _volume((20, 18, 10)), (16, 16, 8), overlap=0.5)
    assert prob.shape == (20, 18, 10)
    assert ((prob > 0) & (prob < 1)).all()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"patch_shape": (8, 8)}, "patch_shape"),
        ({"patch_shape": (8, 0, 4)}, "patch_shape"),
        ({"overlap": 1.0}, "overlap"),
        ({"overlap": -0.1}, "overlap"),
        ({"batch_size": 0}, "batch_size"),
        ({"weighting": "cosine"}, "weighting"),
    ],
)
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sliding_window_predict(Ones(), _volume((8, 8, 4)), **{"patch_shape": (8, 8, 4), **kwargs})


def test_rejects_non_3d_volume_and_bad_model_output():
    with pytest.raises(ValueError, match="3D"):
        sliding_window_predict(Ones(), np.zeros((8, 8)), (8, 8, 4))

    class TwoChannels(nn.Module):
        def forward(self, x):
            return x.repeat(1, 2, 1, 1, 1)

    with pytest.raises(ValueError, match="model output"):
        sliding_window_predict(TwoChannels(), _volume((8, 8, 4)), (8, 8, 4))


def test_predict_mask():
    prob = np.array([[[0.2, 0.5, 0.51]]], dtype=np.float32)
    mask = predict_mask(prob)
    assert mask.dtype == bool and mask.tolist() == [[[False, False, True]]]
    assert predict_mask(torch.from_numpy(prob), threshold=0.1).all()
    with pytest.raises(ValueError, match="threshold"):
        predict_mask(prob, threshold=1.5)
