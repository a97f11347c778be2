"""Output paths checked before work, and outputs replaced only when complete (issue 13)."""

from __future__ import annotations

import errno
import os

import pytest

import hpc_gan.io as hio
from helpers import assert_one_line_error
from hpc_gan.cli import main
from hpc_gan.errors import OutputError

pytestmark = pytest.mark.unit


def _pack_args(src, out, *extra):
    return ["pack", "--images", str(src / "images"), "--labels", str(src / "labels"), "--masks", str(src / "masks"),
            "--out", str(out), "--patch-shape", "16,16,16", "--grid", "2,2,1", "--vessel-patches", "2",
            "--split", "0.5,0.25,0.25", "--no-progress", *extra]


def _snapshot(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _no_leftovers(parent):
    return [p.name for p in parent.iterdir() if ".staging-" in p.name or ".old-" in p.name or p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# the shared helpers


def test_check_output_path_names_each_problem(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match="'.*f' is a file, not a directory"):
        hio.check_output_path(tmp_path / "f", "--out")
    with pytest.raises(OutputError, match="lies under '.*f', which is a file"):
        hio.check_output_path(tmp_path / "f" / "a" / "b", "--out")
    with pytest.raises(OutputError, match="is a directory; give a file path"):
        hio.check_output_path(tmp_path / "d", "--out", kind="file")
    assert hio.check_output_path(tmp_path / "d" / "new" / "deeper", "--out") == tmp_path / "d" / "new" / "deeper"
    monkeypatch.setattr(hio.os, "access", lambda path, mode: False)  # root may write anywhere: fake it
    with pytest.raises(OutputError, match="no permission to write in"):
        hio.check_output_path(tmp_path / "d" / "x", "--out")


def test_staged_directory_keeps_the_old_content_until_complete(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "old.h5").write_text("old")
    (target / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        with hio.staged_directory(target, owned=lambda n: n.endswith(".h5")) as stage:
            (stage / "new.h5").write_text("new")
            raise RuntimeError("writer died")
    assert _snapshot(target) == {"old.h5": b"old", "notes.txt": b"mine"} and not _no_leftovers(tmp_path)
    with hio.staged_directory(target, owned=lambda n: n.endswith(".h5")) as stage:
        (stage / "new.h5").write_text("new")
        assert _snapshot(target) == {"old.h5": b"old", "notes.txt": b"mine"}
    assert _snapshot(target) == {"new.h5": b"new", "notes.txt": b"mine"} and not _no_leftovers(tmp_path)
    with hio.staged_directory(tmp_path / "fresh") as stage:
        (stage / "a").write_text("a")
    assert _snapshot(tmp_path / "fresh") == {"a": b"a"}
    assert oct((tmp_path / "fresh").stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode


def test_staged_directory_rolls_back_a_failed_swap(tmp_path, monkeypatch):
    target = tmp_path / "data"
    target.mkdir()
    for name in ("a.h5", "manifest.json"):
        (target / name).write_text("old " + name)
    real_rename, calls = os.rename, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 4:  # after both old entries moved out and one new entry moved in
            raise OSError(errno.EIO, "I/O error")
        return real_rename(src, dst)

    with pytest.raises(OSError):
        with hio.staged_directory(target, last=("manifest.json",)) as stage:
            for name in ("a.h5", "manifest.json"):
                (stage / name).write_text("new " + name)
            monkeypatch.setattr(hio.os, "rename", flaky)
    assert _snapshot(target) == {"a.h5": b"old a.h5", "manifest.json": b"old manifest.json"}
    assert not _no_leftovers(tmp_path)
    assert str(calls[0]).endswith("manifest.json")  # the manifest leaves first (and comes in last)


def test_write_error_names_a_full_disk():
    assert "no space left on device writing X" in str(hio.write_error(OSError(errno.ENOSPC, "No space"), "X"))
    h5 = OSError("Unable to synchronously create file (file write failed: errno = 28, error message = "
                 "'No space left on device')")
    assert "no space left on device" in str(hio.write_error(h5, "X"))


# ---------------------------------------------------------------------------------------------
# pack


def test_pack_overwrite_on_a_full_disk_keeps_the_previous_dataset(subjects_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(_pack_args(subjects_dir, out)) == 0
    before = _snapshot(out)
    import hpc_gan.data.shards as shards

    real_write, written = shards.write_shard, []

    def fill_disk(path, *args, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr("hpc_gan.data.pack.write_shard", fill_disk)
    assert main(_pack_args(subjects_dir, out, "--overwrite", "--seed", "3")) == 2
    assert_one_line_error(capsys, "no space left on device", str(out), "unchanged")
    assert _snapshot(out) == before
    assert not _no_leftovers(tmp_path)


def test_pack_that_fails_late_keeps_the_previous_dataset(subjects_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(_pack_args(subjects_dir, out)) == 0
    before = _snapshot(out)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("hpc_gan.data.pack.write_shard", crash)
    assert main(_pack_args(subjects_dir, out, "--overwrite")) == 130
    assert _snapshot(out) == before and not _no_leftovers(tmp_path)


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_pack_and_make_phantoms_refuse_unusable_out(subjects_dir, tmp_path, capsys, where):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "sub"
    words = ["is a file, not a directory"] if where == "file" else ["lies under", "which is a file"]
    assert main(_pack_args(subjects_dir, out)) == 2
    assert_one_line_error(capsys, "--out", *words)
    assert main(["make-phantoms", "--out", str(out), "--subjects", "1", "--shape", "24,24,16"]) == 2
    assert_one_line_error(capsys, "--out", *words)
    assert (tmp_path / "f").read_text() == "x"


def test_pack_refuses_an_unwritable_out(subjects_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hio.os, "access", lambda path, mode: False)
    assert main(_pack_args(subjects_dir, tmp_path / "out")) == 2
    assert_one_line_error(capsys, "--out", "no permission to write")


def test_make_phantoms_that_fails_late_keeps_the_previous_phantoms(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ph"
    argv = ["make-phantoms", "--out", str(out), "--subjects", "2", "--shape", "24,24,16"]
    assert main(argv) == 0
    before = _snapshot(out)
    import hpc_gan.data.phantom as phantom

    real_write = phantom._write_subject

    def second_fails(job):
        if job[1] == "sub-001":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(job)

    monkeypatch.setattr(phantom, "_write_subject", second_fails)
    assert main([*argv, "--seed", "5", "--overwrite"]) == 2
    assert_one_line_error(capsys, "no space left on device", str(out))
    assert _snapshot(out) == before and not _no_leftovers(tmp_path)
    assert main(["make-phantoms", "--out", str(tmp_path / "x"), "--seed", "-1"]) == 2
    assert_one_line_error(capsys, "--seed", "0 or more")


# ---------------------------------------------------------------------------------------------
# sample


@pytest.fixture(scope="module")
def gen_file(tmp_path_factory):
    from hpc_gan.data.manifest import write_manifest
    from test_sample import PATCH, consolidated_file

    root = tmp_path_factory.mktemp("gen")
    write_manifest(root / "shards", {"format_version": 2, "patch_shape": list(PATCH), "spacing": [0.5, 0.5, 0.8],
                                     "splits": {}, "sampling": {}, "normalisation": {}, "compression": "lzf"})
    consolidated_file(root / "generator.pt", root / "shards")
    return root / "generator.pt"


def test_sample_overwrite_that_fails_late_keeps_the_previous_samples(gen_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    argv = ["sample", str(gen_file), "--n", "3", "--format", "hdf5", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("hpc_gan.sample.save_mip", full)  # the last picture: all shards already written
    assert main([*argv, "--overwrite", "--seed", "4"]) == 2
    assert_one_line_error(capsys, "no space left on device", str(out), "unchanged")
    assert _snapshot(out) == before and not _no_leftovers(tmp_path)
    monkeypatch.undo()
    assert main([*argv, "--overwrite", "--seed", "4", "--format", "nifti"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "notes.txt" in names and "manifest.json" not in names and not any(n.endswith(".h5") for n in names)


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_sample_refuses_unusable_out(gen_file, tmp_path, capsys, where):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "sub"
    assert main(["sample", str(gen_file), "--n", "1", "--out", str(out)]) == 2
    assert_one_line_error(capsys, "--out", "is a file" if where == "file" else "lies under")


# ---------------------------------------------------------------------------------------------
# evaluate


def _evaluate(packed, out, *extra):
    return ["evaluate", "--samples", str(packed), "--real", str(packed), "--out", str(out),
            "--agreement-steps", "1", "--n", "6", *extra]


def test_evaluate_refuses_to_replace_a_report_without_overwrite(packed, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    out.mkdir()
    (out / "report.json").write_text("earlier")
    (out / "notes.txt").write_text("mine")
    assert main(_evaluate(packed, out)) == 2
    assert_one_line_error(capsys, "already holds a report", "--overwrite")
    import hpc_gan.eval.evaluate as evaluation

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluation, "write_report", full)
    assert main(_evaluate(packed, out, "--overwrite")) == 2
    assert_one_line_error(capsys, "no space left on device", "unchanged")
    assert _snapshot(out) == {"report.json": b"earlier", "notes.txt": b"mine"} and not _no_leftovers(tmp_path)
    monkeypatch.undo()
    assert main(_evaluate(packed, out, "--overwrite")) == 0
    assert (out / "report.json").read_text().startswith("{") and (out / "notes.txt").read_text() == "mine"
    assert (out / "label_stats.png").is_file() and (out / "closest_pairs.png").is_file()


@pytest.mark.parametrize("extra, words", [
    (["--n", "0"], ["--n", "at least 1"]),
    (["--batch", "0"], ["--batch", "at least 1"]),
    (["--seed", "-1"], ["--seed", "0 or more"]),
])
def test_evaluate_refuses_out_of_range_values(packed, tmp_path, capsys, extra, words):
    assert main(_evaluate(packed, tmp_path / "r", *extra)) == 2
    assert_one_line_error(capsys, *words)


def test_evaluate_refuses_a_file_as_out_and_names_a_foreign_weights_file(packed, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(_evaluate(packed, tmp_path / "f")) == 2
    assert_one_line_error(capsys, "--out", "is a file")
    (tmp_path / "w.pth").write_bytes(b"this is not a checkpoint" * 10)
    assert main(_evaluate(packed, tmp_path / "r", "--weights", str(tmp_path / "w.pth"))) == 2
    err = assert_one_line_error(capsys, "w.pth", "not a PyTorch checkpoint")
    assert "weights_only" not in err


# ---------------------------------------------------------------------------------------------
# consolidate, pull, submit (output_root and --overwrite of runs)


def test_consolidate_and_pull_refuse_unusable_outputs(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("x")
    assert main(["consolidate", str(tmp_path / "run"), "--out", str(tmp_path / "d")]) == 2
    assert_one_line_error(capsys, "--out", "is a directory")
    assert main(["consolidate", str(tmp_path / "run"), "--out", str(tmp_path / "f" / "g.pt")]) == 2
    assert_one_line_error(capsys, "--out", "lies under")
    assert main(["pull", str(tmp_path / "run"), "--dest", str(tmp_path / "f")]) == 2
    assert_one_line_error(capsys, "--dest", "is a file")


def _submit_base(packed, root):
    return ["submit", "--variant", "sn", "--set", f"data.root={packed}", "--set", f"output_root={root}",
            "--cluster", "local", "--profile", "smoke"]


def test_submit_refuses_an_output_root_that_is_a_file(packed, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(_submit_base(packed, tmp_path / "f")) == 2
    assert_one_line_error(capsys, "output_root", "is a file")
    assert main(_submit_base(packed, tmp_path / "f" / "runs")) == 2
    assert_one_line_error(capsys, "output_root", "lies under")


def test_submit_overwrite_keeps_the_old_run_until_the_job_is_accepted(packed, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "runs" / "run" / "sn"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "keep.txt").write_text("old run")
    import hpc_gan.launch.submit as submitting

    def refused(*args, **kwargs):
        raise submitting.LaunchError("sbatch: error: invalid account")

    monkeypatch.setattr(submitting, "submit_array", refused)
    assert main([*_submit_base(packed, tmp_path / "runs"), "--overwrite"]) == 2
    assert_one_line_error(capsys, "invalid account")
    assert _snapshot(run_dir) == {"checkpoints/keep.txt": b"old run"}
    assert not _no_leftovers(run_dir.parent)
    monkeypatch.setattr(submitting, "submit_array", lambda *a, **k: [])
    assert main([*_submit_base(packed, tmp_path / "runs"), "--overwrite"]) == 0
    assert not (run_dir / "checkpoints").exists() and (run_dir / "config.yaml").is_file()
    assert not _no_leftovers(run_dir.parent)
