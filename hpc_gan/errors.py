"""The project's exceptions: a user or input error is one of these and carries one clear line.

Command-line entry points catch :class:`HpcGanError`, print its message on one line
(:func:`print_error`) and exit non-zero; anything else is a bug and keeps its traceback.
"""

import json
import os
import sys
import time

# torchrun (torch.distributed.elastic) gives each rank a file for its error; its failure summary
# and hpc_gan's own rank launcher (hpc_gan.launch.ranks) show what a rank wrote there.
TORCHELASTIC_ERROR_FILE = "TORCHELASTIC_ERROR_FILE"


def print_error(line: str) -> None:
    """Print a command's one error line to stderr and, under torchrun, record it as this rank's
    error so the launcher's summary quotes it (instead of "To enable traceback see ...")."""
    print(line, file=sys.stderr, flush=True)
    path = os.environ.get(TORCHELASTIC_ERROR_FILE)
    if not path:
        return
    record = {"message": line, "timestamp": int(time.time())}  # the plain form ProcessFailure reads
    try:
        with open(path, "w") as handle:
            json.dump(record, handle)
    except OSError:
        pass  # the line is printed; the summary then says less


class HpcGanError(ValueError):
    """Base of every error a user can fix; the message names what is wrong and how to fix it."""


class ConfigError(HpcGanError):
    """A configuration file, key or value is invalid."""


class DataError(HpcGanError):
    """Input volumes, shards or the manifest are missing, malformed or inconsistent."""


class CheckpointError(HpcGanError):
    """A checkpoint is missing, incomplete, truncated or of another variant."""


class LaunchError(HpcGanError):
    """A job cannot be submitted as asked."""


class OutputError(HpcGanError):
    """An output path cannot be written: it is a file, lies under a file, is not writable, or the
    disk filled up while writing."""
