"""Unit tests of the generator and critic (CPU, small configs; the big ones only on meta)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from hpc_gan.models import (
    CRITIC_NORMS,
    INIT_STD,
    Critic,
    Generator,
    count_parameters,
    init_weights,
    spectral_norm_buffers,
)

pytestmark = pytest.mark.unit

LATENT = 128
SMALL_PATCH = (32, 32, 16)
SMALL_WIDTH = 16
BATCH = 2
PAPER_PATCH = (128, 128, 64)


def _small_generator() -> Generator:
    return Generator(latent_dim=LATENT, ngf=SMALL_WIDTH, patch_shape=SMALL_PATCH)


def _small_critic(norm: str) -> Critic:
    return Critic(ndf=SMALL_WIDTH, patch_shape=SMALL_PATCH, norm=norm)


def _convs(module: nn.Module) -> list[nn.Conv3d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv3d)]


# --------------------------------------------------------------------------- parameter counts


def _meta_counts(width: int, norm: str) -> tuple[int, int, nn.Module, nn.Module]:
    with torch.device("meta"):
        g = Generator(latent_dim=LATENT, ngf=width, patch_shape=PAPER_PATCH)
        c = Critic(ndf=width, patch_shape=PAPER_PATCH, norm=norm)
    return count_parameters(g), count_parameters(c), g, c


@pytest.mark.parametrize("norm", ["instance", "spectral"])
def test_paper_parameter_counts_512(norm):
    n_g, n_c, g, c = _meta_counts(512, norm)
    assert n_g == 139_916_994
    assert n_c == 4_780_353
    assert n_g + n_c == 144_697_347
    # Built on meta: nothing was allocated.
    tensors = [*g.parameters(), *g.buffers(), *c.parameters(), *c.buffers()]
    assert all(t.is_meta for t in tensors)


def test_paper_parameter_count_1024_c_sn_mp():
    n_g, n_c, g, c = _meta_counts(1024, "spectral")
    assert n_g + n_c == 307_974_147
    assert all(p.is_meta for p in [*g.parameters(), *c.parameters()])


def test_count_parameters_trainable_only():
    c = _small_critic("none")
    total = count_parameters(c)
    c.score.requires_grad_(False)
    assert count_parameters(c) == total - c.score.weight.numel() - c.score.bias.numel()
    assert count_parameters(c, trainable_only=False) == total


# --------------------------------------------------------------------------- forward


def test_generator_shape_and_tanh_range():
    torch.manual_seed(0)
    g = _small_generator()
    # Large latents saturate tanh: the output must still stay inside [-1, 1].
    z = 100 * g.sample_latent(BATCH)
    x = g(z)
    assert x.shape == (BATCH, 2, *SMALL_PATCH)
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("norm", CRITIC_NORMS)
def test_critic_shape(norm):
    torch.manual_seed(0)
    out = _small_critic(norm)(torch.randn(BATCH, 2, *SMALL_PATCH))
    assert out.shape == (BATCH,)
    assert torch.isfinite(out).all()


def test_generator_feeds_critic():
    torch.manual_seed(0)
    g, c = _small_generator(), _small_critic("instance")
    assert c(g(g.sample_latent(BATCH))).shape == (BATCH,)


def test_sample_latent():
    g = _small_generator()
    z = g.sample_latent(3)
    assert z.shape == (3, LATENT) and z.dtype == torch.float32
    a = g.sample_latent(3, generator=torch.Generator().manual_seed(7))
    b = g.sample_latent(3, generator=torch.Generator().manual_seed(7), device="cpu")
    assert torch.equal(a, b)
    assert g.sample_latent(0).shape == (0, LATENT)
    with pytest.raises(ValueError, match="n"):
        g.sample_latent(-1)


# --------------------------------------------------------------------------- norms


def test_spectral_norm_on_exactly_the_four_convs():
    c = _small_critic("spectral")
    convs = _convs(c)
    assert len(convs) == 4
    assert all(parametrize.is_parametrized(m, "weight") for m in convs)
    assert not parametrize.is_parametrized(c.score)
    parametrized = [m for m in c.modules() if parametrize.is_parametrized(m)]
    assert parametrized == convs
    assert not any(isinstance(m, (nn.InstanceNorm3d, nn.GroupNorm)) for m in c.modules())


@pytest.mark.parametrize("norm", ["instance", "group", "none"])
def test_no_spectral_norm_elsewhere(norm):
    c = _small_critic(norm)
    assert not any(parametrize.is_parametrized(m) for m in c.modules())
    assert spectral_norm_buffers(c) == {}


def test_spectral_norm_buffers():
    c = _small_critic("spectral")
    buffers = spectral_norm_buffers(c)
    assert len(buffers) == 8
    assert sorted({name.rsplit(".", 1)[-1] for name in buffers}) == ["_u", "_v"]
    # The live buffers, so an in-place broadcast updates the model.
    live = dict(c.named_buffers())
    assert all(buffers[name] is live[name] for name in buffers)
    u = buffers["net.0.0.parametrizations.weight.0._u"]
    assert u.shape == (c.ndf // 8,)


def test_instance_norm_has_no_parameters():
    c = _small_critic("instance")
    norms = [m for m in c.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert len(norms) == 4
    assert all(count_parameters(m, trainable_only=False) == 0 for m in norms)
    assert count_parameters(c) == count_parameters(_small_critic("none"))


def test_group_norm_groups_divide_channels():
    c = Critic(ndf=512, patch_shape=SMALL_PATCH, norm="group")
    norms = [m for m in c.modules() if isinstance(m, nn.GroupNorm)]
    assert [(m.num_groups, m.num_channels) for m in norms] == [
        (32, 64), (32, 128), (32, 256), (32, 512)
    ]
    assert all(m.affine for m in norms)


# --------------------------------------------------------------------------- init


def test_generator_init_statistics():
    torch.manual_seed(0)
    g = Generator(latent_dim=LATENT, ngf=64, patch_shape=SMALL_PATCH)
    conv = _convs(g)[0]  # 64 -> 32 channels, 55,296 weights
    assert conv.weight.numel() > 50_000
    assert conv.weight.std().item() == pytest.approx(INIT_STD, rel=0.05)
    assert abs(conv.weight.mean().item()) < 0.005
    for m in _convs(g):
        assert torch.count_nonzero(m.bias) == 0
    bn = torch.cat([m.weight for m in g.modules() if isinstance(m, nn.BatchNorm3d)]).detach()
    assert bn.numel() == 64 + 32 + 16 + 8
    assert bn.std().item() == pytest.approx(INIT_STD, rel=0.25)
    assert abs(bn.mean().item()) < 0.02
    for m in g.modules():
        if isinstance(m, nn.BatchNorm3d):
            assert torch.count_nonzero(m.bias) == 0


def test_init_weights_function():
    layers = nn.Sequential(nn.Conv3d(8, 64, 3), nn.BatchNorm3d(20_000), nn.GroupNorm(4, 8))
    linear = nn.Linear(4, 4)
    before = linear.weight.clone()
    init_weights(nn.Sequential(layers, linear), generator=torch.Generator().manual_seed(0))
    for m in layers:
        assert m.weight.std().item() == pytest.approx(INIT_STD, rel=0.1)
        assert torch.count_nonzero(m.bias) == 0
    assert abs(layers[1].weight.mean().item()) < 0.002
    # Linear layers keep PyTorch's default init.
    assert torch.equal(linear.weight, before)


def test_init_weights_reaches_spectral_norm_original():
    c = _small_critic("spectral")
    with torch.no_grad():
        for m in _convs(c):
            m.parametrizations.weight.original.fill_(1.0)
            m.bias.fill_(1.0)
    init_weights(c)
    for m in _convs(c):
        assert m.parametrizations.weight.original.abs().max() < 1.0
        assert torch.count_nonzero(m.bias) == 0


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


@pytest.mark.parametrize("norm", CRITIC_NORMS)
def test_determinism_under_manual_seed(norm):
    states = []
    for _ in range(2):
        torch.manual_seed(1234)
        states.append((_state(_small_generator()), _state(_small_critic(norm))))
    for a, b in zip(*states):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(4321)
    other = _state(_small_generator())
    assert not torch.equal(other["project.weight"], states[0][0]["project.weight"])


def test_init_weights_generator_is_deterministic():
    def draw() -> torch.Tensor:
        conv = nn.Conv3d(2, 4, 3)
        init_weights(conv, generator=torch.Generator().manual_seed(3))
        return conv.weight

    torch.manual_seed(0)
    a = draw()
    torch.manual_seed(99)  # the global RNG must not matter when a generator is given
    assert torch.equal(a, draw())


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "patch_shape",
    [(32, 32), (32, 32, 16, 16), (32, 32, 8), (32, 0, 16), (32, -16, 16), (32.0, 32, 16), "abc"],
)
def test_bad_patch_shape(patch_shape):
    with pytest.raises(ValueError, match="patch_shape"):
        Generator(latent_dim=LATENT, ngf=SMALL_WIDTH, patch_shape=patch_shape)
    with pytest.raises(ValueError, match="patch_shape"):
        Critic(ndf=SMALL_WIDTH, patch_shape=patch_shape)


@pytest.mark.parametrize("width", [0, 4, 12, 16.0, True, -8])
def test_bad_widths(width):
    with pytest.raises(ValueError, match="ngf"):
        Generator(latent_dim=LATENT, ngf=width, patch_shape=SMALL_PATCH)
    with pytest.raises(ValueError, match="ndf"):
        Critic(ndf=width, patch_shape=SMALL_PATCH)


def test_bad_latent_and_channels():
    with pytest.raises(ValueError, match="latent_dim"):
        Generator(latent_dim=0, ngf=SMALL_WIDTH, patch_shape=SMALL_PATCH)
    with pytest.raises(ValueError, match="out_channels"):
        Generator(latent_dim=LATENT, ngf=SMALL_WIDTH, patch_shape=SMALL_PATCH, out_channels=0)
    with pytest.raises(ValueError, match="in_channels"):
        Critic(ndf=SMALL_WIDTH, patch_shape=SMALL_PATCH, in_channels=0)


def test_bad_norm_lists_valid_ones():
    with pytest.raises(ValueError, match="norm") as info:
        Critic(ndf=SMALL_WIDTH, patch_shape=SMALL_PATCH, norm="batch")
    assert all(name in str(info.value) for name in CRITIC_NORMS)


def test_instance_norm_needs_more_than_one_final_voxel():
    with pytest.raises(ValueError, match="patch_shape"):
        Critic(ndf=SMALL_WIDTH, patch_shape=(16, 16, 16), norm="instance")
    out = Critic(ndf=SMALL_WIDTH, patch_shape=(16, 16, 16), norm="spectral")(
        torch.randn(BATCH, 2, 16, 16, 16)
    )
    assert out.shape == (BATCH,)


# --------------------------------------------------------------------------- gradient penalty


def _weights(critic: Critic) -> list[torch.Tensor]:
    """Every weight (not bias) a gradient penalty must reach, including spectral-norm originals."""
    return [p for name, p in critic.named_parameters() if name.endswith(("weight", "original"))]


@pytest.mark.parametrize("norm", CRITIC_NORMS)
def test_critic_is_twice_differentiable(norm):
    torch.manual_seed(0)
    c = _small_critic(norm)
    x = torch.randn(BATCH, 2, *SMALL_PATCH, requires_grad=True)
    (grad,) = torch.autograd.grad(c(x).sum(), x, create_graph=True)
    penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
    penalty.backward()
    # The second-order path reaches every weight. The score bias is left out: d(score)/dx does
    # not depend on it, so its grad is rightly None.
    for w in _weights(c):
        assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    assert c.score.bias.grad is None


@pytest.mark.parametrize("norm", CRITIC_NORMS)
def test_wgan_gp_critic_loss_backward(norm):
    torch.manual_seed(0)
    c = _small_critic(norm)
    real, fake = torch.randn(2, BATCH, 2, *SMALL_PATCH).unbind(0)
    alpha = torch.rand(BATCH, 1, 1, 1, 1)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(c(mixed).sum(), mixed, create_graph=True)
    penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
    loss = c(fake).mean() - c(real).mean() + 10 * penalty
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in c.parameters())


@pytest.mark.unit
def test_activation_checkpointing_gives_the_same_losses_and_gradients():
    """Checkpointed generator and critic blocks: same outputs, gradients and BatchNorm statistics,
    with the gradient penalty's double backward through the checkpointed critic."""
    from hpc_gan.train.penalty import gradient_penalty

    def iteration(checkpointing: bool):
        torch.manual_seed(0)
        g, d = Generator(8, 16, (32, 32, 16)), Critic(16, (32, 32, 16), norm="instance")
        g.checkpointing = d.checkpointing = checkpointing
        z = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
        real = torch.rand(3, 2, 32, 32, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
        fake = g(z)
        gp = gradient_penalty(d, real, fake, generator=torch.Generator().manual_seed(3))
        loss = d(fake).mean() - d(real).mean() + 10 * gp
        loss.backward()
        grads = [p.grad.clone() for p in g.parameters()] + [p.grad.clone() for p in d.parameters() if p.grad is not None]
        stats = [b.clone() for b in g.buffers()]
        return loss.detach(), grads, stats

    plain, checkpointed = iteration(False), iteration(True)
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=0)
    for a, b in zip(checkpointed[1] + checkpointed[2], plain[1] + plain[2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.unit
def test_activation_checkpointing_keeps_fewer_activations():
    def saved_bytes(checkpointing: bool) -> int:
        torch.manual_seed(0)
        g = Generator(8, 32, (32, 32, 16))
        g.checkpointing = checkpointing
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            g(torch.randn(2, 8)).sum()
        return sum(total)

    assert saved_bytes(True) < 0.7 * saved_bytes(False)
