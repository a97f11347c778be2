"""Output shared by the benchmarks: one JSON object on stdout, optionally also in a file."""

from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, out: str | None) -> int:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return 0
