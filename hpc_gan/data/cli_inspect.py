"""``hpc_gan inspect``: summarise a packed dataset and verify its shards against the manifest."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="directory holding manifest.json")
    parser.add_argument("--verify", default="full", choices=("full", "size", "none"),
                        help="full: SHA-256 of every shard (default); size: file sizes; none")


def run(args: argparse.Namespace) -> int:
    from hpc_gan.data.cli_pack import summary
    from hpc_gan.data.manifest import load_manifest, verify_shards

    manifest = load_manifest(args.root)
    for split in manifest.splits():
        verify_shards(manifest, split, args.verify)
    print(summary(manifest.data))
    print(f"manifest sha256 {manifest.digest[:16]}…, shards verified ({args.verify})")
    return 0
