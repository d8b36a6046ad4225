"""``lopkit list EXPERIMENT_DIR``: the runs of a results store, one line each, with their status and progress."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lopkit.runner.cli_common import EXIT_OK, error_exit
from lopkit.runner.store import SHOWN_STATUSES, ResultStore, StoreError, last_error_line, resolve_store_file

__all__ = ["format_runs", "is_experiment_path", "list_runs"]


def is_experiment_path(text: str) -> bool:
    """True if ``text`` names an experiment folder holding a results store, or a store file itself."""
    path = Path(text)
    return (path.is_dir() or path.is_file()) and resolve_store_file(path).is_file()


def format_runs(runs: Any) -> str:
    """A plain-text table of a store's runs (``ResultStore.runs()``) and a line of totals per status.

    ``interrupted`` is a ``running`` run whose process is gone (killed or stopped with Ctrl-C): rerunning the
    command that started it resumes it from its last checkpoint.
    """
    if runs.empty:
        return "0 runs"
    lines = []
    rows = []
    for run in runs.itertuples(index=False):
        total = "?" if run.total_steps is None or run.total_steps != run.total_steps else int(run.total_steps)
        note = last_error_line(run.error)
        if run.status == "interrupted":
            note = f"process {int(run.pid)} on {run.host} is gone; rerun its command to resume"
        rows.append((run.status, f"{int(run.step)}/{total}", run.benchmark, run.method, str(int(run.seed)),
                     run.run_id, str(run.updated_at), note))
    header = ("status", "step", "benchmark", "method", "seed", "run", "updated", "note")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    counts = runs["status"].value_counts()
    lines.append(f"{len(runs)} runs: " + ", ".join(f"{int(counts[s])} {s}" for s in SHOWN_STATUSES if s in counts))
    return "\n".join(line.rstrip() for line in lines)


def list_runs(path: str) -> int:
    """Print the runs of the store at ``path`` (read-only); one ``error:`` line if it cannot be read."""
    try:
        with ResultStore(path, read_only=True) as store:
            runs = store.runs()
            where = store.path
    except (FileNotFoundError, ValueError, StoreError) as err:  # StoreError: a damaged store
        return error_exit(str(err))
    print(f"runs in {where}:")
    print(format_runs(runs))
    return EXIT_OK
