"""Stop requests: SLURM's time-limit signal (SIGUSR2, ``--signal``) or a preemption's SIGTERM.

The handler only records the request; the ranks agree at the next step boundary, checkpoint
together and exit. Only the time-limit signal (SIGUSR2) makes the job requeue itself
(:mod:`hpc_gan.launch.job`): SIGTERM is what ``scancel`` sends, and also what a preemption sends
before SLURM requeues the job by itself (``PreemptMode=REQUEUE``), so after SIGTERM the job
checkpoints and stops without requeueing — a cancelled job stays cancelled. It is installed by
``python -m hpc_gan.train`` before anything slow happens (joining the process group, DeepSpeed's
initialisation, checking the shards, resuming): a signal that arrives during start-up is kept
and honoured at the first step boundary. Before, the handler was installed only when the loop
began, so a signal during start-up was lost on the ranks where submitit's own handler ignores it
("Not checkpointing nor requeuing since I am a slave") and the job ran on past its time limit.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
_requested: list[str] = []  # names of the signals received since install()


def _handler(signum, _frame) -> None:
    _requested.append(signal.Signals(signum).name)
    log.warning("received %s: will checkpoint at the next step boundary", signal.Signals(signum).name)


def install() -> None:
    """Record SIGUSR2 and SIGTERM from now on (idempotent; keeps requests already recorded).
    Outside the main thread (some test runners) nothing is installed: no requeue there."""
    for sig in STOP_SIGNALS:
        try:
            if signal.getsignal(sig) is not _handler:
                signal.signal(sig, _handler)
        except ValueError:
            pass


def requested() -> bool:
    """Whether a stop signal has arrived since :func:`install` (or the last :func:`clear`)."""
    return bool(_requested)


def requeue_wanted() -> bool:
    """Whether a recorded request asks the job to requeue itself: the time-limit signal (SIGUSR2)
    was among them. SIGTERM alone (scancel, or a preemption SLURM requeues itself) does not."""
    return signal.SIGUSR2.name in _requested


def clear() -> None:
    """Forget recorded requests (a new run in the same process)."""
    _requested.clear()
