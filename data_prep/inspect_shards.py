#!/usr/bin/env python
"""Thin wrapper: same as `hpc_gan inspect ...` (see `--help`)."""
import sys

from hpc_gan.cli import main

if __name__ == "__main__":
    sys.exit(main(["inspect", *sys.argv[1:]]))
