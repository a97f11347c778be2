"""hpc_gan.sample and ``hpc_gan sample``: deterministic patches, NIfTI / HDF5 output, pictures, errors."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from hpc_gan import config
from hpc_gan.cli import main
from hpc_gan.data.dataset import ShardedPatchDataset
from hpc_gan.data.manifest import write_manifest
from hpc_gan.models import Generator
from hpc_gan.sample import SampleError, binarise_label, generate, sample_to_disk

PATCH = (16, 16, 16)
TRAINING_SPACING = (0.3, 0.4, 0.6)  # not the fallback, so the tests see which one was used
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def consolidated_file(path, data_root) -> None:
    """A file in the exact format of hpc_gan.train.consolidate (no DeepSpeed needed)."""
    torch.manual_seed(0)
    generator = Generator(8, 16, PATCH)
    with torch.no_grad():  # the N(0, 0.05) init gives ~1e-7 outputs in eval mode: make them vary
        for module in generator.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.weight.fill_(2.0)
                module.bias.uniform_(-0.1, 0.1)
    cfg = config.to_dict(config.load_config("sn", "smoke"))
    cfg["data"]["root"] = str(data_root)
    torch.save({"format": "hpc_gan.generator", "format_version": 1, "variant": "sn", "step": 1,
                "model": {"latent_dim": 8, "ngf": 16, "patch_shape": list(PATCH), "out_channels": 2},
                "config": cfg, "manifest_sha256": "", "state_dict": generator.state_dict()}, path)


@pytest.fixture(scope="module")
def gen_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    data = root / "shards"
    data.mkdir()
    write_manifest(data, {"format_version": 1, "patch_shape": list(PATCH), "spacing": list(TRAINING_SPACING),
                          "splits": {}, "sampling": {}, "normalisation": {}, "compression": "lzf"})
    consolidated_file(root / "generator.pt", data)
    return root / "generator.pt"


@pytest.fixture(scope="module")
def generator(gen_file):
    from hpc_gan.train.consolidate import load_generator

    return load_generator(gen_file)[0]


def test_generate_is_deterministic_and_independent_of_batch_size(generator):
    one = torch.cat(list(generate(generator, 5, seed=3, batch=5)))
    again = torch.cat(list(generate(generator, 5, seed=3, batch=2)))
    assert one.shape == (5, 2, *PATCH) and one.dtype == torch.float32
    torch.testing.assert_close(one, again, rtol=0, atol=1e-5)
    prefix = torch.cat(list(generate(generator, 2, seed=3, batch=1)))
    torch.testing.assert_close(prefix, one[:2], rtol=0, atol=1e-5)
    other = torch.cat(list(generate(generator, 5, seed=4, batch=5)))
    assert (other - one).abs().max() > 1e-3
    assert one.abs().max() <= 1


def test_binarise_label_is_binary_and_checks_threshold():
    x = torch.linspace(-1, 1, 101)
    label = binarise_label(x, 0.5)
    assert label.dtype == torch.uint8 and set(label.unique().tolist()) == {0, 1}
    assert label.sum() == 50  # (x + 1) / 2 > 0.5 exactly when x > 0
    assert binarise_label(x.numpy(), 0.9).dtype == np.uint8
    with pytest.raises(SampleError, match="threshold"):
        binarise_label(x, 1.5)


def test_nifti_output(gen_file, tmp_path):
    out = tmp_path / "nifti"
    done = sample_to_disk(gen_file, 3, out, "nifti", seed=1, batch=2)
    record = json.loads((out / "samples.json").read_text())
    assert record["n"] == 3 and record["spacing"] == list(TRAINING_SPACING)
    assert record["spacing_source"]["source"] == "manifest" and record["threshold"] == 0.5
    assert len(record["generator_sha256"]) == 64 and done["variant"] == "sn"
    for i in range(3):
        image = nib.load(str(out / f"sample-{i:05d}_image.nii.gz"))
        label = nib.load(str(out / f"sample-{i:05d}_label.nii.gz"))
        assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
        np.testing.assert_allclose(image.header.get_zooms(), TRAINING_SPACING, rtol=1e-6)
        np.testing.assert_allclose(np.diag(label.affine)[:3], TRAINING_SPACING, rtol=1e-6)
        assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1}
        for field in ("descrip", "db_name", "aux_file", "intent_name"):
            assert image.header[field].item() == b"" and label.header[field].item() == b""
    first = torch.cat(list(generate(Generator(8, 16, PATCH), 1)))  # shape check only: another network
    assert np.asarray(nib.load(str(out / "sample-00000_image.nii.gz")).dataobj).shape == first.shape[2:]
    for picture in ("montage.png", "mip.png"):
        assert (out / picture).read_bytes()[:8] == PNG_MAGIC


def test_hdf5_output_reads_as_training_data(gen_file, generator, tmp_path):
    out = tmp_path / "h5"
    sample_to_disk(gen_file, 5, out, "hdf5", seed=2, batch=3, threshold=0.4)
    dataset = ShardedPatchDataset(out, "train")
    assert len(dataset) == 5 and dataset[4].shape == (2, *PATCH)
    assert dataset.manifest.spacing == TRAINING_SPACING
    sampling = dataset.manifest.data["sampling"]
    assert sampling["seed"] == 2 and sampling["n"] == 5 and sampling["threshold"] == 0.4 and sampling["sha256"]
    expected = torch.cat(list(generate(generator, 5, seed=2)))
    torch.testing.assert_close(dataset[4][0], expected[4, 0], rtol=0, atol=1e-5)
    assert torch.equal(dataset[4][1], binarise_label(expected[4, 1], 0.4).float())
    assert dataset.subject_of(0) == "generated"
    assert (out / "montage.png").read_bytes()[:8] == PNG_MAGIC


def test_fallback_spacing_when_training_data_is_gone(tmp_path):
    consolidated_file(tmp_path / "g.pt", tmp_path / "missing")
    done = sample_to_disk(tmp_path / "g.pt", 1, tmp_path / "out", spacing=(1.0, 1.0, 2.0))
    assert done["spacing"] == [1.0, 1.0, 2.0] and done["spacing_source"]["source"] == "fallback"


def _cli(capsys, *argv):
    status = main(["sample", *map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_writes_and_reports(gen_file, tmp_path, capsys):
    status, out, err = _cli(capsys, gen_file, "--n", 2, "--out", tmp_path / "o", "--device", "cpu")
    assert status == 0, err
    assert "2 sn samples" in out and "montage.png" in out
    assert "privacy: no formal guarantee" in out


@pytest.mark.parametrize("damage", ["truncated", "foreign", "missing"])
def test_cli_bad_checkpoint_is_one_line(gen_file, tmp_path, capsys, damage):
    bad = tmp_path / "bad.pt"
    if damage == "truncated":
        bad.write_bytes(gen_file.read_bytes()[:1000])
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(2)}, bad)
    status, _, err = _cli(capsys, bad, "--n", 1, "--out", tmp_path / "o")
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_cli_refuses_non_empty_out_and_bad_n(gen_file, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    status, _, err = _cli(capsys, gen_file, "--n", 1, "--out", out)
    assert status == 2 and "not empty" in err and "--overwrite" in err and err.count("\n") == 1
    status, _, err = _cli(capsys, gen_file, "--n", 0, "--out", tmp_path / "fresh")
    assert status == 2 and "n must be" in err and err.count("\n") == 1
    status, _, err = _cli(capsys, gen_file, "--n", 1, "--out", out, "--overwrite")
    assert status == 0, err
    assert (out / "notes.txt").read_text() == "keep me"  # --overwrite removes only sampling outputs


def test_overwrite_never_touches_a_real_dataset(gen_file, tmp_path):
    data = tmp_path / "real"
    data.mkdir()
    write_manifest(data, {"format_version": 1, "sampling": {"seed": 0}})
    with pytest.raises(SampleError, match="real dataset"):
        sample_to_disk(gen_file, 1, data, overwrite=True)
