"""Print the MoE-PHDS figures of one or more experiment folders as Markdown (for docs/moe.md; nothing typed by hand).

Usage: python scripts/moe_results_md.py OUT_DIR [OUT_DIR ...] [--write docs/moe.md] [--marker NAME] [--figure PNG]

Each OUT_DIR holds a results.sqlite written by ``lopkit moe run`` (several folders, e.g. one per seed run as
parallel processes, are merged: their runs and rows are concatenated). Works on unfinished experiments too: it
prints what the stores hold (e.g. only the pretraining learning curves while fine-tuning is still running).
``--write FILE`` replaces the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in FILE instead of
printing (``--marker NAME``, default ``moe-results``). ``--figure PNG`` also writes the merged stores' accuracy-vs-k
plot (test accuracy over the learned domains, mean over seeds; e.g. docs/images/moe_accuracy_vs_k.png).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import pandas as pd

from lopkit.moe.report import UNINDEXED_TABLES, accuracy_vs_k_figure, load_stores, report_tables

from _blocks import check_target, replace_block


def _markdown(table: pd.DataFrame, index: bool = True) -> str:
    """A DataFrame as a Markdown table (numbers to 4 significant digits)."""
    frame = table.reset_index() if index else table
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    lines = [header, "|" + "|".join("---" for _ in frame.columns) + "|"]
    for row in frame.itertuples(index=False):
        cells = []
        for value in row:
            if isinstance(value, float):
                cells.append("n/a" if value != value else f"{value:.4g}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load(folders: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
    """Runs, metrics and stage timings of every folder (``lopkit.moe.report.load_stores``); exit with one line
    for a folder without a store."""
    try:
        return load_stores(folders)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None


def markdown(folders: list[Path], figure: Path | None = None) -> str:
    """Every table of the report that has data, as Markdown sections (the runs' status first); with ``figure``,
    also the accuracy-vs-k PNG at that path, from the same tables."""
    runs, metrics, timings = load(folders)
    computed = report_tables(runs, metrics, timings)
    if figure is not None:
        figure.parent.mkdir(parents=True, exist_ok=True)
        written = accuracy_vs_k_figure(computed, figure)
        print(f"figure: {written}" if written else "figure: not written (no evaluation stored yet)", file=sys.stderr)
    status = runs[["benchmark", "method", "seed", "status", "step", "total_steps"]] if "total_steps" in runs else \
        runs[["benchmark", "method", "seed", "status", "step"]]
    parts = [f"Stores: {', '.join(str(f) for f in folders)}\n"]
    unfinished = int((runs["status"] != "finished").sum())
    if unfinished:  # partial figures: say when they were read and how much is missing
        read_at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        parts.append(f"Read on {read_at}: {len(runs) - unfinished} of {len(runs)} runs started so far are finished; "
                     "the tables below are partial.\n")
    parts += ["#### Runs\n",
             _markdown(status.sort_values(["seed", "benchmark", "method"]), index=False) + "\n"]
    for name, caption, table in computed.named:
        if table is None or table.empty:
            continue
        parts.append(f"#### {caption} (`{name}`)\n")
        if name == "targets" and unfinished:  # never let a partial PASS read as a verdict
            parts.append(f"Not judged yet: {unfinished} started run(s) are unfinished, and runs not started are "
                         "missing (see the Runs table). The status column says what the rows written so far give.\n")
            table = table.rename(columns={"status": "status (partial)"})
        parts.append(_markdown(table, index=name not in UNINDEXED_TABLES)
                     + "\n")
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    """Print (or write into a marked block of a document) every table of the report that has data."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, metavar="OUT_DIR", help="lopkit moe run output folders")
    parser.add_argument("--write", type=Path, default=None, metavar="FILE",
                        help="replace the marked block in FILE (e.g. docs/moe.md) instead of printing")
    parser.add_argument("--marker", default="moe-results", metavar="NAME",
                        help="block markers <!-- NAME:begin --> ... <!-- NAME:end --> (default: %(default)s)")
    parser.add_argument("--figure", type=Path, default=None, metavar="PNG",
                        help="also write the accuracy-vs-k plot of the merged stores to PNG")
    args = parser.parse_args(argv)
    problem = None if args.write is None else check_target(args.write, args.marker)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    text = markdown(args.folders, args.figure)
    if args.write is None:
        print(text)
        return 0
    flags = f" --marker {args.marker}" if args.marker != "moe-results" else ""
    replace_block(args.write, args.marker, text,
                  f"scripts/moe_results_md.py {' '.join(str(f) for f in args.folders)}{flags}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
