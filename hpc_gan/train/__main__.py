"""``python -m hpc_gan.train``: one rank of a training job, under torchrun, srun or mpiexec.

    python -m hpc_gan.train --nproc-per-node 2 --variant sn --profile smoke --set data.root=demo_out/shards
    torchrun --nproc_per_node 2 -m hpc_gan.train --variant sn --profile smoke --set data.root=demo_out/shards
    srun python -m hpc_gan.train --config runs/exp/c_sn_mp/config.yaml
    mpiexec -n 2 python -m hpc_gan.train --variant gp --profile smoke

``--nproc-per-node N`` starts N ranks on this machine itself (torchrun's agent, see
:mod:`hpc_gan.launch.ranks`) and ends with the failed rank's own error line; plain torchrun ends
with its ChildFailedError traceback after it (its failure table quotes the rank's line).

Runs with ``privacy.enabled`` (variant dp) are trained by the DP-SGD trainer
(:mod:`hpc_gan.train.dp_trainer`, Opacus, no DeepSpeed), all others by the DeepSpeed one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from hpc_gan.cli import OneLineParser
from hpc_gan.cli_config import add_config_arguments, load_from_args
from hpc_gan.cli_types import positive_int
from hpc_gan.errors import HpcGanError, print_error

EXIT_REQUEUE = 3  # checkpointed after the time-limit signal (SIGUSR2): the launcher requeues the job
EXIT_STOPPED = 4  # checkpointed after SIGTERM (scancel or preemption): no self-requeue


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options; a usage error is one line and exit status 2, as with ``hpc_gan`` commands."""
    parser = OneLineParser(prog="python -m hpc_gan.train", description=__doc__.splitlines()[0])
    add_config_arguments(parser, variant_required=False)
    parser.add_argument("--config", help="a resolved config.yaml (instead of --variant/--profile/--set)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--nproc-per-node", type=positive_int, metavar="N",
                        help="start N ranks on this machine (instead of torchrun / srun / mpiexec)")
    args = parser.parse_args(argv)
    if not args.config and not args.variant:
        parser.error("give --variant (with optional --profile/--set) or --config")
    return args


def main(argv: list[str] | None = None) -> int:
    from hpc_gan.train import stop

    args = parse_args(argv)
    if args.nproc_per_node:  # this process only starts the ranks (torchrun's agent handles signals)
        return _launch(args.nproc_per_node, sys.argv[1:] if argv is None else argv)
    stop.install()  # before the slow start-up, so that a time-limit signal during it is not lost
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    from hpc_gan import config, dist, peers

    env = dist.detect()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format=f"%(asctime)s rank{env.rank} %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    roster = None
    try:
        cfg = config.load_resolved(args.config) if args.config else load_from_args(args)
        dist.init_process_group(env)
        roster = peers.current()  # who runs where (gathered on joining): named if one of them dies
        roster.keep_records(cfg.run_dir)
        trainer = trainer_class(cfg)(cfg, env)
        trainer.fit()
        dist.barrier()
        if trainer.stop_requested:
            return EXIT_REQUEUE if trainer.requeue else EXIT_STOPPED
    except HpcGanError as exc:
        if args.debug:
            raise
        if roster is not None:
            roster.record_exit("error", str(exc))
        print_error(f"error: rank {env.rank}: {exc}")
        return 2
    except RuntimeError as exc:  # a collective failed: name the rank that is gone instead of gloo's traceback
        if args.debug or roster is None or not peers.is_lost_peer(exc):
            raise
        print_error(f"error: rank {env.rank}: {roster.lost_peer_line(exc)}")
        return 2
    finally:
        dist.shutdown()  # never leave the process group to interpreter teardown (it may abort)
    return 0


def _launch(nproc: int, argv: list[str]) -> int:
    """This command as ``nproc`` local ranks (each without ``--nproc-per-node``)."""
    from hpc_gan import dist
    from hpc_gan.launch.ranks import run_local_ranks

    if dist.detect().launcher != "single":
        print_error("error: --nproc-per-node starts the ranks itself; drop it under torchrun, srun or mpiexec")
        return 2
    rest = []
    for arg in argv:
        if rest and rest[-1] == "--nproc-per-node":
            rest.pop()  # and its value
        elif not arg.startswith("--nproc-per-node="):
            rest.append(arg)
    return run_local_ranks(nproc, "hpc_gan.train", rest)


def trainer_class(cfg):
    """The DP-SGD trainer (Opacus) for privacy.enabled runs, the DeepSpeed trainer otherwise."""
    if cfg.privacy.enabled:
        from hpc_gan.train.dp_trainer import DPTrainer

        return DPTrainer
    from hpc_gan.train.trainer import Trainer

    return Trainer


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
