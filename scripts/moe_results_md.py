"""Print the MoE-PHDS figures of one or more experiment folders as Markdown (for docs/moe.md; nothing typed by hand).

Usage: python scripts/moe_results_md.py OUT_DIR [OUT_DIR ...]

Each OUT_DIR holds a results.sqlite written by ``lopkit moe run`` (several folders, e.g. one per seed run as
parallel processes, are merged: their runs and rows are concatenated). Works on unfinished experiments too: it
prints what the stores hold (e.g. only the pretraining learning curves while fine-tuning is still running).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from lopkit.moe.common import TIMINGS_FILE
from lopkit.moe.report import report_tables
from lopkit.runner.store import ResultStore, store_path


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
    """Runs, metrics and stage timings of every folder, concatenated (timings keyed ``folder/stage``)."""
    runs, metrics, timings = [], [], {}
    for folder in folders:
        if not store_path(folder).exists():
            raise SystemExit(f"error: no results store in {folder}; run 'lopkit moe run --out {folder}' first")
        with ResultStore(folder) as store:
            runs.append(store.runs())
            metrics.append(store.metrics())
        path = folder / TIMINGS_FILE
        if path.exists():
            timings.update({f"{folder.name}/{k}": float(v) for k, v in json.loads(path.read_text()).items()})
    return pd.concat(runs, ignore_index=True), pd.concat(metrics, ignore_index=True), timings


def main(argv: list[str]) -> int:
    """Print every table of the report that has data, as Markdown sections."""
    if not argv:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    folders = [Path(a) for a in argv]
    runs, metrics, timings = load(folders)
    status = runs[["benchmark", "method", "seed", "status", "step", "total_steps"]] if "total_steps" in runs else \
        runs[["benchmark", "method", "seed", "status", "step"]]
    print(f"Stores: {', '.join(str(f) for f in folders)}\n")
    print("#### Runs\n")
    print(_markdown(status.sort_values(["seed", "benchmark", "method"]), index=False) + "\n")
    computed = report_tables(runs, metrics, timings)
    for name, caption, table in computed.named:
        if table is None or table.empty:
            continue
        print(f"#### {caption} (`{name}`)\n")
        print(_markdown(table, index=name not in ("targets", "agreement", "stage_seconds", "learned_domains")) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
