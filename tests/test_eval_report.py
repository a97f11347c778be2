"""hpc_gan evaluate and compare on tiny packed sets: known answers, the report, bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import assert_one_line_error, torchrun
from hpc_gan.cli import main
from hpc_gan.eval.evaluate import evaluate

AGREEMENT_STEPS = 40  # the reference segmenter's training: enough for the tiny subjects' bright vessels


@pytest.fixture(scope="module")
def same_as_real(packed, tmp_path_factory):
    """A 'sample set' holding exactly the real training patches: every metric's best case."""
    samples = tmp_path_factory.mktemp("samples") / "s"
    shutil.copytree(packed, samples)
    return samples


@pytest.fixture(scope="module")
def report(same_as_real, packed, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return evaluate(str(same_as_real), str(packed), str(out), seed=0, agreement_steps=AGREEMENT_STEPS), out


@pytest.mark.unit
def test_identical_sets_score_as_identical(report):
    result, _ = report
    assert result["n"] == {"generated": 40, "real": 40, "heldout": 10}
    assert abs(result["fid"]["generated_vs_real"]) < 1e-3          # same patches, other order
    assert result["fid"]["heldout_vs_real"] > result["fid"]["generated_vs_real"]
    nn = result["nearest_neighbours"]["generated"]
    assert nn["precision"] == 1.0 and nn["recall"] == 1.0 and nn["coverage"] == 1.0
    prd = result["prd"]["generated_reference"]
    assert prd["F_8"] > 0.95 and prd["F_1/8"] > 0.95
    assert "error" in result["prd"]["heldout_reference"]           # 10 held-out patches < 20 clusters
    assert result["label_realism"]["vessel_fraction"]["wasserstein"] == pytest.approx(0.0, abs=1e-12)
    # the "generated" set is the training set: the audit must flag every patch as a copy
    assert result["memorisation"]["voxel"]["fraction_below_heldout_p1"] == 1.0
    assert result["memorisation"]["feature"]["fraction_below_heldout_p1"] == 1.0
    assert result["nearest_neighbours"]["k"] == 5


@pytest.mark.unit
def test_agreement_of_real_pairs_matches_the_baseline(report):
    result, out = report
    agreement = result["agreement"]
    assert agreement["baseline"] == "held-out split test" and agreement["n"] == {"generated": 40, "real": 10}
    assert agreement["segmenter"]["steps"] == AGREEMENT_STEPS and agreement["segmenter"]["split"] == "train"
    assert len(agreement["segmenter"]["key"]) == 64 and agreement["segmenter"]["cached"] is False
    # the "generated" pairs are real training pairs: they agree as well as held-out real pairs do
    assert agreement["contrast"]["generated"] > 0.5
    assert agreement["contrast"]["ratio"] == pytest.approx(1.0, abs=0.2)
    # per-patch DSC is 0 on a label-free patch where the segmenter marks a few noise voxels: with 10
    # held-out patches, how many of those a set holds moves the ratio (the tubes test pins it down)
    assert agreement["segmenter_dice"]["real"] > 0.5
    assert 0.5 < agreement["segmenter_dice"]["ratio"] < 1.5
    text = (out / "report.md").read_text()
    assert "## Label–image agreement" in text and "| segmenter DSC |" in text and "| precision (k=5) |" in text
    saved = json.loads((out / "report.json").read_text())
    assert saved["agreement"]["segmenter"]["key"] == agreement["segmenter"]["key"]


@pytest.mark.unit
def test_report_files_name_the_extractor(report):
    result, out = report
    assert {"report.json", "report.md", "prd.png", "label_stats.png", "closest_pairs.png"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "report.json").read_text())
    assert saved["extractor"]["weights"] == "random" and saved["extractor"]["comparable"] is False
    assert "not comparable with published FIDs" in (out / "report.md").read_text()
    assert saved["seed"] == 0 and len(saved["extractor"]["sha256"]) == 64
    assert saved["privacy"] is None                                   # real patches: no DP generator behind them
    assert "no formal guarantee" in (out / "report.md").read_text()


@pytest.mark.unit
def test_compare_puts_runs_in_one_table(report, tmp_path, capsys):
    _, out = report
    other = tmp_path / "gp"
    shutil.copytree(out, other)
    assert main(["compare", str(out), str(other), "--plot", str(tmp_path / "prd_all.png")]) == 0
    text = capsys.readouterr().out
    assert f"| {out.name} |" in text and "| gp |" in text and "FID baseline" in text and "epsilon (DP)" in text
    assert "agreement DSC" in text and "DSC ratio" in text and "contrast ratio" in text
    assert (tmp_path / "prd_all.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.unit
def test_compare_tells_reports_in_same_named_folders_apart(report, tmp_path, capsys):
    """submit --job evaluate writes every variant's report to <run>/eval: one row each, not one merged row."""
    _, out = report
    for variant in ("sn", "gp"):
        shutil.copytree(out, tmp_path / "exp" / variant / "eval")
    assert main(["compare", str(tmp_path / "exp/sn/eval"), str(tmp_path / "exp/gp/eval")]) == 0
    text = capsys.readouterr().out
    assert "| sn/eval |" in text and "| gp/eval |" in text
    assert _fails(capsys, ["compare", str(out), str(out)], "more than once")


def _fails(capsys, argv, *words):
    assert main(argv) == 2
    return assert_one_line_error(capsys, *words)


@pytest.mark.unit
def test_bad_inputs(packed, smoke_shards, tmp_path, capsys):
    base = ["evaluate", "--real", str(packed), "--out", str(tmp_path / "r")]
    _fails(capsys, [*base, "--samples", str(smoke_shards)], "(32, 32, 16) but real ones (16, 16, 16)")
    _fails(capsys, [*base, "--samples", str(tmp_path / "none")], "sample set", "does not exist")
    empty = tmp_path / "empty"
    shutil.copytree(packed, empty)
    manifest = json.loads((empty / "manifest.json").read_text())
    manifest["splits"]["train"] = {"subjects": [], "n_patches": 0, "shards": []}
    (empty / "manifest.json").write_text(json.dumps(manifest))
    _fails(capsys, [*base, "--samples", str(empty)], "holds no patches")
    _fails(capsys, [*base, "--samples", str(packed), "--weights", str(tmp_path / "missing.pth")], "missing.pth")
    assert main(["compare", str(tmp_path / "nothing")]) == 2


@pytest.mark.multiprocess
def test_two_ranks_give_the_single_process_report(report, same_as_real, packed, tmp_path):
    result, _ = report
    script = tmp_path / "eval2.py"
    script.write_text("import sys\nfrom hpc_gan.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    done = torchrun(str(script), "evaluate", "--samples", str(same_as_real), "--real", str(packed),
                    "--out", str(tmp_path / "r2"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert two["world_size"] == 2
    assert two["fid"]["heldout_vs_real"] == pytest.approx(result["fid"]["heldout_vs_real"], rel=1e-6)
    assert two["nearest_neighbours"] == result["nearest_neighbours"]


@pytest.mark.unit
def test_real_features_are_cached(same_as_real, packed, tmp_path, monkeypatch, report):
    from hpc_gan.eval import evaluate as evaluation

    first = evaluate(str(same_as_real), str(packed), str(tmp_path / "a"), cache=str(tmp_path / "cache"),
                     agreement_steps=AGREEMENT_STEPS)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2          # real train and held-out sets
    calls = []
    real_embed = evaluation.embed
    monkeypatch.setattr(evaluation, "embed", lambda *a, **k: calls.append(1) or real_embed(*a, **k))
    second = evaluate(str(same_as_real), str(packed), str(tmp_path / "b"), cache=str(tmp_path / "cache"),
                      agreement_steps=AGREEMENT_STEPS)
    assert len(calls) == 1                                            # only the generated set is embedded
    assert second["fid"] == first["fid"] == report[0]["fid"]
    assert second["agreement"]["segmenter"]["cached"] is True         # the reference segmenter too
    assert second["agreement"]["segmenter_dice"] == first["agreement"]["segmenter_dice"]
