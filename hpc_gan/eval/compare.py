"""``hpc_gan compare REPORT_DIR...``: several variants in one table (the paper's Table 1) and
their PRD curves on one plot (the paper's Fig. 5)."""

from __future__ import annotations

import json
from pathlib import Path

from hpc_gan.errors import DataError

COLUMNS = (("FID", ("fid", "generated_vs_real")), ("FID baseline", ("fid", "heldout_vs_real")),
           ("F_8", ("prd", "generated_reference", "F_8")), ("F_1/8", ("prd", "generated_reference", "F_1/8")),
           ("F_8 (paper)", ("prd", "generated_paper", "F_8")), ("F_1/8 (paper)", ("prd", "generated_paper", "F_1/8")),
           ("precision", ("nearest_neighbours", "generated", "precision")),
           ("recall", ("nearest_neighbours", "generated", "recall")),
           ("density", ("nearest_neighbours", "generated", "density")),
           ("coverage", ("nearest_neighbours", "generated", "coverage")),
           ("MS-SSIM", ("diversity_ms_ssim", "mean_pairwise_ms_ssim")),
           ("agreement DSC", ("agreement", "segmenter_dice", "generated")),
           ("DSC ratio", ("agreement", "segmenter_dice", "ratio")),
           ("contrast ratio", ("agreement", "contrast", "ratio")),
           ("epsilon (DP)", ("privacy", "epsilon")))


def load_report(path: Path) -> dict:
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"'{path}' holds no report.json; run hpc_gan evaluate first")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{file} is not valid JSON ({exc})") from None


def _get(report: dict, keys: tuple) -> object:
    for key in keys:
        if not isinstance(report, dict) or key not in report:
            return None
        report = report[key]
    return report


def table(reports: dict[str, dict]) -> str:
    head = "| run | " + " | ".join(name for name, _ in COLUMNS) + " |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, report in reports.items():
        cells = [_get(report, keys) for _, keys in COLUMNS]
        rows.append(f"| {name} | " + " | ".join("–" if c is None else f"{c:.4g}" for c in cells) + " |")
    extractors = {json.dumps(r.get("extractor", {}), sort_keys=True) for r in reports.values()}
    if len(extractors) > 1:
        rows.append("\n**The reports used different feature extractors: their FIDs are not comparable.**")
    return "\n".join(rows)


def tstr_rows(paths: list[Path]) -> list[dict]:
    """Per-subject rows of several downstream-test directories (their scores.csv)."""
    import csv

    rows = []
    for path in paths:
        with (path / "scores.csv").open() as handle:
            for row in csv.DictReader(handle):
                rows.append({k: v if k in ("source", "subject") else float(v) for k, v in row.items() if v != ""})
    return rows


def row_names(paths: list[Path]) -> list[str]:
    """A name per report: its folder, or as many trailing path parts as it takes to tell the
    reports apart (``runs/exp1/*/eval`` gives ``sn/eval``, ``gp/eval``, ...).

    Raises:
        DataError: the same report given twice.
    """
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) < len(resolved):
        twice = next(str(p) for p, r in zip(paths, resolved) if resolved.count(r) > 1)
        raise DataError(f"report '{twice}' is given more than once; give each report directory once")
    for depth in range(1, max(len(r.parts) for r in resolved) + 1):
        names = ["/".join(r.parts[-depth:]) for r in resolved]
        if len(set(names)) == len(names):
            return names
    return [str(r) for r in resolved]
