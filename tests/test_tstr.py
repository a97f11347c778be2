"""hpc_gan tstr end to end on tiny volumes: train per source, test on real subjects' volumes."""

from __future__ import annotations

import csv
import json

import pytest

from helpers import write_subjects
from hpc_gan.cli import main

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from hpc_gan.data import pack as packing
    from hpc_gan.data.patches import SamplingPlan

    root = tmp_path_factory.mktemp("tstr")
    src = write_subjects(root / "nifti", n=4)
    subjects = packing.match_subjects(src / "images", src / "labels", src / "masks")
    splits = {"train": ["sub-000", "sub-001"], "val": ["sub-002"], "test": ["sub-003"]}
    packing.pack(subjects, splits, root / "shards", SamplingPlan((16, 16, 16), (2, 2, 1), 4, 0), progress=False)
    return root


def _args(real, out, *sources):
    argv = ["tstr", "--real", str(real / "shards"), "--images", str(real / "nifti/images"),
            "--labels", str(real / "nifti/labels"), "--masks", str(real / "nifti/masks"), "--out", str(out),
            "--steps", "4", "--val-every", "2", "--batch", "2", "--channels", "4", "8", "16", "32"]
    for source in sources:
        argv += ["--source", source]
    return argv


def test_two_sources_scored_on_the_test_subject(real, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(real, out, "real", f"synth+real={real / 'shards'}")) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [(r["source"], r["subject"]) for r in rows] == [("real", "sub-003"), ("synth+real", "sub-003")]
    for row in rows:
        assert 0.0 <= float(row["dsc"]) <= 1.0 and 0.0 <= float(row["intracranial_dsc"]) <= 1.0
    assert "real" in (out / "table.md").read_text()
    for name in ("boxplots.png", "error_map_real.png", "error_map_synth+real.png", "unet_real.pt"):
        assert (out / name).is_file(), name
    assert json.loads((out / "tstr.json").read_text())["sources"][1]["with_real"] is True
    assert "real" in capsys.readouterr().out


def test_bad_sources(real, tmp_path, capsys):
    assert main(_args(real, tmp_path / "o", "nonsense")) == 2
    assert "use real, NAME=SAMPLE_DIR" in capsys.readouterr().err
    assert main(_args(real, tmp_path / "o", f"gan={tmp_path / 'none'}")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_compare_merges_downstream_tests_into_one_table(real, tmp_path, capsys):
    out = tmp_path / "one"
    assert main(_args(real, out, "real")) == 0
    other = tmp_path / "two"
    other.mkdir()
    (other / "scores.csv").write_text((out / "scores.csv").read_text().replace("real,", "gp,", 1))
    capsys.readouterr()
    assert main(["compare", str(out), str(other), "--plot", str(tmp_path / "box.png")]) == 0
    table = capsys.readouterr().out
    assert "| real | 1 |" in table and "| gp | 1 |" in table
    assert (tmp_path / "box.png").is_file()


def test_the_node_local_cache_serves_tstr_with_the_same_scores(real, tmp_path):
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    assert main(_args(real, plain, "real")) == 0
    assert main(_args(real, cached, "real") + ["--data-cache", "local_disk", "--data-cache-dir", str(tmp_path / "node"),
                                               "--data-cache-dtype", "float32"]) == 0
    assert (plain / "scores.csv").read_text() == (cached / "scores.csv").read_text()
    stores = sorted(p.name.split("-")[-2] for p in (tmp_path / "node").glob("hpc_gan-cache-*[0-9]"))
    assert stores == ["train", "val"]                  # both splits tstr reads came from the cache
