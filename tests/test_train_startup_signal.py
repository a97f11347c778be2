"""A stop signal that arrives during a rank's start-up (issue 13.9) is honoured at the first step
boundary: checkpoint, exit for requeue. One real training process; the signal is sent while the
process group is being joined, i.e. before the trainer is even built, with a handler already in
place that ignores it (as submitit's does on every rank but the first)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_gan.dist import without_launcher_env

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]

SCRIPT = """
import os, signal, sys
from hpc_gan import dist
from hpc_gan.train import __main__ as train_main

SIG = getattr(signal, os.environ["STOP_SIGNAL"])
signal.signal(SIG, lambda *a: print("submitit: Not checkpointing nor requeuing since I am a slave", flush=True))
real_init = dist.init_process_group

def slow_start_up(env, *args, **kwargs):
    os.kill(os.getpid(), SIG)  # in the middle of start-up
    return real_init(env, *args, **kwargs)

dist.init_process_group = slow_start_up
code = train_main.main(sys.argv[1:])
print(f"EXIT {code}", flush=True)
"""


@pytest.mark.parametrize("name, code", [("SIGUSR2", 3), ("SIGTERM", 4)])
def test_a_stop_signal_during_start_up_is_not_lost(smoke_shards, tmp_path, name, code):
    """SIGUSR2 (time limit): checkpoint, exit 3 for requeue. SIGTERM (scancel or preemption):
    checkpoint, exit 4 without self-requeue, so a cancelled job stays cancelled."""
    script = tmp_path / "rank.py"
    script.write_text(SCRIPT)
    argv = [sys.executable, str(script), "--variant", "sn", "--profile", "smoke"]
    for item in (f"data.root={smoke_shards}", f"output_root={tmp_path}", "train.max_steps=30", "train.eval_every=0",
                 "train.image_every=0", "train.checkpoint_every=100", "train.log_every=10"):
        argv += ["--set", item]
    env = without_launcher_env() | {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "STOP_SIGNAL": name}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=280, cwd=REPO, env=env)
    assert f"EXIT {code}" in done.stdout, done.stdout + done.stderr  # checkpointed, then requeue or stop
    assert "I am a slave" not in done.stdout  # the trainer's handler, not the ignoring one, got it
    run = tmp_path / "run" / "sn"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000001"
    assert json.loads((run / "checkpoints" / "step-00000001" / "state.json").read_text())["step"] == 1
