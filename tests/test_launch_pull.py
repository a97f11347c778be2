"""launch/pull.py: consolidated generator -> DEST, verified; remote argv built for host:path (fake runner)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from hpc_gan.cli import main
from hpc_gan.errors import CheckpointError, LaunchError
from hpc_gan.launch import pull

pytestmark = pytest.mark.unit
TAG = "step-00000004"


def write_consolidated(run_dir: Path, tag: str = TAG, payload: bytes = b"generator weights") -> Path:
    """What consolidate() leaves: the file and a sidecar holding its SHA-256."""
    out = run_dir / "consolidated" / f"generator-{tag}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(payload)
    out.with_name(out.name + ".sha256").write_text(f"{hashlib.sha256(payload).hexdigest()}  {out.name}\n")
    return out


def make_run(root: Path, variant: str = "c_sn_mp", complete=(2, 4), incomplete=(6,), consolidated=True) -> Path:
    run_dir = root / "exp1" / variant
    for step in (*complete, *incomplete):
        where = run_dir / "checkpoints" / f"step-{step:08d}"
        where.mkdir(parents=True)
        if step in complete:
            (where / "COMPLETE").write_text("")
    (run_dir / "config.yaml").write_text(f"variant: {variant}\ntrain:\n  max_steps: 4\n")
    if consolidated:
        write_consolidated(run_dir)
    return run_dir


def test_local_pull_already_consolidated(tmp_path, monkeypatch):
    run_dir = make_run(tmp_path)
    monkeypatch.setattr(pull, "consolidate_local", lambda *a: pytest.fail("must not consolidate again"))
    got = pull.pull(str(run_dir), tmp_path / "models")
    assert got.generator == tmp_path / "models" / f"c_sn_mp-generator-{TAG}.pt"
    assert got.generator.read_bytes() == b"generator weights" and (got.tag, got.copied) == (TAG, True)
    digest = hashlib.sha256(b"generator weights").hexdigest()
    assert got.sidecar.read_text() == f"{digest}  c_sn_mp-generator-{TAG}.pt\n"  # sha256sum -c works on it
    assert got.config == tmp_path / "models" / "c_sn_mp-config.yaml"
    assert got.config.read_text() == (run_dir / "config.yaml").read_text()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == \
        sorted([got.generator.name, got.sidecar.name, got.config.name])  # no temporary left
    assert pull.sample_command(got) == f"hpc_gan sample {got.generator} --n 100 --out samples/c_sn_mp"


def test_local_pull_consolidates_when_missing(tmp_path, monkeypatch):
    run_dir = make_run(tmp_path, consolidated=False)
    calls = []

    def fake_consolidate(where, tag):
        calls.append((Path(where), tag))
        return write_consolidated(Path(where), tag, b"fresh")

    monkeypatch.setattr(pull, "consolidate_local", fake_consolidate)
    got = pull.pull(str(run_dir), tmp_path / "models")
    assert calls == [(run_dir, TAG)] and got.consolidated and got.generator.read_bytes() == b"fresh"


def test_explicit_tag_must_be_complete(tmp_path):
    run_dir = make_run(tmp_path)
    with pytest.raises(CheckpointError, match="step-00000006' is not COMPLETE.*complete ones: step-00000002, "):
        pull.pull(str(run_dir), tmp_path / "models", tag="step-00000006")


def test_no_complete_checkpoint(tmp_path):
    run_dir = make_run(tmp_path, complete=(), consolidated=False)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        pull.pull(str(run_dir), tmp_path / "models")


def test_source_missing_or_not_a_run(tmp_path):
    with pytest.raises(LaunchError, match="does not exist"):
        pull.pull(str(tmp_path / "nope"), tmp_path / "models")
    with pytest.raises(LaunchError, match="not a run directory"):
        pull.pull(str(tmp_path), tmp_path / "models")


def test_checksum_mismatch_deletes_the_copy(tmp_path):
    run_dir = make_run(tmp_path)

    def corrupting(src, dst):
        shutil.copyfile(src, dst)
        if str(src).endswith(".pt"):
            with open(dst, "r+b") as handle:
                handle.write(b"G")

    with pytest.raises(CheckpointError, match="does not match its SHA-256"):
        pull.pull(str(run_dir), tmp_path / "models", copier=corrupting)
    assert list((tmp_path / "models").iterdir()) == []


def test_refuses_to_overwrite_a_different_file(tmp_path):
    run_dir = make_run(tmp_path)
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / f"c_sn_mp-generator-{TAG}.pt").write_bytes(b"another run's generator")
    with pytest.raises(LaunchError, match="exists and differs.*--overwrite"):
        pull.pull(str(run_dir), dest)
    assert (dest / f"c_sn_mp-generator-{TAG}.pt").read_bytes() == b"another run's generator"
    assert sorted(p.name for p in dest.iterdir()) == [f"c_sn_mp-generator-{TAG}.pt"]
    got = pull.pull(str(run_dir), dest, overwrite=True)
    assert got.generator.read_bytes() == b"generator weights"


def test_config_conflict_is_found_before_the_large_copy(tmp_path):
    run_dir = make_run(tmp_path)
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / "c_sn_mp-config.yaml").write_text("variant: other\n")
    copied = []

    def recording(src, dst):
        copied.append(Path(src).name)
        shutil.copyfile(src, dst)

    with pytest.raises(LaunchError, match="c_sn_mp-config.yaml' exists and differs"):
        pull.pull(str(run_dir), dest, copier=recording)
    assert f"generator-{TAG}.pt" not in copied


def test_identical_file_is_kept_without_copying(tmp_path):
    run_dir = make_run(tmp_path)
    first = pull.pull(str(run_dir), tmp_path / "models")
    again = pull.pull(str(run_dir), tmp_path / "models",
                      copier=lambda s, d: pytest.fail("copied") if s.endswith(".pt") else shutil.copyfile(s, d))
    assert not again.copied and again.generator == first.generator


# ------------------------------------------------------------------------------------ remote


class FakeRemote:
    """Plays ssh / rsync / scp against a local directory standing in for the cluster."""

    def __init__(self, probe: str, consolidate_rc: int = 0, payload: bytes = b"remote weights") -> None:
        self.probe, self.consolidate_rc, self.payload, self.calls = probe, consolidate_rc, payload, []

    def __call__(self, argv):
        self.calls.append(argv)
        if argv[0] == "ssh" and "-m hpc_gan consolidate" in argv[-1]:
            if self.consolidate_rc:
                stderr = ("Traceback (most recent call last):\n  File 'x'\n"
                          "ModuleNotFoundError: No module named 'hpc_gan'\n")
                return subprocess.CompletedProcess(argv, self.consolidate_rc, "", stderr)
            return subprocess.CompletedProcess(argv, 0, "consolidated\n", "")
        if argv[0] == "ssh":
            return subprocess.CompletedProcess(argv, 0, self.probe, "")
        remote_path, local = argv[-2].split(":", 1)[1], Path(argv[-1])
        if remote_path.endswith(".sha256"):
            local.write_text(f"{hashlib.sha256(self.payload).hexdigest()}  x.pt\n")
        elif remote_path.endswith(".pt"):
            local.write_bytes(self.payload)
        else:
            local.write_text("variant: sn\n")
        return subprocess.CompletedProcess(argv, 0, "", "")


def test_remote_pull_consolidates_then_transfers(tmp_path):
    fake = FakeRemote(probe=f"tag={TAG}\ncomplete\n")
    got = pull.pull("me@login:/scratch/runs/exp1/sn/", tmp_path / "models", runner=fake,
                    remote_python="/scratch/venv/bin/python", via="rsync")
    assert (got.variant, got.tag, got.consolidated) == ("sn", TAG, True)
    assert got.generator.read_bytes() == b"remote weights"
    probe, consolidate, *transfers = fake.calls
    assert probe[:3] == ["ssh", "--", "me@login"]
    assert probe[3].startswith("cd -- /scratch/runs/exp1/sn/ && test -d checkpoints")
    assert consolidate == ["ssh", "--", "me@login", "cd -- /scratch/runs/exp1/sn/ && /scratch/venv/bin/python -m "
                           f"hpc_gan consolidate . --tag {TAG}"]
    base = "me@login:/scratch/runs/exp1/sn/consolidated/generator-step-00000004.pt"
    models = tmp_path / "models"
    assert transfers == [
        ["rsync", "--times", "--protect-args", "--", base + ".sha256",
         str(models / f".sn-generator-{TAG}.pt.sha256.partial")],
        ["rsync", "--times", "--protect-args", "--", "me@login:/scratch/runs/exp1/sn/config.yaml",
         str(models / ".sn-config.yaml.partial")],
        ["rsync", "--times", "--protect-args", "--", base, str(models / f".sn-generator-{TAG}.pt.partial")]]


def test_remote_pull_already_consolidated_uses_scp(tmp_path):
    fake = FakeRemote(probe=f"tag={TAG}\ncomplete\nconsolidated\n")
    got = pull.pull("login:runs/exp1/sn", tmp_path / "models", runner=fake, via="scp")
    assert not got.consolidated and [call[0] for call in fake.calls] == ["ssh", "scp", "scp", "scp"]
    assert fake.calls[1][:4] == ["scp", "-p", "-q", "--"]


def test_remote_transfer_checksum_mismatch(tmp_path):
    class Corrupt(FakeRemote):
        def __call__(self, argv):
            result = super().__call__(argv)
            if argv[0] == "rsync" and argv[-2].endswith(".pt"):
                Path(argv[-1]).write_bytes(b"truncated")
            return result

    with pytest.raises(CheckpointError, match="does not match its SHA-256"):
        pull.pull("login:/runs/sn", tmp_path / "models", runner=Corrupt(f"tag={TAG}\ncomplete\nconsolidated\n"),
                  via="rsync")
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.parametrize("probe, error, match", [
    ("tag=\n", CheckpointError, "no complete checkpoint"),
    ("tag=step-00000006\n", CheckpointError, "not COMPLETE"),
])
def test_remote_checkpoint_errors(tmp_path, probe, error, match):
    with pytest.raises(error, match=match):
        pull.pull("login:/runs/sn", tmp_path / "models", runner=FakeRemote(probe))


def test_remote_failures_are_one_line(tmp_path):
    def unreachable(argv):
        return subprocess.CompletedProcess(argv, 255, "", "ssh: Could not resolve hostname nohost: Name or "
                                                             "service not known\n")

    with pytest.raises(LaunchError, match=r"exit 255\): ssh: Could not resolve hostname nohost"):
        pull.pull("nohost:/runs/sn", tmp_path / "models", runner=unreachable)
    fake = FakeRemote(probe=f"tag={TAG}\ncomplete\n", consolidate_rc=1)
    with pytest.raises(LaunchError, match=f"consolidating {TAG} on login failed.*ModuleNotFoundError") as info:
        pull.pull("login:/runs/sn", tmp_path / "models", runner=fake)
    assert "\n" not in str(info.value)


def test_probe_script_and_quoting():
    script = pull.probe_script("~/runs/my exp/sn", None)
    assert script.startswith("cd -- ~/'runs/my exp/sn' && test -d checkpoints && { t=$(cat checkpoints/latest")
    assert "t='step-1; rm -rf /'" in pull.probe_script("/r", "step-1; rm -rf /")


@pytest.mark.parametrize("text, host, path", [
    ("login:/scratch/runs/sn", "login", "/scratch/runs/sn"),
    ("me@login.cluster.org:runs/sn", "me@login.cluster.org", "runs/sn"),
    ("runs/exp1/sn", None, "runs/exp1/sn"),
    ("/abs/path", None, "/abs/path"),
])
def test_parse_source(text, host, path):
    assert pull.parse_source(text) == pull.Source(host, path)


def test_existing_local_path_with_a_colon_stays_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a:b").mkdir()
    assert pull.parse_source("a:b") == pull.Source(None, "a:b")


def test_transfer_argv():
    assert pull.transfer_argv("h", "/r/x.pt", Path("/d/.x.partial"), "rsync") == \
        ["rsync", "--times", "--protect-args", "--", "h:/r/x.pt", "/d/.x.partial"]
    assert pull.transfer_argv("h", "/r/x.pt", Path("/d/.x.partial"), "scp") == \
        ["scp", "-p", "-q", "--", "h:/r/x.pt", "/d/.x.partial"]
    with pytest.raises(LaunchError, match="unknown transfer tool"):
        pull.transfer_argv("h", "/r", Path("/d"), "ftp")


def test_cli_prints_the_sample_command_and_one_line_errors(tmp_path, capsys):
    run_dir = make_run(tmp_path)
    assert main(["pull", str(run_dir), "--dest", str(tmp_path / "models")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == (f"sample: hpc_gan sample {tmp_path / 'models' / f'c_sn_mp-generator-{TAG}.pt'} --n 100 "
                       "--out samples/c_sn_mp")
    assert "sha256 verified" in out[0]
    assert main(["pull", str(tmp_path / "nope"), "--dest", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("latest, tag, expected", [
    ("step-00000004", None, f"tag={TAG} complete consolidated"),
    ("step-00000006", None, f"tag={TAG} complete consolidated"),  # latest not COMPLETE: the newest that is
    (None, None, f"tag={TAG} complete consolidated"),
    (None, "step-00000002", "tag=step-00000002 complete"),
    (None, "step-00000006", "tag=step-00000006"),
])
def test_probe_script_in_a_real_shell(tmp_path, latest, tag, expected):
    """The remote probe mirrors checkpoint.newest_complete(); run it with /bin/sh as ssh would."""
    run_dir = make_run(tmp_path)
    if latest:
        (run_dir / "checkpoints" / "latest").write_text(latest + "\n")
    done = subprocess.run(["sh", "-c", pull.probe_script(str(run_dir), tag)], capture_output=True, text=True)
    assert done.returncode == 0 and " ".join(done.stdout.split()) == expected
    missing = subprocess.run(["sh", "-c", pull.probe_script(str(tmp_path / "nope"), None)], capture_output=True)
    assert missing.returncode != 0


# ---------------------------------------------------------------------------- argument injection


@pytest.mark.parametrize("source", ["-oProxyCommand=id:/runs/sn", "-Fcfg:/runs/sn"])
def test_host_beginning_with_a_dash_is_refused(tmp_path, source):
    def never(argv):
        pytest.fail(f"ran {argv}")

    with pytest.raises(LaunchError, match="begins with '-', which ssh would read as an option"):
        pull.pull(source, tmp_path / "models", runner=never)
    with pytest.raises(LaunchError, match="begins with '-'"):
        pull.transfer_argv("-oProxyCommand=x", "/r", Path("/d"), "rsync")


def test_operands_cannot_become_options():
    """`--` ends each tool's options; a relative remote name beginning with '-' gets './'."""
    assert pull.ssh_argv("login", "true") == ["ssh", "--", "login", "true"]
    assert pull.transfer_argv("h", "-e x", Path("-local"), "rsync")[-3:] == ["--", "h:./-e x", "-local"]
    assert pull.transfer_argv("h", "~/runs/x.pt", Path("/d"), "rsync")[-2] == "h:runs/x.pt"  # home-relative
    assert pull.probe_script("-x", None).startswith("cd -- -x && ")


@pytest.mark.parametrize("path", ["/runs/a;touch X;/x.pt", "/runs/my exp/x.pt", "/runs/$(id)/x.pt", "/r/`id`",
                                  "/r/a'b"])
def test_scp_refuses_paths_the_remote_shell_would_read(path):
    with pytest.raises(LaunchError, match="use --via rsync"):
        pull.transfer_argv("h", path, Path("/d"), "scp")
    assert pull.transfer_argv("h", path, Path("/d"), "rsync")[-2] == f"h:{path}"  # rsync protects it


def test_rsync_old_args_cannot_run_a_command_on_the_remote_side(tmp_path, monkeypatch):
    """The real rsync, with its old argument handling forced (RSYNC_OLD_ARGS=1) and a stand-in
    for ssh that hands the remote command to a shell as sshd does: the path is copied, nothing runs."""
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed")
    remote = tmp_path / "remote" / "a;touch INJECTED;b"
    remote.mkdir(parents=True)
    (remote / "x.pt").write_bytes(b"weights")
    fake_ssh = tmp_path / "fake_ssh"
    fake_ssh.write_text('#!/bin/sh\nshift\ncd "$FAKE_HOME" && exec sh -c "$*"\n')  # drop the host, as sshd does
    fake_ssh.chmod(0o755)
    monkeypatch.setenv("RSYNC_RSH", str(fake_ssh))
    monkeypatch.setenv("RSYNC_OLD_ARGS", "1")
    monkeypatch.setenv("FAKE_HOME", str(tmp_path / "remote"))
    monkeypatch.chdir(tmp_path / "remote")
    done = pull.run_argv(pull.transfer_argv("fakehost", "~/a;touch INJECTED;b/x.pt", tmp_path / "copy", "rsync"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "copy").read_bytes() == b"weights"
    assert not list(tmp_path.rglob("INJECTED"))
