"""The package's import graph runs one way: no module of a lower layer imports a higher one
(issue 14: the DP trainer moved to train/, set_trainable to models/, the consolidated file's
reader to models/). Command-line modules (cli*.py, __main__.py) are entry points and exempt."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
PACKAGE = Path(__file__).resolve().parent.parent / "hpc_gan"
# lowest first; a package may import its own layer and those before it
LAYERS = [{"errors", "io", "cli_types", "dist", "peers", "config", "cli_config", "plots"}, {"data", "models"}, {"privacy"},
          {"sample"}, {"eval"}, {"train"}, {"launch", "demo", "cli", "cli_sample", "__main__"}]


def _layer(name: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if name in names)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hpc_gan."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("hpc_gan."))
    return found


def test_no_lower_layer_imports_a_higher_one():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1].startswith("cli") or parts[-1] == "__main__" or parts[0] == "__init__":
            continue
        own = _layer(parts[0])
        upward += [f"{'/'.join(parts)} -> {name}" for name in _imports(path) if _layer(name) > own]
    assert upward == []


def test_privacy_imports_nothing_from_train():
    assert all("train" not in _imports(p) for p in (PACKAGE / "privacy").glob("*.py"))
