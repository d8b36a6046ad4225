"""Print a markdown table of ``lopkit diagnose``'s verdict on every stored benchmark run under ``--runs``.

One row per configuration (seeds pooled) of every ``results.sqlite`` below the folder, read-only: the layers where
each trap was found, and the top-ranked cure that can join a running training. A configuration whose runs are not
finished says so (step reached of total): its verdict is about the rows so far. The table in docs/diagnose.md is
this script's output.

Usage: ``PYTHONPATH=src python scripts/diagnose_table.py --runs /work/runs [--set key=value ...] [--write docs/diagnose.md]``
(``--write FILE`` replaces the block between ``<!-- diagnose-table:begin -->`` and ``<!-- diagnose-table:end -->``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _blocks import check_target, replace_block

COLUMNS = ("dead_units", "saturated_units", "cloned_units", "rank_collapse", "weight_growth", "sharp_curvature",
           "low_plasticity")


def _layers(diagnosis, trap: str) -> str:
    """The layers where ``trap`` was found, comma-separated, or an en dash."""
    layers = diagnosis.layers_with(trap)
    return ", ".join(layers) if layers else "–"


def _unfinished(store_file: Path) -> dict[str, tuple[int, int]]:
    """Run id -> (step, total steps) of the store's runs that are not finished (through the read-only store)."""
    from lopkit.runner.store import ResultStore

    with ResultStore(store_file, read_only=True) as store:
        runs = store.runs()
    runs = runs[runs["status"] != "finished"]
    return {str(r.run_id): (int(r.step or 0), int(r.total_steps or 0)) for r in runs.itertuples()}


def table(runs: Path, overrides: list[str]) -> list[str]:
    """The markdown lines of the table."""
    from lopkit.configs import build_config, parse_overrides
    from lopkit.diagnostics.diagnose import TRAPS, DiagnoseConfig
    from lopkit.runner.diagnose_cli import continuable, diagnose_store, find_stores

    config = build_config(DiagnoseConfig, parse_overrides(overrides))
    header = ["store", "configuration", "seeds", *(TRAPS[c][0] for c in COLUMNS), "top cure to try"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for store_file in find_stores(runs):
        store = store_file.parent.relative_to(runs)
        try:
            results = diagnose_store(store_file, config)
        except Exception as err:  # noqa: BLE001  (one damaged store must not hide the others)
            lines.append(f"| {store} | not diagnosed: {err} |" + " |" * (len(header) - 2))
            continue
        progress = _unfinished(store_file)
        for diagnosis, ids in results:
            label = diagnosis.source.split(": ", 1)[1].rsplit(" (", 1)[0]
            steps = [progress[i] for i in ids if i in progress]
            if steps:  # a verdict on a run still going (or failed) is about its rows so far: say so
                label += " (unfinished: " + ", ".join(f"step {step:,} of {total:,}" for step, total in steps) + ")"
            top = diagnosis.top_cure(continuable)
            cure = f"`--method {top[1].method}` ({top[0].label}, {top[0].layer})" if top else "none needed"
            if not diagnosis.judged:
                cure = "not judged (no per-layer unit metrics stored)"
            cells = [str(store), label, str(len(ids)), *(_layers(diagnosis, c) for c in COLUMNS), cure]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="/work/runs", help="folder holding experiment folders (read-only)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="DiagnoseConfig thresholds")
    parser.add_argument("--write", type=Path, default=None, metavar="FILE",
                        help="replace the marked block in FILE (e.g. docs/diagnose.md) instead of printing")
    parser.add_argument("--marker", default="diagnose-table", metavar="NAME",
                        help="block markers <!-- NAME:begin --> ... <!-- NAME:end --> (default: %(default)s)")
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    if not runs.is_dir():
        print(f"error: --runs {runs} is not a folder", file=sys.stderr)
        return 2
    problem = None if args.write is None else check_target(args.write, args.marker)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    text = "\n".join(table(runs, args.set))
    if args.write is None:
        print(text)
        return 0
    flags = "".join(f" --set {item}" for item in args.set)
    flags += f" --marker {args.marker}" if args.marker != "diagnose-table" else ""
    replace_block(args.write, args.marker, text, f"scripts/diagnose_table.py --runs {runs}{flags}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
