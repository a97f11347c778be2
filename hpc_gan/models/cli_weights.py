"""``hpc_gan weights``: fetch pinned MedicalNet weights into the Hugging Face cache, or list them.

``hpc_gan weights fetch medicalnet_resnet10`` (on a node with internet access, once) downloads the
file at its pinned revision and checks its SHA-256; ``hpc_gan evaluate --weights
medicalnet_resnet10`` then reads it from the cache (``HF_HOME``) on any node that sees it.
"""

from __future__ import annotations

import argparse
import logging

from hpc_gan.errors import CheckpointError
from hpc_gan.models import pretrained


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=type(parser))
    fetch = actions.add_parser("fetch", help="download pinned weights into the Hugging Face cache and verify them")
    fetch.add_argument("names", nargs="+", metavar="NAME", choices=list(pretrained.PRETRAINED),
                       help=f"one or more of: {', '.join(pretrained.PRETRAINED)}")
    actions.add_parser("list", help="the pinned weights, their source and whether they are in the cache")


def _describe(pin: pretrained.PretrainedWeights) -> str:
    size = "size not pinned" if pin.size is None else f"{pin.size:,} bytes"
    return f"{pin.repo_id}/{pin.filename}@{pin.revision[:7]}, {size}, SHA-256 {pin.sha256[:12]}…"


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "debug", False):  # huggingface_hub's HTTP client logs every request at INFO
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if args.action == "list":
        print(f"cache: {pretrained.cache_location()} (HF_HOME / HF_HUB_CACHE)")
        for name, pin in pretrained.PRETRAINED.items():
            try:
                where = str(pretrained.cached_path(name))
            except CheckpointError:
                where = "not fetched"
            print(f"{name:<31} {pin.architecture:<20} {_describe(pin)}: {where}")
        return 0
    for name in dict.fromkeys(args.names):  # once each, in the order given
        path = pretrained.fetch(name)
        pin = pretrained.PRETRAINED[name]
        print(f"{name}: {path} ({_describe(pin)} verified); use it with --weights {name}")
    return 0
