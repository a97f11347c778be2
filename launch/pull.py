#!/usr/bin/env python
"""Thin wrapper: same as `hpc_gan pull ...` (see `--help`)."""
import sys

from hpc_gan.cli import main

if __name__ == "__main__":
    sys.exit(main(["pull", *sys.argv[1:]]))
