"""``hpc_gan config``: show the configuration a run would use, or document every key."""

from __future__ import annotations

import argparse

import yaml

from hpc_gan import config


def add_config_arguments(parser: argparse.ArgumentParser, variant_required: bool = True,
                         variant_help: str = "variant name (configs/variants)") -> None:
    """The options every command that composes a run config shares: ``--variant``, ``--profile``,
    ``--cluster-config`` and repeatable ``--set KEY=VALUE`` (into ``args.overrides``)."""
    parser.add_argument("--variant", required=variant_required, help=variant_help)
    parser.add_argument("--profile", help="profile applied on top, e.g. smoke (configs/profiles)")
    parser.add_argument("--cluster-config", dest="cluster_config", help="cluster settings (configs/clusters)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set train.batch_size=2 (repeatable)")


def load_from_args(args: argparse.Namespace) -> config.RunConfig:
    return config.load_config(args.variant, args.profile, args.cluster_config, args.overrides)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, variant_required=False)
    parser.add_argument("--explain", action="store_true", help="list every key with its type, default and meaning")


def run(args: argparse.Namespace) -> int:
    if args.explain:
        for key, kind, default, doc in config.describe():
            print(f"{key:36s} {kind:28s} default {default!r}\n    {doc}")
        return 0
    if not args.variant:
        print("variants:", ", ".join(config.available("variants")))
        print("profiles:", ", ".join(config.available("profiles")))
        print("clusters:", ", ".join(config.available("clusters")))
        return 0
    print(yaml.safe_dump(config.to_dict(load_from_args(args)), sort_keys=False), end="")
    return 0
