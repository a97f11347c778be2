"""Start N ranks of an hpc_gan command on this machine through torchrun's agent, and end with
the job's own error line.

    python -m hpc_gan.train --nproc-per-node 2 --variant sn --profile smoke --set data.root=data/shards

Plain ``torchrun`` works as well, but when a rank fails torchrun ends with its own
``ChildFailedError`` traceback and failure table after the rank's one line. Here the same agent
(:func:`torch.distributed.run.run`: rendezvous on 127.0.0.1 at a free port, one process per rank,
the others stopped when one fails) runs the ranks, and its failure is turned into the failed
rank's own line (each rank records it with :func:`hpc_gan.errors.print_error`), printed last.
"""

from __future__ import annotations

import sys

EXIT_FAILED = 1  # a rank died without an exit status of its own (a signal)


def run_local_ranks(nproc: int, module: str, argv: list[str]) -> int:
    """Run ``python -m <module> <argv>`` as ``nproc`` ranks here; returns the job's exit status.

    Args:
        nproc: ranks (processes) to start.
        module: e.g. ``"hpc_gan.train"``.
        argv: its arguments (without the launcher's).

    Returns:
        0 when every rank succeeded, else the exit status of the failed rank it reports
        (:func:`_cause`; ``EXIT_FAILED`` for a rank killed by a signal), after printing one
        line: that rank's own error line, or what is known of its end.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from hpc_gan.dist import free_port, LOCALHOST

    args = get_args_parser().parse_args(["--nnodes", "1", "--nproc-per-node", str(nproc), "--master-addr", LOCALHOST,
                                         "--master-port", str(free_port()), "--module", module, *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = _cause(exc.failures)
        line = _message(failure)
        if not line.startswith("error: "):
            line = f"error: rank {rank} failed ({line}); its output is above"
        print(line, file=sys.stderr, flush=True)
        return _exit_status(failure, exc.failures)
    return 0


def _exit_status(reported, failures: dict) -> int:
    """The reported rank's exit status; when the agent's SIGTERM to the other ranks ended it
    after it wrote its own line (a negative status), the status of a rank that exited by itself
    with its own line (e.g. 2 for a user error), else ``EXIT_FAILED``."""
    if reported.exitcode > 0:
        return reported.exitcode
    own = [f.exitcode for f in failures.values() if _message(f).startswith("error: ") and f.exitcode > 0]
    return min(own) if own else EXIT_FAILED


def _message(failure) -> str:
    message = failure.message
    return message.get("message", "") if isinstance(message, dict) else str(message)  # dict: torch's own record


def _cause(failures: dict) -> tuple:
    """The failure to report: the earliest one that left its own error line (the others were
    usually stopped by the agent because of it), else the earliest; ties go to the lower rank."""
    own = {rank: f for rank, f in failures.items() if _message(f).startswith("error: ")}
    return min((own or failures).items(), key=lambda item: (item[1].timestamp, item[0]))
