"""What every task of a submitted training job runs (pickled by submitit).

Stopping early (time limit or preemption) works in three steps that keep DeepSpeed's collective
``save_checkpoint`` safe:

1. SLURM's ``--signal`` (USR2, before the time limit) or a preemption's TERM reaches every rank;
   the trainer's handler (:mod:`hpc_gan.train.stop`) only records it. It replaces submitit's
   handler (which would requeue from rank 0 at once, in the middle of a step, and ignores the
   signal on the other ranks) as the first thing the trainer does, before the slow start-up, so a
   signal during start-up is honoured at the first step boundary.
2. At the next step boundary the ranks agree (one all-reduce), write one checkpoint together and
   return :data:`~hpc_gan.train.__main__.EXIT_REQUEUE` after USR2, or
   :data:`~hpc_gan.train.__main__.EXIT_STOPPED` after TERM alone: TERM is also what ``scancel``
   sends, and a preempted job is requeued by SLURM itself, so the job stops without requeueing
   (a cancelled job stays cancelled).
3. After USR2, rank 0 then calls submitit's own handler, which counts the timeouts (at most
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
        from hpc_gan.train.__main__ import EXIT_REQUEUE, EXIT_STOPPED
        from hpc_gan.train.__main__ import main as train_main

        _export_local_ranks()
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        code = train_main(["--config", self.config])
        if code == EXIT_REQUEUE:
            if callable(submitit_handler) and _global_rank() == 0:
                submitit_handler(signal.SIGUSR2, None)  # checkpoint() + scontrol requeue, then exits
            return {"config": self.config, "status": "stopped for requeue"}
        if code == EXIT_STOPPED:  # SIGTERM: scancel (stays cancelled) or a preemption (SLURM requeues)
            return {"config": self.config, "status": "stopped"}
        if code != 0:
            raise RuntimeError(f"training failed with exit status {code}; the error line is in this task's log")
        # Training is over: a time-limit signal now has nothing left to save. Ignore it, or it would
        # kill the task while it consolidates or exits (Python restores the default action, which
        # terminates, when it shuts down) and SLURM would record a finished run as FAILED.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
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


class EvalJob:
    """Sample from a run's consolidated generator and evaluate the samples (its own job).

    Rank 0 writes ``<run>/samples/`` (HDF5, the training shard format) unless it exists; every
    rank then embeds its share and rank 0 writes ``<run>/eval/report.json`` and the plots.
    """

    def __init__(self, config: str, n: int = 256, seed: int = 0) -> None:
        self.config, self.n, self.seed = config, n, seed

    def __call__(self) -> dict:
        from hpc_gan import dist
        from hpc_gan.data.cache import CacheSettings
        from hpc_gan.eval.evaluate import evaluate
        from hpc_gan.sample import sample_to_disk

        env, cfg = _join_job(self.config)
        samples = cfg.run_dir / "samples"
        if env.rank == 0 and not (samples / "manifest.json").is_file():
            sample_to_disk(newest_consolidated(cfg.run_dir), self.n, samples, fmt="hdf5", seed=self.seed,
                           overwrite=True)
        dist.barrier()
        # overwrite: a requeued evaluation job redoes its own run's report (replaced only when complete)
        evaluate(str(samples), cfg.data.root, str(cfg.run_dir / "eval"), seed=self.seed, rank=env.rank,
                 world_size=env.world_size, data_cache=CacheSettings.from_config(cfg.data), overwrite=True)
        return {"report": str(cfg.run_dir / "eval" / "report.json")}


def _export_local_ranks() -> None:
    """Under submitit's local executor there are no SLURM variables to read ranks from: export
    torchrun's (RANK, WORLD_SIZE, MASTER_ADDR, ...) from submitit's environment instead."""
    import submitit

    if "SLURM_PROCID" not in os.environ:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _join_job(config: str):
    """This task's rank in its job's process group, and the trained run's resolved config."""
    from hpc_gan import dist
    from hpc_gan.config import load_resolved

    _export_local_ranks()
    return dist.join_process_group(), load_resolved(config)


def newest_consolidated(run_dir):
    """The consolidated generator of the newest step in ``run_dir/consolidated``."""
    from pathlib import Path

    from hpc_gan.errors import CheckpointError

    files = sorted(Path(run_dir, "consolidated").glob("generator-step-*.pt"))
    if not files:
        raise CheckpointError(f"'{run_dir}' has no consolidated generator; train it first (or run hpc_gan consolidate)")
    return files[-1]


class TstrJob:
    """The downstream test of one training source as a job: a U-Net trained on a variant's
    samples (sampled first if needed), or on the real patches (``source="real"``), tested on the
    real test subjects. Writes ``<out>/scores.csv``; ``hpc_gan compare`` merges several."""

    def __init__(self, config: str, source: str, out: str, nifti: dict, steps: int, seed: int = 0) -> None:
        self.config, self.source, self.out, self.nifti, self.steps, self.seed = config, source, out, nifti, steps, seed

    def __call__(self) -> dict:
        from hpc_gan.data.cache import CacheSettings
        from hpc_gan.eval.tstr import TstrConfig, run_tstr

        env, cfg = _join_job(self.config)
        source = "real" if self.source == "real" else f"{cfg.variant}={newest_consolidated(cfg.run_dir)}"
        settings = TstrConfig(cfg.data.root, self.nifti["images"], self.nifti["labels"], [source], self.out,
                              masks=self.nifti["masks"], steps=self.steps, batch=cfg.train.batch_size, seed=self.seed,
                              data_cache=CacheSettings.from_config(cfg.data))
        run_tstr(settings, env.rank, env.world_size)
        return {"scores": os.path.join(self.out, "scores.csv")}
