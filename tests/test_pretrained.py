"""Pinned MedicalNet weights: fetch through huggingface_hub, SHA-256 refusal, the offline line, and
``--weights medicalnet_resnet10`` finding the fetched file in the cache. No internet: a local
Hub stand-in (tests/fake_hub.py) serves a MedicalNet-layout state dict."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from fake_hub import FakeHub
from helpers import assert_one_line_error, medicalnet_model, save_medicalnet
from hpc_gan.cli import main
from hpc_gan.errors import CheckpointError, ConfigError, HpcGanError
from hpc_gan.eval.cli_evaluate import extractor_for
from hpc_gan.models import pretrained, resnet3d
from hpc_gan.models.resnet3d import ARCHITECTURES, build_extractor

pytestmark = pytest.mark.unit

NAME = "medicalnet_resnet10"
REVISION = "0123456789abcdef0123456789abcdef01234567"  # a test commit of the stand-in Hub


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[torch.nn.Module, bytes]:
    """A "trained" ResNet-10 and its file as MedicalNet saves it (module.* keys, conv_seg head)."""
    model = medicalnet_model(NAME, seed=3)
    path = save_medicalnet(model, tmp_path_factory.mktemp("medicalnet") / "resnet_10.pth")
    return model, path.read_bytes()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """huggingface_hub's cache in tmp (what HF_HOME=... gives a fresh process)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path / "hf" / "hub"


def _pin(monkeypatch, data: bytes, **changes) -> pretrained.PretrainedWeights:
    """Pin NAME to the stand-in's file (or to other values, to provoke a refusal)."""
    fields = {"revision": REVISION, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), **changes}
    pin = dataclasses.replace(pretrained.PRETRAINED[NAME], **fields)
    monkeypatch.setitem(pretrained.PRETRAINED, NAME, pin)
    return pin


def _served(pin: pretrained.PretrainedWeights, data: bytes) -> dict:
    return {(pin.repo_id, pin.revision, pin.filename): data}


def test_the_pins_are_exact_and_fit_the_architectures():
    for name, pin in pretrained.PRETRAINED.items():
        assert name == pin.name and pin.architecture in ARCHITECTURES
        assert re.fullmatch(r"[0-9a-f]{40}", pin.revision), name   # a commit, never a branch
        assert re.fullmatch(r"[0-9a-f]{64}", pin.sha256), name
        assert pin.repo_id.startswith("TencentMedicalNet/MedicalNet-Resnet") and pin.source.startswith("https://")
    ten = pretrained.PRETRAINED[NAME]  # the figures of the Hub's LFS pointer quoted in issue 15
    assert (ten.repo_id, ten.filename, ten.revision, ten.size, ten.sha256) == (
        "TencentMedicalNet/MedicalNet-Resnet10", "resnet_10.pth", "923db3dc91baf34c4fe10246651c7fe4dc675fee",
        57_456_599, "2824951eaef30e115929b89bec72342380b08d14792bda1449974ac849e497c0")
    assert pretrained.PRETRAINED["medicalnet_resnet18"].sha256.startswith("38b3a17444c5c18a")
    assert pretrained.PRETRAINED["medicalnet_resnet10_23dataset"].sha256.startswith("afa8055f3e47f4a1")


def test_fetch_then_evaluate_finds_the_weights_in_the_cache(checkpoint, cache, monkeypatch):
    source, data = checkpoint
    pin = _pin(monkeypatch, data)
    with FakeHub(_served(pin, data)) as hub:
        path = pretrained.fetch(NAME, endpoint=hub.url)
        assert path == cache / "models--TencentMedicalNet--MedicalNet-Resnet10" / "snapshots" / REVISION / pin.filename
        assert path.read_bytes() == data and [m for m, _ in hub.requests] == ["HEAD", "HEAD", "GET"]
        assert pretrained.fetch(NAME, endpoint=hub.url) == path and len(hub.requests) == 3  # cached: no request
    # The Hub is gone (a compute node): the name alone finds the file, checks its digest, loads it.
    model, identity = build_extractor(NAME, NAME)
    assert identity["weights"] == str(path) and identity["sha256"] == pin.sha256 and identity["comparable"]
    assert "TencentMedicalNet/MedicalNet-Resnet10/resnet_10.pth@0123456" in identity["note"]
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        assert torch.equal(model.forward_maps(x), source.layer4(source.layer3(source.layer2(source.layer1(
            source.maxpool(source.relu(source.bn1(source.conv1(x)))))))))


def test_a_digest_mismatch_is_refused_in_one_line_and_the_file_deleted(checkpoint, cache, monkeypatch):
    _, data = checkpoint
    pin = _pin(monkeypatch, data, sha256="f" * 64)
    with FakeHub(_served(pin, data)) as hub:
        with pytest.raises(CheckpointError, match=rf"has SHA-256 {hashlib.sha256(data).hexdigest()}, the pin at "
                                                  rf"TencentMedicalNet/MedicalNet-Resnet10@{REVISION} is f{{64}}: "
                                                  "deleted it") as info:
            pretrained.fetch(NAME, endpoint=hub.url)
    assert "\n" not in str(info.value)
    assert not [p for p in cache.rglob("*") if p.is_file() or p.is_symlink()
                if p.name.endswith(".pth") or "blobs" in p.parts]
    with pytest.raises(CheckpointError, match="not in the cache"):
        pretrained.cached_path(NAME)


def test_a_size_mismatch_is_refused_before_hashing(checkpoint, cache, monkeypatch):
    _, data = checkpoint
    pin = _pin(monkeypatch, data, size=len(data) + 1)
    with FakeHub(_served(pin, data)) as hub, pytest.raises(
            CheckpointError, match=rf"has {len(data)} bytes, the pin .* says {len(data) + 1}: deleted it"):
        pretrained.fetch(NAME, endpoint=hub.url)
    assert not list((cache / "models--TencentMedicalNet--MedicalNet-Resnet10" / "blobs").iterdir())


def test_a_damaged_cached_file_is_refused_and_fetched_again(checkpoint, cache, monkeypatch):
    _, data = checkpoint
    pin = _pin(monkeypatch, data)
    with FakeHub(_served(pin, data)) as hub:
        path = pretrained.fetch(NAME, endpoint=hub.url)
        blob = path.resolve()
        blob.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))    # one flipped bit, same size
        with pytest.raises(CheckpointError, match=f"expected {pin.sha256}"):
            build_extractor(NAME, NAME)
        with pytest.raises(CheckpointError, match="deleted it; fetch again"):
            pretrained.fetch(NAME, endpoint=hub.url)
        assert pretrained.fetch(NAME, endpoint=hub.url).read_bytes() == data


def test_without_the_hub_one_line_says_where_to_fetch_and_where_the_cache_is(checkpoint, cache, monkeypatch):
    _, data = checkpoint
    pin = _pin(monkeypatch, data)
    with pytest.raises(CheckpointError) as info:      # evaluate on a compute node before any fetch
        build_extractor(NAME, NAME)
    message = str(info.value)
    assert "\n" not in message and f"hpc_gan weights fetch {NAME}` on a login node" in message
    assert f"'{cache}' (HF_HOME)" in message
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what a node without internet sees, at once
    with pytest.raises(CheckpointError, match=rf"cannot reach the Hugging Face Hub to fetch {NAME} .*on a login "
                                              rf"node with internet access; it fills the cache '{re.escape(str(cache))}'"):
        pretrained.fetch(NAME, endpoint="http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with FakeHub(_served(pin, data)) as hub:
        pretrained.fetch(NAME, endpoint=hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert pretrained.fetch(NAME).read_bytes() == data      # already cached: offline is fine


def test_a_file_missing_at_the_pinned_revision_says_the_pin_needs_updating(checkpoint, cache, monkeypatch):
    _pin(monkeypatch, checkpoint[1])
    with FakeHub({}) as hub, pytest.raises(CheckpointError, match=f"has no .*resnet_10.pth@{REVISION} .*needs updating"):
        pretrained.fetch(NAME, endpoint=hub.url)


def test_weights_of_another_architecture_or_a_contradicting_digest_are_refused(checkpoint, cache, monkeypatch):
    _pin(monkeypatch, checkpoint[1])
    with pytest.raises(ConfigError, match="weights medicalnet_resnet10 fit medicalnet_resnet10, not the extractor "
                                          "medicalnet_resnet18; pass --extractor medicalnet_resnet10"):
        build_extractor("medicalnet_resnet18", NAME)
    with pytest.raises(CheckpointError, match="contradicts the pinned SHA-256"):
        build_extractor(NAME, NAME, expected_sha256="0" * 64)
    assert extractor_for(None, "medicalnet_resnet50_23dataset") == "medicalnet_resnet50"
    assert extractor_for(None, "/data/resnet_10.pth") == extractor_for(None, None) == NAME
    assert extractor_for("medicalnet_resnet18", None) == "medicalnet_resnet18"


def test_weights_list_shows_the_cache_and_what_is_fetched(checkpoint, cache, monkeypatch, capsys):
    pin = _pin(monkeypatch, checkpoint[1])
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert f"cache: {cache}" in out and out.count("not fetched") == len(pretrained.PRETRAINED)
    with FakeHub(_served(pin, checkpoint[1])) as hub:
        pretrained.fetch(NAME, endpoint=hub.url)
    assert main(["weights", "list"]) == 0
    assert capsys.readouterr().out.count("not fetched") == len(pretrained.PRETRAINED) - 1
    assert main(["weights", "fetch", "medicalnet_resnet7"]) == 2
    assert_one_line_error(capsys, "invalid choice: 'medicalnet_resnet7'")


def test_the_command_uses_hf_endpoint_and_hf_home_and_refuses_a_mismatch(tmp_path):
    """The real pin, the real command in a fresh process: HF_ENDPOINT points at the stand-in, which
    serves a file of the pinned size but other bytes; the command refuses it in one line."""
    pin = pretrained.PRETRAINED[NAME]
    impostor = bytes(pin.size)
    env = {**os.environ, "HF_ENDPOINT": "", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_HUB_OFFLINE", None)
    with FakeHub(_served(pin, impostor)) as hub:
        env["HF_ENDPOINT"] = hub.url
        result = subprocess.run([sys.executable, "-m", "hpc_gan", "weights", "fetch", NAME], env=env,
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert f"has SHA-256 {hashlib.sha256(impostor).hexdigest()}, the pin at " \
           f"{pin.repo_id}@{pin.revision} is {pin.sha256}: deleted it" in result.stderr
    assert ("GET", f"/{pin.repo_id}/resolve/{pin.revision}/{pin.filename}") in hub.requests
    assert not [p for p in (tmp_path / "hf" / "hub").rglob("*") if p.is_file() and "blobs" in p.parts]


def test_evaluate_takes_the_name_and_reads_the_fetched_file(checkpoint, cache, monkeypatch, packed, tmp_path, capsys):
    pin = _pin(monkeypatch, checkpoint[1])
    argv = ["evaluate", "--samples", str(packed), "--real", str(packed), "--out", str(tmp_path), "--weights", NAME]
    assert main(argv) == 2                                             # a compute node before the fetch
    assert_one_line_error(capsys, f"hpc_gan weights fetch {NAME}` on a login node", str(cache))
    with FakeHub(_served(pin, checkpoint[1])) as hub:
        path = pretrained.fetch(NAME, endpoint=hub.url)
    loaded = {}

    def extractor_then_stop(*args, **kwargs):  # the rest of the evaluation is other tests' business
        loaded.update(real_build_extractor(*args, **kwargs)[1])
        raise HpcGanError("stopped after loading the extractor")

    real_build_extractor = resnet3d.build_extractor
    monkeypatch.setattr(resnet3d, "build_extractor", extractor_then_stop)
    assert main(argv) == 2
    assert_one_line_error(capsys, "stopped after loading the extractor")
    assert loaded["weights"] == str(path) and loaded["comparable"] is True
    assert loaded["sha256"] == pin.sha256 and loaded["name"] == NAME
