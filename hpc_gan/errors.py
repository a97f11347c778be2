"""The project's exceptions: a user or input error is one of these and carries one clear line.

Command-line entry points catch :class:`HpcGanError`, print its message on one line and exit
non-zero; anything else is a bug and keeps its traceback.
"""


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
