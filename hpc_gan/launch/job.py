"""What every task of a submitted training job runs (pickled by submitit).

Stopping early (time limit or preemption) works in three steps that keep DeepSpeed's collective
``save_checkpoint`` safe:

1. SLURM's ``--signal`` (USR2, before the time limit) or a preemption's TERM reaches every rank;
   the trainer's handler only sets a flag (it replaces submitit's handler, which would requeue
   from rank 0 at once, in the middle of a step).
2. At the next step boundary the ranks agree (one all-reduce), write one checkpoint together and
   return :data:`~hpc_gan.train.__main__.EXIT_REQUEUE`.
3. Rank 0 then calls submitit's own handler, which counts the timeouts (at most
   ``cluster.max_requeues``), pickles :meth:`TrainJob.checkpoint` (the same job: it resumes from
   the newest COMPLETE checkpoint) and runs ``scontrol requeue``.

A real error is not requeued: the task raises and SLURM records the job as FAILED. A job that
finishes consolidates its generator (rank 0), so the run directory holds the file to pull.
"""

from __future__ import annotations

import os
import signal


class TrainJob:
    """One variant's training job; ``config`` is the resolved config.yaml in its run directory."""

    def __init__(self, config: str) -> None:
        self.config = config

    def __call__(self) -> dict:
        import submitit

        from hpc_gan.train.__main__ import EXIT_REQUEUE
        from hpc_gan.train.__main__ import main as train_main

        if "SLURM_PROCID" not in os.environ:  # local executor: no SLURM variables to read ranks from
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        code = train_main(["--config", self.config])
        if code == EXIT_REQUEUE:
            if callable(submitit_handler) and _global_rank() == 0:
                submitit_handler(signal.SIGUSR2, None)  # checkpoint() + scontrol requeue, then exits
            return {"config": self.config, "status": "stopped for requeue"}
        if code != 0:
            raise RuntimeError(f"training failed with exit status {code}; the error line is in this task's log")
        result = {"config": self.config, "status": "completed"}
        if _global_rank() == 0:  # the file users pull and sample from
            result["consolidated"] = str(_consolidate(self.config))
        return result

    def checkpoint(self, *args, **kwargs):
        """submitit's requeue hook: resubmit the same job; the trainer resumes by itself."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.config))


def _consolidate(config: str):
    from hpc_gan.config import load_resolved
    from hpc_gan.train.consolidate import consolidate

    return consolidate(load_resolved(config).run_dir)


def _global_rank() -> int:
    return int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0")))
