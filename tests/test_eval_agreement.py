"""Label–image agreement: segmenter DSC and label contrast on synthetic tube patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpc_gan.eval import agreement as agreement_module
from hpc_gan.eval.agreement import (agreement_figures, label_contrast, reference_segmenter, segmenter_dice,
                                    train_reference_segmenter)

pytestmark = pytest.mark.unit
SHAPE = (32, 32, 16)


def tubes(n: int, seed: int) -> torch.Tensor:
    """(n, 2, 32, 32, 16) patches: 1-3 bright straight tubes along z on a dark noisy background
    (image in [-1, 1]), label = the tubes."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 2, *SHAPE), np.float32)
    xx, yy = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    for i in range(n):
        label = np.zeros(SHAPE, bool)
        for _ in range(rng.integers(1, 4)):
            cx, cy, r = rng.uniform(5, SHAPE[0] - 5), rng.uniform(5, SHAPE[1] - 5), rng.uniform(1.2, 3.0)
            label |= (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r)[:, :, None]
        out[i, 0] = np.clip(-0.6 + 0.1 * rng.normal(size=SHAPE) + 1.2 * label, -1, 1)
        out[i, 1] = label
    return torch.from_numpy(out)


class Patches(torch.utils.data.Dataset):
    def __init__(self, patches: torch.Tensor) -> None:
        self.patches = patches

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.patches[index]


@pytest.fixture(scope="module")
def one_thread():
    """Two busy cores: one intra-op thread trains this small U-Net several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def segmenter(one_thread):
    return train_reference_segmenter(Patches(tubes(48, seed=0)), steps=60, batch=4)


@pytest.fixture(scope="module")
def held_and_generated():
    held, generated = tubes(24, seed=1), tubes(24, seed=2)
    return (held[:, 0], held[:, 1] > 0.5), (generated[:, 0], generated[:, 1] > 0.5)


def test_label_contrast_known_values():
    images, labels = -np.ones((3, 8, 8, 4)), np.zeros((3, 8, 8, 4), bool)
    images[0, 2:4], labels[0, 2:4] = 0.5, True           # contrast 1.5
    images[1, :, :2], labels[1, :, :2] = 1.0, True        # contrast 2.0
    labels[2] = True                                       # no background: not counted
    assert label_contrast(images, labels) == pytest.approx(1.75)
    assert np.isnan(label_contrast(images, np.zeros_like(labels)))
    with pytest.raises(ValueError, match="one shape"):
        label_contrast(images, labels[:2])


def test_matching_labels_score_like_the_real_baseline(segmenter, held_and_generated):
    (real_img, real_lab), (gen_img, gen_lab) = held_and_generated
    figures = agreement_figures(gen_img, gen_lab, real_img, real_lab, segmenter)
    assert figures["segmenter_dice"]["real"] > 0.75                  # the segmenter has learnt the tubes
    assert figures["segmenter_dice"]["ratio"] == pytest.approx(1.0, abs=0.1)
    assert figures["contrast"]["real"] > 1.0
    assert figures["contrast"]["ratio"] == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("wrong", ["shifted", "other_patch"])
def test_wrong_labels_score_clearly_lower(segmenter, held_and_generated, wrong):
    (real_img, real_lab), (gen_img, gen_lab) = held_and_generated
    bad = torch.roll(gen_lab, 4, dims=1) if wrong == "shifted" else torch.roll(gen_lab, 1, dims=0)
    good = agreement_figures(gen_img, gen_lab, real_img, real_lab, segmenter)
    worse = agreement_figures(gen_img, bad, real_img, real_lab, segmenter)
    assert worse["segmenter_dice"]["ratio"] < 0.5 * good["segmenter_dice"]["ratio"]
    assert worse["contrast"]["ratio"] < 0.5 * good["contrast"]["ratio"]
    assert worse["segmenter_dice"]["real"] == good["segmenter_dice"]["real"]   # the baseline is untouched


def test_both_empty_counts_as_agreement(segmenter):
    images = -0.6 * torch.ones((2, *SHAPE))                           # no vessel: the segmenter finds none
    labels = torch.zeros((2, *SHAPE), dtype=torch.bool)
    assert segmenter_dice(segmenter, images, labels) == 1.0
    labels[1, 10:14, 10:14] = True                                     # a label with nothing under it: 0
    assert segmenter_dice(segmenter, images, labels) == 0.5


def test_training_is_deterministic_for_a_seed(one_thread):
    data = Patches(tubes(8, seed=3))
    state = torch.random.get_rng_state()
    first, again = (train_reference_segmenter(data, steps=3, batch=4, seed=1).state_dict() for _ in range(2))
    other = train_reference_segmenter(data, steps=3, batch=4, seed=2).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert torch.equal(torch.random.get_rng_state(), state)            # the caller's RNG is left alone


def test_reference_segmenter_is_cached(smoke_shards, tmp_path, monkeypatch, one_thread):
    first, identity = reference_segmenter(str(smoke_shards), cache_dir=str(tmp_path), steps=3, batch=4)
    assert identity["cached"] is False and identity["steps"] == 3 and identity["seed"] == 0
    assert len(list(tmp_path.glob("segmenter-*.pt"))) == 1 and not list(tmp_path.glob(".*tmp"))
    monkeypatch.setattr(agreement_module, "train_reference_segmenter",
                        lambda *a, **k: pytest.fail("trained again despite the cache"))
    again, hit = reference_segmenter(str(smoke_shards), cache_dir=str(tmp_path), steps=3, batch=4)
    assert hit["cached"] is True and hit["key"] == identity["key"] and not again.training
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())
    monkeypatch.undo()
    _, other = reference_segmenter(str(smoke_shards), cache_dir=str(tmp_path), steps=4, batch=4)
    assert other["key"] != identity["key"] and other["cached"] is False
    with pytest.raises(TypeError, match="unknown settings"):
        reference_segmenter(str(smoke_shards), cache_dir=None, epochs=3)
