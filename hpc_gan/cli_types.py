"""argparse types shared by the command lines: they reject bad values with a one-line message."""

from __future__ import annotations

import argparse
import math


def _numbers(text: str, kind: type, count: int, what: str) -> tuple:
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        values = tuple(kind(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not {count} {what} separated by commas") from None
    if len(values) != count:
        raise argparse.ArgumentTypeError(f"'{text}' has {len(values)} values; give {count}, e.g. 128,128,64")
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"'{text}': every value must be positive")
    return values


def shape3(text: str) -> tuple[int, int, int]:
    """'128,128,64' (or 128x128x64) -> (128, 128, 64)."""
    return _numbers(text, int, 3, "integers")


def spacing3(text: str) -> tuple[float, float, float]:
    """'0.5,0.5,0.8' -> (0.5, 0.5, 0.8)."""
    return _numbers(text, float, 3, "numbers")


def fractions3(text: str) -> tuple[float, float, float]:
    """'0.8,0.1,0.1' -> (0.8, 0.1, 0.1); zeros allowed."""
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not three fractions like 0.8,0.1,0.1") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"'{text}' has {len(values)} values; give train,val,test like 0.8,0.1,0.1")
    return values


def add_data_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data-cache``, ``--data-cache-dir``, ``--data-cache-dtype``, ``--keep-data-cache``: the ``data.cache*`` config
    fields for commands that read packed data without a run config (evaluate, tstr)."""
    parser.add_argument("--data-cache", choices=("none", "memory", "local_disk"), default="none",
                        help="decode the real splits once per node into a shared compact store (as data.cache)")
    parser.add_argument("--data-cache-dir", default="",
                        help="local_disk store directory (default $SLURM_TMPDIR, else the system temp)")
    parser.add_argument("--data-cache-dtype", choices=("float16", "float32"), default="float16",
                        help="image precision in the store (as data.cache_image_dtype)")
    parser.add_argument("--keep-data-cache", action="store_true", help="leave the store in place at the end")


def data_cache_settings(args: argparse.Namespace):
    """The :class:`~hpc_gan.data.cache.CacheSettings` of :func:`add_data_cache_arguments`."""
    from hpc_gan.data.cache import CacheSettings

    return CacheSettings(args.data_cache, args.data_cache_dir, args.data_cache_dtype, args.keep_data_cache)


def _int_at_least(text: str, minimum: int, bound: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} must be {bound}")
    return value


def positive_int(text: str) -> int:
    """'4' -> 4; 0, negatives and non-numbers are refused."""
    return _int_at_least(text, 1, "at least 1")


def non_negative_int(text: str) -> int:
    """'0' -> 0; negatives and non-numbers are refused (seeds, counts that may be zero)."""
    return _int_at_least(text, 0, "0 or more")


def positive_float(text: str) -> float:
    """'80' -> 80.0; zero, negatives and non-numbers are refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{value} must be a positive number")
    return value
