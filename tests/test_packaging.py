"""The built wheel is usable outside the checkout: it carries the configs and `hpc_gan config` works.

Builds the wheel from a copy of the sources (so the checkout gets no build/ or egg-info), installs
it with ``pip install --target`` into a temporary directory that is put first on PYTHONPATH (its
dependencies come from this environment), and runs the command from an unrelated directory.
Tens of seconds on 2 cores: marked ``packaging``, not ``unit``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

REPO = Path(__file__).resolve().parents[1]
SOURCE_FILES = ("setup.cfg", "pyproject.toml", "README.md")


def _pip(*args: str, cwd: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"],
                            cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCE_FILES:
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "hpc_gan", src / "hpc_gan", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp / "dist"), str(src), cwd=tmp)
    (built,) = (tmp / "dist").glob("hpc_gan-*.whl")
    return built


def test_the_wheel_contains_every_config_file(wheel):
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "hpc_gan" / "configs").rglob("*.yaml")}
    assert {"hpc_gan/configs/base.yaml", "hpc_gan/configs/variants/c_sn_mp.yaml",
            "hpc_gan/configs/profiles/smoke.yaml", "hpc_gan/configs/clusters/local.yaml"} <= shipped
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert shipped <= names, f"missing from the wheel: {sorted(shipped - names)}"


def test_config_command_runs_from_another_directory_with_the_wheel_installed(wheel, tmp_path):
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--target", str(site), str(wheel), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("HPC_GAN_CONFIG_DIR", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    code = ("import sys, hpc_gan; from hpc_gan.cli import main; "
            "print('package:', hpc_gan.__file__); sys.exit(main(['config', '--variant', 'c_sn_mp']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    package_line, _, resolved = result.stdout.partition("\n")
    assert package_line.startswith(f"package: {site}"), package_line  # the wheel's copy, not the checkout
    assert "variant: c_sn_mp" in resolved and "ngf: 1024" in resolved
