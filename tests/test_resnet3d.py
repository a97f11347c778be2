"""The MedicalNet-layout 3D ResNet: architecture, checkpoint loading, random init, normalisation."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from helpers import medicalnet_model as _medicalnet_model
from helpers import save_medicalnet as _save_medicalnet
from hpc_gan.errors import CheckpointError, ConfigError
from hpc_gan.models.gan import count_parameters
from hpc_gan.models.resnet3d import (
    ARCHITECTURES,
    RANDOM_NOTE,
    build_extractor,
    build_resnet3d,
    medicalnet_normalise,
    state_dict_sha256,
)

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------- architecture

def _conv(cin, cout, k):
    return cin * cout * k ** 3          # no bias anywhere in MedicalNet's ResNets


def _bn(c):
    return 2 * c                        # weight + bias (running stats are buffers)


def _expected_parameters(block: str, layers) -> int:
    """Parameter count written out from MedicalNet's resnet.py, independently of the module."""
    total = _conv(1, 64, 7) + _bn(64)                                   # conv1, bn1
    cin, expansion = 64, (1 if block == "basic" else 4)
    for n, width, stride in zip(layers, (64, 128, 256, 512), (1, 2, 1, 1)):
        cout = width * expansion
        for b in range(n):
            if block == "basic":
                total += _conv(cin, width, 3) + _bn(width) + _conv(width, width, 3) + _bn(width)
            else:
                total += (_conv(cin, width, 1) + _bn(width) + _conv(width, width, 3) + _bn(width)
                          + _conv(width, cout, 1) + _bn(cout))
            if b == 0 and (stride != 1 or cin != cout):
                total += _conv(cin, cout, 1) + _bn(cout)                  # downsample (shortcut B)
            cin = cout
    return total


@pytest.mark.parametrize("name, expected", [
    # resnet10: 21,952 + 128 (stem) + 221,440 + 672,512 + 2,688,512 + 10,750,976 (layer1..4)
    ("medicalnet_resnet10", 14_355_520),
    ("medicalnet_resnet18", 33_160_000),
    ("medicalnet_resnet50", 46_155_072),
])
def test_parameter_counts_match_the_architecture(name, expected):
    with torch.device("meta"):
        model = build_resnet3d(name)
    assert _expected_parameters(*ARCHITECTURES[name]) == expected
    assert count_parameters(model) == expected


def test_resnet18_layer_shapes_follow_medicalnet():
    with torch.device("meta"):
        model = build_resnet3d("medicalnet_resnet18")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["conv1.weight"] == (64, 1, 7, 7, 7)
    assert shapes["layer1.1.conv2.weight"] == (64, 64, 3, 3, 3)
    assert shapes["layer2.0.conv1.weight"] == (128, 64, 3, 3, 3)
    assert shapes["layer2.0.downsample.0.weight"] == (128, 64, 1, 1, 1)
    assert shapes["layer2.0.downsample.1.running_var"] == (128,)
    assert shapes["layer3.0.downsample.0.weight"] == (256, 128, 1, 1, 1)
    assert shapes["layer4.1.conv2.weight"] == (512, 512, 3, 3, 3)
    assert "layer1.0.downsample.0.weight" not in shapes          # same width, stride 1: identity
    assert "layer4.2.conv1.weight" not in shapes and not any(k.startswith("conv_seg") for k in shapes)
    # layer2 strides, layer3/4 keep the resolution and dilate (2, 4) with matching padding.
    assert model.conv1.stride == (2, 2, 2) and model.conv1.padding == (3, 3, 3)
    assert model.maxpool.kernel_size == 3 and model.maxpool.stride == 2 and model.maxpool.padding == 1
    assert model.layer2[0].conv1.stride == (2, 2, 2) and model.layer2[0].downsample[0].stride == (2, 2, 2)
    for layer, dilation in ((model.layer3, 2), (model.layer4, 4)):
        for conv in (layer[0].conv1, layer[1].conv2):
            assert conv.stride == (1, 1, 1) and conv.dilation == (dilation,) * 3 and conv.padding == (dilation,) * 3


def test_resnet50_uses_bottlenecks_with_expansion_four():
    with torch.device("meta"):
        model = build_resnet3d("medicalnet_resnet50")
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert tuple(model.layer1[0].downsample[0].weight.shape) == (256, 64, 1, 1, 1)
    assert tuple(model.layer4[0].conv3.weight.shape) == (2048, 512, 1, 1, 1)
    assert model.layer4[0].conv2.dilation == (4, 4, 4)
    assert model.feature_dim == 2048


@pytest.mark.parametrize("name, dim", [("medicalnet_resnet10", 512), ("medicalnet_resnet18", 512),
                                       ("medicalnet_resnet50", 2048)])
def test_output_shapes(name, dim):
    model, _ = build_extractor(name)
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        assert model.forward_maps(x).shape == (2, dim, 4, 4, 2)   # total stride 8
        features = model(x)
    assert features.shape == (2, dim) and features.dtype == torch.float32
    assert torch.isfinite(features).all()


def test_unknown_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match="medicalnet_resnet10"):
        build_extractor("resnet10")


# --------------------------------------------------------------------------- MedicalNet checkpoints

def test_medicalnet_checkpoint_loads_and_reproduces_features(tmp_path):
    source = _medicalnet_model()
    path = _save_medicalnet(source, tmp_path / "resnet_10.pth")
    assert any(k.startswith("module.conv_seg.") for k in torch.load(path)["state_dict"])
    model, identity = build_extractor("medicalnet_resnet10", weights=path)
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        expected = source.layer4(source.layer3(source.layer2(source.layer1(
            source.maxpool(source.relu(source.bn1(source.conv1(x)))))))).mean(dim=(2, 3, 4))
        assert torch.equal(model(x), expected)
    assert identity == {"name": "medicalnet_resnet10", "weights": str(path), "seed": None,
                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "comparable": True,
                        "note": identity["note"]}
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_raw_state_dict_without_prefix_or_batch_counters_loads(tmp_path):
    source = _medicalnet_model(seed=2)
    path = _save_medicalnet(source, tmp_path / "raw.pth", wrap=False, prefix="", drop=("num_batches_tracked",))
    model, _ = build_extractor(weights=path)
    assert torch.equal(model.layer4[0].bn2.running_var, source.layer4[0].bn2.running_var)


def test_expected_sha256_is_checked(tmp_path):
    path = _save_medicalnet(_medicalnet_model(), tmp_path / "resnet_10.pth")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert build_extractor(weights=path, expected_sha256=digest.upper())[1]["sha256"] == digest
    with pytest.raises(CheckpointError, match="expected 0{64}"):
        build_extractor(weights=path, expected_sha256="0" * 64)


def test_missing_or_unreadable_weights_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        build_extractor(weights=tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        build_extractor(weights=junk)
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="no state dict"):
        build_extractor(weights=tmp_path / "list.pth")


def test_wrong_key_sets_name_the_first_offending_key(tmp_path):
    source = _medicalnet_model()
    missing = _save_medicalnet(source, tmp_path / "missing.pth", drop=("layer3.0.downsample.1.weight",))
    with pytest.raises(CheckpointError, match=r"missing key 'layer3\.0\.downsample\.1\.weight'"):
        build_extractor(weights=missing)

    state = {"module." + k: v for k, v in source.state_dict().items()}
    state["module.fc.weight"] = torch.zeros(3)
    torch.save({"state_dict": state}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected key 'fc\.weight'"):
        build_extractor(weights=tmp_path / "extra.pth")

    deeper = _save_medicalnet(_medicalnet_model("medicalnet_resnet18"), tmp_path / "resnet_18.pth")
    with pytest.raises(CheckpointError, match=r"unexpected key 'layer1\.1\.conv1\.weight'.*resnet10"):
        build_extractor("medicalnet_resnet10", weights=deeper)

    state = {k: v for k, v in source.state_dict().items()}
    state["conv1.weight"] = torch.zeros(64, 1, 3, 3, 3)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"'conv1\.weight' has shape \(64, 1, 3, 3, 3\)"):
        build_extractor(weights=tmp_path / "shape.pth")


# --------------------------------------------------------------------------- random initialisation

def test_random_extractor_is_deterministic_per_seed_and_marked_not_comparable():
    a, id_a = build_extractor(seed=0)
    b, id_b = build_extractor(seed=0)
    c, id_c = build_extractor(seed=1)
    assert id_a == id_b and id_a["sha256"] != id_c["sha256"]
    assert id_a == {"name": "medicalnet_resnet10", "weights": "random", "seed": 0, "sha256": id_a["sha256"],
                    "comparable": False, "note": RANDOM_NOTE}
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    assert id_a["sha256"] == state_dict_sha256(a.state_dict())
    # MedicalNet's init: Kaiming normal, fan_out, ReLU gain; BatchNorm weight 1, bias 0.
    w = a.layer4[0].conv2.weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / (512 * 27)), rel=0.02)
    assert torch.equal(a.layer2[0].bn1.weight, torch.ones(128)) and torch.equal(a.bn1.bias, torch.zeros(64))
    assert not a.training and not any(p.requires_grad for p in a.parameters())


def test_random_init_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_extractor(seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_state_dict_sha256_depends_on_contents_only():
    sd = {"a": torch.arange(4.0), "n": torch.tensor(3)}
    assert state_dict_sha256(sd) == state_dict_sha256({k: v.clone() for k, v in sd.items()})
    assert state_dict_sha256(sd) != state_dict_sha256({"a": torch.arange(4.0), "n": torch.tensor(4)})
    assert state_dict_sha256(sd) != state_dict_sha256({"a": torch.arange(4.0).view(2, 2), "n": torch.tensor(3)})


# --------------------------------------------------------------------------- normalisation

def _patches(seed=0):
    """(2, 1, 16, 16, 8) patches in [-1, 1] with a block of background (-1) voxels each."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 1, 16, 16, 8, generator=g) * 1.8 - 0.9
    x[0, :, :6] = -1.0
    x[1, :, :, :3] = -1.0
    return x


def test_normalisation_is_deterministic_per_seed():
    x = _patches()
    a = medicalnet_normalise(x, torch.Generator().manual_seed(7))
    b = medicalnet_normalise(x, torch.Generator().manual_seed(7))
    c = medicalnet_normalise(x, torch.Generator().manual_seed(8))
    background = x == -1
    assert torch.equal(a, b)
    assert torch.equal(a[~background], c[~background]) and not torch.equal(a[background], c[background])
    assert a.shape == x.shape and a.dtype == torch.float32


def test_foreground_is_z_scored_and_background_is_standard_noise():
    x = _patches()
    out = medicalnet_normalise(x, torch.Generator().manual_seed(0))
    for b in range(2):
        fg = x[b] > -1
        values = out[b][fg].double()
        assert values.mean().item() == pytest.approx(0.0, abs=1e-6)
        assert values.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
        # The same affine map as z-scoring the original values (the [0, 1] mapping cancels).
        ref = (x[b][fg].double() - x[b][fg].double().mean()) / x[b][fg].double().std(unbiased=False)
        assert torch.allclose(values, ref, atol=1e-5)
    noise = out[x == -1]
    assert noise.numel() == 6 * 16 * 8 + 16 * 3 * 8                   # exactly the voxels at -1
    assert abs(noise.mean().item()) < 0.1 and noise.std().item() == pytest.approx(1.0, abs=0.1)


def test_degenerate_volumes_and_value_range():
    g = torch.Generator().manual_seed(0)
    empty = torch.full((1, 1, 4, 4, 4), -1.0)
    out = medicalnet_normalise(empty, g)
    assert torch.isfinite(out).all() and out.std() > 0.5                 # pure noise
    constant = torch.full((1, 1, 4, 4, 4), 0.3)
    assert torch.equal(medicalnet_normalise(constant, g), torch.zeros_like(constant))
    label01 = (torch.arange(64).view(1, 1, 4, 4, 4) % 2).float()         # {0, 1}: 0 is background
    out = medicalnet_normalise(label01, torch.Generator().manual_seed(0), value_range=(0.0, 1.0))
    assert torch.equal(out[label01 == 1], torch.zeros(32))
    with pytest.raises(ValueError, match=r"\(B, 1, X, Y, Z\)"):
        medicalnet_normalise(torch.zeros(1, 2, 4, 4, 4), g)
    with pytest.raises(ValueError, match="high > low"):
        medicalnet_normalise(empty, g, value_range=(1.0, 1.0))
