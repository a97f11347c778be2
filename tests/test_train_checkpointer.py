"""The Checkpointer with fake parts (no DeepSpeed): save, load, pruning, markers, integrity with
fallback, a full disk, a crafted pickle, a torn metrics log, and ``hpc_gan checkpoints``."""

from __future__ import annotations

import errno
import json
import pickle
from pathlib import Path

import pytest
import torch

from hpc_gan.errors import CheckpointError
from hpc_gan.train import checkpoint as ckpt
from hpc_gan.train import checkpointer as checkpointer_module
from hpc_gan.train.checkpointer import JSON, PER_RANK, SHARDED, SHARED, Checkpointer, RNGPart
from hpc_gan.train.metrics import MetricsPosition

pytestmark = pytest.mark.unit


class Counter:
    """A JSON part."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class Weights:
    """A SHARED part (tensors)."""

    def __init__(self, fill: float) -> None:
        self.tensor = torch.full((3, 2), fill)

    def state_dict(self) -> dict:
        return {"w": self.tensor.clone()}

    def load_state_dict(self, state: dict | None) -> None:
        self.tensor = None if state is None else state["w"]


class Shards:
    """A SHARDED part writing two files per 'engine' (one process plays every rank)."""

    def __init__(self, fill: float) -> None:
        self.tensor, self.loaded_from = torch.full((4,), fill), None

    def save_shards(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({"w": self.tensor}, directory / "model_states.pt")
        torch.save({"m": self.tensor * 2}, directory / "zero_pp_rank_0_optim_states.pt")

    def load_shards(self, directory: Path, universal: bool = False) -> None:
        self.tensor = torch.load(directory / "model_states.pt", weights_only=True)["w"]
        self.loaded_from = (directory, universal)

    def to_universal(self, directory: Path, out: Path) -> str:
        out.mkdir(parents=True)
        (out / "model_states.pt").write_bytes((directory / "model_states.pt").read_bytes())
        return "1 shard"


def _checkpointer(root: Path, fill: float = 1.0, keep: int = 2, world_size: int = 1):
    parts = {"engine": Shards(fill), "weights": Weights(fill), "loop": Counter(int(fill)),
             "rng": RNGPart(torch.Generator().manual_seed(int(fill)), seed=3)}
    cp = Checkpointer(root, rank=0, world_size=world_size, keep=keep)
    cp.register("engine", parts["engine"], SHARDED)
    cp.register("weights", parts["weights"], SHARED)
    cp.register("rng", parts["rng"], PER_RANK)
    cp.register("loop", parts["loop"], JSON)
    return cp, parts


def test_save_records_every_file_and_load_restores_every_part(tmp_path):
    cp, parts = _checkpointer(tmp_path, fill=5.0)
    where = cp.save(10, {"variant": "sn"})
    state = ckpt.read_state(where)
    assert (where / ckpt.COMPLETE).is_file() and (tmp_path / ckpt.LATEST).read_text().strip() == "step-00000010"
    assert state["step"] == 10 and state["world_size"] == 1 and state["variant"] == "sn"
    assert state["parts"] == {"loop": {"value": 5}}
    assert sorted(state["files"]) == ["engine/model_states.pt", "engine/zero_pp_rank_0_optim_states.pt",
                                      "rank-00000.pt", "weights.pt"]
    assert all(f["size"] == (where / n).stat().st_size for n, f in state["files"].items())
    expected = torch.rand(2, generator=parts["rng"].generator)

    fresh, restored = _checkpointer(tmp_path, fill=0.0)
    point = fresh.select()
    assert point.tag == "step-00000010" and point.skipped == []
    fresh.load(point)
    assert torch.equal(restored["weights"].tensor, torch.full((3, 2), 5.0))
    assert torch.equal(restored["engine"].tensor, torch.full((4,), 5.0))
    assert restored["engine"].loaded_from == (where / "engine", False)
    assert restored["loop"].value == 5
    assert torch.equal(torch.rand(2, generator=restored["rng"].generator), expected)


def test_no_checkpoint_is_a_fresh_start(tmp_path):
    assert _checkpointer(tmp_path)[0].select() is None


def test_pruning_keeps_the_newest_and_best(tmp_path):
    cp, _ = _checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        cp.save(step, {}, best=step == 2)
    assert ckpt.complete_tags(tmp_path) == ["step-00000002", "step-00000003", "step-00000004"]
    assert ckpt.best_tag(tmp_path) == "step-00000002"


def test_a_killed_save_leftover_is_replaced(tmp_path):
    cp, _ = _checkpointer(tmp_path)
    stale = tmp_path / "step-00000007" / "engine" / "old_shard.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    where = cp.save(7, {})
    assert not stale.exists() and "engine/old_shard.pt" not in ckpt.read_state(where)["files"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "state_json", "extra"])
def test_damaged_newest_checkpoint_falls_back_with_one_line(tmp_path, damage, capsys):
    cp, _ = _checkpointer(tmp_path, fill=1.0)
    cp.save(10, {})
    cp2, _ = _checkpointer(tmp_path, fill=2.0)
    newest = cp2.save(20, {})
    shard = newest / "engine" / "zero_pp_rank_0_optim_states.pt"
    if damage == "flip":  # same size, 16 bytes inverted
        data = bytearray(shard.read_bytes())
        data[-40:-24] = bytes(255 - b for b in data[-40:-24])
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:50])
    elif damage == "delete":
        shard.unlink()
    elif damage == "state_json":
        shard = newest / ckpt.STATE
        shard.unlink()
    else:
        shard = newest / "engine" / "planted.pt"
        shard.write_bytes(b"x")
    fresh, parts = _checkpointer(tmp_path, fill=0.0)
    point = fresh.select()
    assert point.tag == "step-00000010"
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and str(shard) in lines[0] and "step-00000020" in lines[0]
    fresh.load(point)
    assert parts["loop"].value == 1
    # set aside, so the resumed run saves step 20 again and pruning never counts it as good
    assert (tmp_path / "step-00000020.damaged").is_dir() and ckpt.complete_tags(tmp_path) == ["step-00000010"]
    parts["loop"].value = 7
    fresh.save(20, {})
    assert ckpt.read_state(tmp_path / "step-00000020")["parts"]["loop"] == {"value": 7}
    assert ckpt.newest_complete(tmp_path) == "step-00000020"


def test_no_intact_checkpoint_is_one_error(tmp_path):
    cp, _ = _checkpointer(tmp_path)
    where = cp.save(10, {})
    (where / "weights.pt").write_bytes(b"\0" * (where / "weights.pt").stat().st_size)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*weights\.pt has SHA-256"):
        _checkpointer(tmp_path)[0].select()


def test_disk_full_while_saving_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    cp, _ = _checkpointer(tmp_path)
    cp.save(10, {})

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpointer_module, "torch_save_atomic", full)
    with pytest.raises(CheckpointError) as caught:
        cp.save(20, {})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("no space left on device writing ") and "weights.pt" in message
    assert "checkpoint step-00000010 is intact" in message
    assert not (tmp_path / "step-00000020").exists()  # the partial one is removed (frees space)
    assert ckpt.newest_complete(tmp_path) == "step-00000010"


def test_torch_writer_errors_on_a_full_disk_are_named_too(tmp_path, monkeypatch):
    """torch.save on a full disk raises RuntimeError ("basic_ios::clear") without errno."""
    cp, _ = _checkpointer(tmp_path)

    def broken(obj, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(checkpointer_module, "torch_save_atomic", broken)
    monkeypatch.setattr(checkpointer_module, "_free_bytes", lambda where: 4096)
    with pytest.raises(CheckpointError, match=r"^no space left on device writing .*weights\.pt; no checkpoint was "
                                              "written before"):
        cp.save(5, {})


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_crafted_pickle_in_a_checkpoint_does_not_run(tmp_path):
    """A file whose unpickling would create a marker: neither resume nor a direct load runs it."""
    cp, _ = _checkpointer(tmp_path)
    where = cp.save(10, {})
    marker = tmp_path / "PWNED"
    crafted = pickle.dumps({"w": _Marker(str(marker))})
    (where / "weights.pt").write_bytes(crafted)
    with pytest.raises(CheckpointError, match="weights.pt"):  # digest differs: never reaches a loader
        _checkpointer(tmp_path)[0].select()
    torch.save({"w": _Marker(str(marker))}, where / "rank-00000.pt")
    with pytest.raises(CheckpointError, match="cannot be read"):  # even unverified, weights_only refuses it
        ckpt.load_torch(where / "rank-00000.pt")
    assert not marker.exists()


def test_torn_metrics_line_after_the_checkpoint_does_not_block_resume(tmp_path):
    """Issue 13, item 2: a job killed while appending left `{"step": 15, "loss_cri`."""
    metrics = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss_critic": -s / 10} for s in (5, 10, 15)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records[:2]) + json.dumps(records[2]) + "\n"
                       + '{"step": 15, "loss_cri')
    cp = Checkpointer(tmp_path / "checkpoints", rank=0, world_size=1, keep=2)
    step = {"now": 10}
    cp.register("metrics", MetricsPosition(metrics, 0, lambda: step["now"]), JSON)
    cp.save(10, {})
    fresh = Checkpointer(tmp_path / "checkpoints", rank=0, world_size=1, keep=2)
    fresh.register("metrics", MetricsPosition(metrics, 0, lambda: 0), JSON)
    fresh.load(fresh.select())
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [5, 10]
    with metrics.open("a") as handle:  # the resumed job appends: one continuous log
        handle.write(json.dumps({"step": 11}) + "\n")
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [5, 10, 11]


def test_resharded_load_converts_and_derives_rng(tmp_path):
    cp, _ = _checkpointer(tmp_path, fill=3.0, world_size=1)
    where = cp.save(10, {})
    fresh, parts = _checkpointer(tmp_path, fill=0.0, world_size=1)
    fresh.world_size = 2  # the one process plays rank 0 of 2
    point = fresh.select()
    fresh.load(point)
    assert parts["engine"].loaded_from == (where / ckpt.UNIVERSAL / "engine", True)
    assert fresh.converted == ["engine (1 shard)"]
    again = torch.Generator()
    ckpt.derived_rng_state(3, 10, 0, 2, again)
    assert torch.equal(parts["rng"].generator.get_state(), again.get_state())
    other = torch.Generator()
    ckpt.derived_rng_state(3, 10, 1, 2, other)
    assert not torch.equal(other.get_state(), again.get_state())  # each rank its own stream
    ckpt.verify(where, ckpt.read_state(where))  # the conversion beside the shards does not break the record


def test_checkpoints_command_lists_tags_steps_world_sizes_and_integrity(tmp_path, capsys):
    from hpc_gan.cli import main

    run = tmp_path / "run"
    cp, _ = _checkpointer(run / "checkpoints")
    cp.save(10, {})
    newest = cp.save(20, {})
    (newest / "weights.pt").write_bytes(b"\0" * (newest / "weights.pt").stat().st_size)
    assert main(["checkpoints", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["tag", "step", "ranks", "files", "size", "pointers", "integrity"]
    assert out[1].split()[:4] == ["step-00000010", "10", "1", "4"] and out[1].endswith("ok")
    assert out[2].startswith("step-00000020") and "latest" in out[2] and "DAMAGED" in out[2] and "weights.pt" in out[2]
    assert main(["checkpoints", str(tmp_path / "nowhere")]) == 2


def test_a_checkpoint_written_before_records_and_parts_still_resumes(tmp_path, caplog):
    """state.json of earlier versions: no "files", the data cursor at the top level."""
    cp, _ = _checkpointer(tmp_path, fill=4.0)
    where = cp.save(10, {})
    state = ckpt.read_state(where)
    legacy = {k: v for k, v in state.items() if k not in ("parts", "files")} | {"loop": state["parts"]["loop"]}
    (where / ckpt.STATE).write_text(json.dumps(legacy))
    fresh, parts = _checkpointer(tmp_path, fill=0.0)
    with caplog.at_level("WARNING"):
        point = fresh.select()
    assert "records no file digests" in caplog.text
    fresh.load(point)
    assert parts["loop"].value == 4 and torch.equal(parts["weights"].tensor, torch.full((3, 2), 4.0))
