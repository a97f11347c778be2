"""Resume on another number of ranks (issue 14): a checkpoint written by 1 rank resumes on 2 and
one written by 2 resumes on 1, through DeepSpeed's universal checkpoint conversion. Generator
ZeRO 1, 2, 3 and critic ZeRO 1, 2 are covered across the two directions; the gathered fp32
master weights and Adam moments right after loading equal those that were saved, training goes
on with finite losses, and the job log says what was converted.

Three torchrun launches (tests/mp/reshard_scenarios.py): 1 rank writes, 2 ranks resume and
write, 1 rank resumes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import torchrun

pytestmark = pytest.mark.multiprocess
SCRIPT = str(Path(__file__).parent / "mp" / "reshard_scenarios.py")
RUNS = {"a": (1, 1, 1, 2), "c": (2, 2, 1, 2), "b": (3, 2, 2, 1)}  # name: (ZeRO G, ZeRO D, written by, resumed on)


@pytest.fixture(scope="module")
def work(smoke_shards, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("reshard")
    logs = {}
    launches = ((1, "write:a:1:1:2,write:c:2:2:2"), (2, "resume:a:1:1:4,resume:c:2:2:4,write:b:3:2:2,full:f:2:2:3"),
                (1, "resume:b:3:2:4"))
    for nproc, actions in launches:
        done = torchrun(SCRIPT, str(smoke_shards), str(work), actions, nproc=nproc)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        logs[actions] = done.stdout
    return {"dir": work, "stdout": "\n".join(logs.values())}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_optimizer_states_after_conversion_equal_the_saved_ones(work, name):
    g, d, before, after = RUNS[name]
    saved = torch.load(work["dir"] / f"{name}-{before}.pt", weights_only=True)
    loaded = torch.load(work["dir"] / f"{name}-resumed-{after}.pt", weights_only=True)
    assert set(saved) == set(loaded) and any(k.endswith("exp_avg_sq") for k in saved)
    assert any(float(v.abs().sum()) > 0 for k, v in saved.items() if k.endswith("exp_avg"))  # moments were there
    for key in saved:
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_training_continues_with_finite_losses_and_the_data_position(work, name):
    g, d, before, after = RUNS[name]
    report = json.loads((work["dir"] / f"{name}-resumed-{after}.json").read_text())
    assert report["saved_world_size"] == before and report["resumed_at"] == 2 and report["step"] == 4
    assert len(report["losses"]) == 2 and all(math.isfinite(v) for pair in report["losses"] for v in pair)
    # 2 steps of batch 2 on `before` ranks, then 2 on `after` ranks: the same epoch, nothing re-read
    assert report["data"]["epoch"] == 0 and report["data"]["read"] == 2 * 2 * before + 2 * 2 * after


def test_the_log_says_what_was_converted(work):
    lines = [line for line in work["stdout"].splitlines() if "DeepSpeed's universal format" in line]
    assert len(lines) == 3
    assert any("written by 1 ranks, this job has 2: converted generator (ZeRO shards of 1 ranks), critic" in line
               for line in lines)
    assert any("written by 2 ranks, this job has 1" in line and "RNG streams seeded" in line for line in lines)


def _flip(path: Path, at: int, n: int = 16) -> None:
    """Invert n bytes (same size): the damage that used to be resumed without a word."""
    data = bytearray(path.read_bytes())
    data[at:at + n] = bytes(255 - b for b in data[at:at + n])
    path.write_bytes(bytes(data))


def test_damaged_zero_shard_is_named_and_never_consolidated(work, tmp_path, capsys):
    import shutil

    from hpc_gan.cli import main
    from hpc_gan.errors import CheckpointError
    from hpc_gan.train.consolidate import consolidate

    run = tmp_path / "run"
    shutil.copytree(work["dir"] / "a" / "run" / "sn", run)
    shard = run / "checkpoints" / "step-00000004" / "generator" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    _flip(shard, shard.stat().st_size // 2)
    assert main(["checkpoints", str(run)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert "step-00000002" in rows[1] and rows[1].split()[2] == "1" and rows[1].endswith("ok")
    assert rows[2].split()[2] == "2" and f"DAMAGED: {shard} has SHA-256" in rows[2]
    with pytest.raises(CheckpointError, match=f"{shard} has SHA-256 .* was written"):
        consolidate(run, "step-00000004")
    assert not (run / "consolidated").exists()
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated: named too (was a zip-reader traceback)
    with pytest.raises(CheckpointError, match=f"{shard} has 1000 bytes"):
        consolidate(run, "step-00000004")


def test_consolidated_generator_carries_its_digest(work, tmp_path):
    from hpc_gan.errors import CheckpointError
    from hpc_gan.train.consolidate import consolidate, load_generator

    path = consolidate(work["dir"] / "b" / "run" / "sn", out=tmp_path / "g.pt")  # ZeRO-3 shards of 1 rank
    load_generator(path)
    payload = torch.load(path, weights_only=True)
    name = next(k for k in payload["state_dict"] if k.endswith("weight"))
    payload["state_dict"][name].view(-1)[0] += 1.0  # damaged weights, no sidecar to tell
    torch.save(payload, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match="do not match the digest recorded inside"):
        load_generator(tmp_path / "damaged.pt")


def test_a_full_disk_on_one_rank_is_one_line_on_every_rank(work):
    """Issue 13, item 8: DeepSpeed's writer fails on rank 1 while saving step 2."""
    from hpc_gan.train import checkpoint as ckpt

    lines = [(work["dir"] / f"f-full-{rank}.txt").read_text() for rank in (0, 1)]
    assert lines[0] == lines[1] and "\n" not in lines[0]
    assert lines[0].startswith("no space left on device writing ") and "step-00000002" in lines[0]
    assert "checkpoint step-00000001 is intact" in lines[0]
    root = work["dir"] / "f" / "run" / "sn" / "checkpoints"
    assert ckpt.complete_tags(root) == ["step-00000001"] and not (root / "step-00000002").exists()
