"""``python -m hpc_gan.eval ...`` (e.g. under torchrun): same as ``hpc_gan evaluate ...``."""
import sys

from hpc_gan.cli import main

sys.exit(main(["evaluate", *sys.argv[1:]]))
