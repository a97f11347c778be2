"""After a rank dies, the survivor names it in one line (issue 13.10): two real training ranks
(plain processes, as srun starts them); rank 1 is killed (SIGKILL) at its third step."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_gan.dist import free_port, without_launcher_env

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(400)]

SCRIPT = """
import os, signal, sys
from hpc_gan.train import __main__ as train_main
from hpc_gan.train import trainer

real_iteration, count = trainer.train_iteration, [0]

def iteration(*args, **kwargs):
    count[0] += 1
    if count[0] == 3 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer or a node failure would
    return real_iteration(*args, **kwargs)

trainer.train_iteration = iteration
sys.exit(train_main.main(sys.argv[1:]))
"""


def test_the_survivor_names_the_dead_rank_and_its_host(smoke_shards, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(SCRIPT)
    argv = [sys.executable, str(script), "--variant", "sn", "--profile", "smoke"]
    for item in (f"data.root={smoke_shards}", f"output_root={tmp_path}", "train.max_steps=20", "train.eval_every=0",
                 "train.image_every=0", "train.log_every=1"):
        argv += ["--set", item]
    port = str(free_port())
    base = without_launcher_env() | {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "WORLD_SIZE": "2",
                                     "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    ranks = [subprocess.Popen(argv, cwd=REPO, env=base | {"RANK": str(r), "LOCAL_RANK": str(r)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    out0, err0 = ranks[0].communicate(timeout=360)
    ranks[1].communicate(timeout=60)
    assert ranks[1].returncode == -signal.SIGKILL
    assert ranks[0].returncode == 2, out0 + err0
    assert "Traceback" not in err0, err0  # before: gloo's 'Connection closed by peer' traceback, no rank named
    last = err0.strip().splitlines()[-1]
    assert last.startswith(f"error: rank 0: rank 1 (host {socket.gethostname()}, pid {ranks[1].pid}) is gone: "
                           "its process ended without an error line"), err0
    assert last.endswith("this rank stops too")
