"""``python -m hpc_gan.train``: one rank of a training job, under torchrun, srun or mpiexec.

    torchrun --nproc_per_node 2 -m hpc_gan.train --variant sn --profile smoke --set data.root=demo_out/shards
    srun python -m hpc_gan.train --config runs/exp/c_sn_mp/config.yaml
    mpiexec -n 2 python -m hpc_gan.train --variant gp --profile smoke

Runs with ``privacy.enabled`` (variant dp) are trained by the DP-SGD trainer
(:mod:`hpc_gan.train.dp_trainer`, Opacus, no DeepSpeed), all others by the DeepSpeed one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from hpc_gan.config_cli import add_config_arguments, load_from_args
from hpc_gan.errors import HpcGanError

EXIT_REQUEUE = 3  # checkpointed after a stop signal: the launcher requeues the job


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hpc_gan.train", description=__doc__.splitlines()[0])
    add_config_arguments(parser, variant_required=False)
    parser.add_argument("--config", help="a resolved config.yaml (instead of --variant/--profile/--set)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if not args.config and not args.variant:
        parser.error("give --variant (with optional --profile/--set) or --config")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    from hpc_gan import config, dist

    env = dist.detect()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format=f"%(asctime)s rank{env.rank} %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = config.load_resolved(args.config) if args.config else load_from_args(args)
        dist.init_process_group(env)
        trainer = trainer_class(cfg)(cfg, env)
        trainer.fit()
        dist.barrier()
        if trainer.stop_requested:
            return EXIT_REQUEUE
    except HpcGanError as exc:
        if args.debug:
            raise
        print(f"error: rank {env.rank}: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


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
