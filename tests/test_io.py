"""Atomic writes and digests (hpc_gan.io)."""

import hashlib
import os

import numpy as np
import pytest

import hpc_gan.io as hio


@pytest.mark.unit
def test_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("old")

    def crash(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hio.os, "replace", crash)
    with pytest.raises(OSError, match="No space"):
        hio.write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


@pytest.mark.unit
def test_a_failing_writer_leaves_nothing_under_the_final_name(tmp_path):
    with pytest.raises(RuntimeError):
        with hio.atomic_path(tmp_path / "sub" / "x.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert list((tmp_path / "sub").iterdir()) == []


@pytest.mark.unit
def test_writers_round_trip_and_set_the_mode(tmp_path):
    import torch

    hio.write_text_atomic(tmp_path / "a.txt", "ä\n")
    hio.write_json_atomic(tmp_path / "a.json", {"sub": "sub-ä01"})
    hio.torch_save_atomic({"w": torch.arange(3)}, tmp_path / "a.pt")
    hio.savez_atomic(tmp_path / "a.npz", {"x": np.eye(2)})
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "ä\n"
    assert "sub-ä01" in (tmp_path / "a.json").read_text(encoding="utf-8")
    assert torch.load(tmp_path / "a.pt", weights_only=True)["w"].tolist() == [0, 1, 2]
    assert np.load(tmp_path / "a.npz")["x"].tolist() == [[1, 0], [0, 1]]
    assert (os.stat(tmp_path / "a.txt").st_mode & 0o777) == 0o644


@pytest.mark.unit
def test_file_sha256_matches_hashlib_across_chunks(tmp_path):
    data = os.urandom(10_000)
    (tmp_path / "f").write_bytes(data)
    assert hio.file_sha256(tmp_path / "f", chunk=4096) == hashlib.sha256(data).hexdigest()
