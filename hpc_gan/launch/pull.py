"""``launch/pull.py`` (``hpc_gan pull``): a run's consolidated generator, checksum-verified, in DEST.

    python launch/pull.py runs/exp1/c_sn_mp --dest models/
    python launch/pull.py me@login:/scratch/me/runs/exp1/c_sn_mp --dest models/ \\
        --remote-python /scratch/me/venv/bin/python

Steps: pick the checkpoint (``--tag``, else the newest COMPLETE one: the ``latest`` pointer if it
names a COMPLETE checkpoint, else the highest ``step-*`` with COMPLETE), consolidate it where the
run lives unless ``consolidated/generator-<tag>.pt`` and its ``.sha256`` exist, then put into DEST:

    <variant>-generator-<tag>.pt          the consolidated generator
    <variant>-generator-<tag>.pt.sha256   its SHA-256 (the run's digest, named for the new file)
    <variant>-config.yaml                 the run's resolved config

The variant prefix keeps variants pulled into one DEST apart (they usually share their last tag);
the variant is the run directory's name (``<output_root>/<name>/<variant>/``). Every file is
copied to a hidden temporary name and renamed once whole; the generator's SHA-256 is recomputed
after the copy and compared with the run's sidecar, and a mismatch deletes the copy. An existing
different file in DEST is replaced only with ``overwrite``; an identical generator is kept (no
transfer). A remote source (``HOST:PATH``) is probed and consolidated over ``ssh`` (a POSIX
shell on the remote side) and copied with ``rsync``, or ``scp`` where rsync is missing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from hpc_gan.io import file_sha256, write_text_atomic
from hpc_gan.errors import CheckpointError, LaunchError
from hpc_gan.launch.status import error_line
from hpc_gan.train import checkpoint as ckpt

REMOTE = re.compile(r"^(?P<host>[^/:\s]+):(?P<path>.+)$")
# Remote paths that a POSIX shell and a literal reader take the same way (what scp may carry).
SHELL_NEUTRAL = re.compile(r"^(~/)?[\w@%+=:,./-]+$", re.ASCII)
DIGEST = re.compile(r"^[0-9a-f]{64}$")
# The remote twin of checkpoint.newest_complete(): `latest` if COMPLETE, else the highest
# step-* with COMPLETE (ls sorts step-%08d numerically).
NEWEST_COMPLETE_SH = ('t=$(cat checkpoints/latest 2>/dev/null); [ -f "checkpoints/$t/COMPLETE" ] || '
                      't=$(ls -d checkpoints/step-*/COMPLETE 2>/dev/null | tail -n 1 | cut -d/ -f2)')

Runner = Callable[[list[str]], subprocess.CompletedProcess]
Fetch = Callable[[str, Path], object]


@dataclass(frozen=True)
class Source:
    """A run directory here (host None) or on ``host`` over ssh."""

    host: str | None
    path: str

    @property
    def variant(self) -> str:
        return PurePosixPath(self.path.rstrip("/")).name if self.host else Path(self.path).resolve().name

    def __str__(self) -> str:
        return f"{self.host}:{self.path}" if self.host else self.path


@dataclass
class Pulled:
    """What :func:`pull` left in DEST."""

    generator: Path
    sidecar: Path
    config: Path
    variant: str
    tag: str
    consolidated: bool  # consolidation ran during this pull
    copied: bool  # False: an identical generator was already in DEST


def parse_source(text: str) -> Source:
    """``host:path`` or ``user@host:path`` -> remote; anything else, or an existing local path, -> local.

    Raises:
        LaunchError: the host begins with ``-`` (ssh, rsync and scp would take it for an option).
    """
    match = None if Path(text).exists() else REMOTE.match(text)
    if match and match["host"].startswith("-"):
        raise LaunchError(f"host '{match['host']}' of '{text}' begins with '-', which ssh would read as an option; "
                          "give a host name, user@host or an address")
    return Source(match["host"], match["path"]) if match else Source(None, text)


def generator_name(tag: str) -> str:
    """The file name consolidate() writes by default under ``<run_dir>/consolidated/``."""
    return f"generator-{tag}.pt"


def sidecar_of(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


# ------------------------------------------------------------------------------- subprocesses


def run_argv(argv: list[str]) -> subprocess.CompletedProcess:
    """Run ssh / rsync / scp: the one subprocess boundary of pulling (tests replace it).

    Raises:
        LaunchError: the program is not installed here.
    """
    try:
        return subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        hint = "; use --via scp" if argv[0] == "rsync" else ""
        raise LaunchError(f"'{argv[0]}' is not installed on this machine{hint}") from None


def checked(result: subprocess.CompletedProcess, what: str) -> str:
    """stdout of a successful command; LaunchError with the command's error line otherwise."""
    if result.returncode == 0:
        return result.stdout
    lines = [line for line in (result.stderr or "").splitlines() if line.strip()]
    reason = error_line(lines) or (lines[-1].strip() if lines else "no message")
    raise LaunchError(f"{what} failed (exit {result.returncode}): {reason}")


def remote_quote(path: str) -> str:
    """shlex.quote, but a leading ``~/`` stays unquoted so the remote shell expands it."""
    return "~/" + shlex.quote(path[2:]) if path.startswith("~/") else shlex.quote(path)


def ssh_argv(host: str, script: str) -> list[str]:
    """argv running ``script`` in ``host``'s shell; ``--`` ends ssh's options before the host."""
    return ["ssh", "--", host, script]


def transfer_argv(host: str, remote_path: str, local_path: Path, tool: str) -> list[str]:
    """argv copying ``host:remote_path`` to ``local_path`` (see the module docstring on quoting).

    Args:
        host: ``[user@]host``, not beginning with ``-``.
        remote_path: the file on ``host``; ``~/`` at its start means the remote home directory.
        local_path: where the copy goes.
        tool: ``rsync`` or ``scp``.

    Raises:
        LaunchError: unknown tool; a host beginning with ``-``; for scp, a path that the remote
            shell would read differently from scp's SFTP protocol.

    Example:
        >>> transfer_argv("login", "/runs/sn/config.yaml", Path("/tmp/x"), "scp")
        ['scp', '-p', '-q', '--', 'login:/runs/sn/config.yaml', '/tmp/x']
    """
    if host.startswith("-"):
        raise LaunchError(f"host '{host}' begins with '-', which ssh would read as an option")
    # Both tools start a remote session in the home directory, so "~/x" is "x"; "./" keeps a
    # relative name that begins with "-" from being read as an option by the remote side.
    path = remote_path[2:] if remote_path.startswith("~/") else remote_path
    path = "./" + path if path.startswith("-") else path
    if tool == "rsync":
        return ["rsync", "--times", "--protect-args", "--", f"{host}:{path}", str(local_path)]
    if tool == "scp":
        if not SHELL_NEUTRAL.match(remote_path):
            raise LaunchError(f"remote path '{remote_path}' holds characters that scp hands to the remote shell "
                              "on some OpenSSH versions and not on others; use --via rsync (which protects "
                              "them) or a path of letters, digits and @%+=:,./_-")
        return ["scp", "-p", "-q", "--", f"{host}:{path}", str(local_path)]
    raise LaunchError(f"unknown transfer tool '{tool}'; use rsync or scp")


def resolve_tool(via: str) -> str:
    if via == "auto":
        return "rsync" if shutil.which("rsync") else "scp"
    return via


# --------------------------------------------------------------------------- the checkpoint


def prepare_local(run_dir: Path, tag: str | None) -> tuple[str, bool]:
    """Pick the tag and consolidate it here if needed; returns (tag, consolidated now)."""
    if not run_dir.is_dir():
        raise LaunchError(f"source '{run_dir}' does not exist; give a run directory or HOST:PATH")
    root = run_dir / "checkpoints"
    if not root.is_dir():
        raise LaunchError(f"'{run_dir}' is not a run directory (no checkpoints/); give <output_root>/<name>/<variant>")
    tag = tag or ckpt.newest_complete(root)
    if tag is None:
        raise CheckpointError(f"'{run_dir}' has no complete checkpoint yet; wait for the first one "
                              "(launch/status.py shows it)")
    if not (root / tag / ckpt.COMPLETE).is_file():
        raise CheckpointError(f"checkpoint '{root / tag}' is not COMPLETE (missing, or its job stopped while "
                              f"saving); complete ones: {', '.join(ckpt.complete_tags(root)) or 'none'}")
    target = run_dir / "consolidated" / generator_name(tag)
    if target.is_file() and sidecar_of(target).is_file():
        return tag, False
    consolidate_local(run_dir, tag)
    return tag, True


def consolidate_local(run_dir: Path, tag: str) -> Path:
    """Consolidate on this machine; imports DeepSpeed, hence only when a file is missing."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # shards are gathered on CPU; login nodes have no GPU
    from hpc_gan.train.consolidate import consolidate

    return consolidate(run_dir, tag)


def probe_script(path: str, tag: str | None) -> str:
    """Remote shell text printing ``tag=<tag>``, then ``complete`` and ``consolidated`` when true."""
    pick = f"t={shlex.quote(tag)}" if tag else NEWEST_COMPLETE_SH
    return (f'cd -- {remote_quote(path)} && test -d checkpoints && {{ {pick}; }} && echo "tag=$t" && '
            '{ test -f "checkpoints/$t/COMPLETE" && echo complete; test -f "consolidated/generator-$t.pt" && '
            'test -f "consolidated/generator-$t.pt.sha256" && echo consolidated; true; }')


def prepare_remote(source: Source, tag: str | None, remote_python: str, runner: Runner) -> tuple[str, bool]:
    """As :func:`prepare_local`, over ssh. ``remote_python`` is a command prefix and is not quoted
    (e.g. ``conda run -n gan python``)."""
    out = checked(runner(ssh_argv(source.host, probe_script(source.path, tag))),
                  f"looking for a run directory at '{source}' (is it one, with checkpoints/?)")
    words = out.split()
    found = next((word[len("tag="):] for word in words if word.startswith("tag=")), "")
    if not found:
        raise CheckpointError(f"'{source}' has no complete checkpoint yet; wait for the first one")
    if "complete" not in words:
        raise CheckpointError(f"checkpoint '{source}/checkpoints/{found}' is not COMPLETE (missing, or its job "
                              "stopped while saving); pick another --tag")
    if "consolidated" in words:
        return found, False
    script = (f"cd -- {remote_quote(source.path)} && {remote_python} -m hpc_gan consolidate . "
              f"--tag {shlex.quote(found)}")
    checked(runner(ssh_argv(source.host, script)), f"consolidating {found} on {source.host}")
    return found, True


# ---------------------------------------------------------------------------------- copying


def partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def read_digest(sidecar: Path, source: str) -> str:
    words = sidecar.read_text().split()
    if not words or not DIGEST.match(words[0]):
        raise CheckpointError(f"checksum file '{source}' is damaged; consolidate again")
    return words[0]


def keep_existing(path: Path, digest: str, overwrite: bool) -> bool:
    """True if ``path`` already holds exactly this content; LaunchError if it holds other content
    and ``overwrite`` is off."""
    if not path.exists():
        return False
    if file_sha256(path) == digest:
        return True
    if not overwrite:
        raise LaunchError(f"'{path}' exists and differs from the file being pulled; pass --overwrite to "
                          "replace it or choose another --dest")
    return False


def install(fetch: Fetch, generator: str, config: str, dest: Path, variant: str, tag: str,
            overwrite: bool) -> tuple[Path, Path, Path, bool]:
    """Copy sidecar, config and generator into ``dest`` through temporary names; checks every
    conflict before the large transfer. Returns (generator, sidecar, config, copied)."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{variant}-{generator_name(tag)}"
    config_target = dest / f"{variant}-config.yaml"
    temps = [partial(sidecar_of(target)), partial(config_target), partial(target)]
    try:
        fetch(generator + ".sha256", temps[0])
        digest = read_digest(temps[0], generator + ".sha256")
        identical = keep_existing(target, digest, overwrite)
        fetch(config, temps[1])
        keep_existing(config_target, file_sha256(temps[1]), overwrite)
        if not identical:
            fetch(generator, temps[2])
            if file_sha256(temps[2]) != digest:
                raise CheckpointError(f"the copy of '{generator}' does not match its SHA-256 (source or transfer "
                                      "damaged); the copy was deleted, pull again")
            os.replace(temps[2], target)
        write_text_atomic(sidecar_of(target), f"{digest}  {target.name}\n")
        os.replace(temps[1], config_target)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
    return target, sidecar_of(target), config_target, not identical


def pull(source: str, dest: str | os.PathLike, tag: str | None = None, *, overwrite: bool = False,
         remote_python: str = "python", via: str = "auto", runner: Runner = run_argv,
         copier: Fetch = shutil.copyfile) -> Pulled:
    """Make sure a run's checkpoint is consolidated and copy it, verified, into ``dest``.

    Args:
        source: run directory, or ``[user@]host:path`` of one on another machine.
        dest: local directory (created if missing).
        tag: checkpoint tag, e.g. ``step-00020000``; default the newest COMPLETE one.
        overwrite: replace files in ``dest`` that differ from the pulled ones.
        remote_python: command that runs the remote hpc_gan's Python (remote sources).
        via: ``rsync``, ``scp`` or ``auto`` (rsync when installed here).
        runner: runs ssh / rsync / scp (see :func:`run_argv`).
        copier: copies a local file (``copier(src, dst)``), for local sources.

    Returns:
        :class:`Pulled` with the paths in ``dest``.

    Raises:
        LaunchError: source missing or not a run directory, ssh / transfer failing, a different
            file in ``dest`` without ``overwrite``.
        CheckpointError: no complete checkpoint, consolidation failing, checksum mismatch.
    """
    src = parse_source(str(source))
    if src.host:
        tag, consolidated = prepare_remote(src, tag, remote_python, runner)
        tool = resolve_tool(via)

        def fetch(path: str, local: Path) -> None:
            checked(runner(transfer_argv(src.host, path, local, tool)), f"copying {src.host}:{path}")

        base = src.path.rstrip("/")
    else:
        tag, consolidated = prepare_local(Path(src.path), tag)
        base = src.path

        def fetch(path: str, local: Path) -> None:
            try:
                copier(path, local)
            except FileNotFoundError:  # e.g. a run directory without its config.yaml
                raise LaunchError(f"'{path}' is missing; is '{src}' a complete run directory?") from None
    generator = f"{base}/consolidated/{generator_name(tag)}"
    paths = install(fetch, generator, f"{base}/config.yaml", Path(dest), src.variant, tag, overwrite)
    return Pulled(*paths[:3], variant=src.variant, tag=tag, consolidated=consolidated, copied=paths[3])


def sample_command(pulled: Pulled) -> str:
    return f"hpc_gan sample {shlex.quote(str(pulled.generator))} --n 100 --out samples/{pulled.variant}"
