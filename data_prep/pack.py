#!/usr/bin/env python
"""Thin wrapper: same as `hpc_gan pack ...` (see `--help`)."""
import sys

from hpc_gan.cli import main

if __name__ == "__main__":
    sys.exit(main(["pack", *sys.argv[1:]]))
