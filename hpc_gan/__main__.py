import sys

from hpc_gan.cli import main

sys.exit(main())
