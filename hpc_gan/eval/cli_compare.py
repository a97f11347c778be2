"""``hpc_gan compare REPORT_DIR...``: the command line of :mod:`hpc_gan.eval.compare` (the paper's
Table 1 and Fig. 5, or Table 3 for downstream-test directories)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hpc_gan.eval.compare import load_report, row_names, table, tstr_rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reports", nargs="+", help="report directories (from hpc_gan evaluate, named by folder, with as many parent folders "
                                                   "as it takes to tell them apart), or "
                                                   "downstream-test directories (hpc_gan tstr: merged into Table 3)")
    parser.add_argument("--plot", help="write all PRD curves (or the DSC/bAVD box plots) into this PNG")


def run(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.reports]
    if paths and all((p / "scores.csv").is_file() for p in paths):  # downstream tests: the paper's Table 3
        from hpc_gan.eval.segmentation import box_plots_png, summary_table
        from hpc_gan.eval.tstr import by_source

        rows = tstr_rows(paths)
        print(summary_table(rows), end="")
        if args.plot:
            box_plots_png(by_source(rows), args.plot)
            print(f"box plots: {args.plot}")
        return 0
    reports = dict(zip(row_names(paths), (load_report(p) for p in paths)))
    print(table(reports))
    if args.plot:
        from hpc_gan.eval.prd import plot_prd

        curves = {name: (r["prd"]["generated_reference"]["precision"], r["prd"]["generated_reference"]["recall"])
                  for name, r in reports.items() if "precision" in r.get("prd", {}).get("generated_reference", {})}
        plot_prd(curves, args.plot, title="PRD of each run against real patches (reference preset)")
        print(f"PRD curves: {args.plot}")
    return 0
