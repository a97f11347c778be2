#!/usr/bin/env python
"""Submit training jobs: same as `hpc_gan submit ...` (see `--help`).

    python launch/submit.py --variant c_sn_mp --nodes 4 --gpus-per-node 4
"""
import sys

from hpc_gan.cli import main

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))
