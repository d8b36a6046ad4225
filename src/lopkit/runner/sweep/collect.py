"""The driver's side of every backend: task results become outcomes (and store rows in driver-store mode)."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import traceback
from collections.abc import Iterable
from typing import Any

from lopkit.configs import config_to_dict
from lopkit.runner.execute import progress_enabled
from lopkit.runner.sweep.schema import RunOutcome, Sweep
from lopkit.runner.sweep.tasks import Task, TaskResult, run_task

__all__ = ["Collector", "progress_bar", "run_sequential"]


def _absorb(store: Any, sweep: Sweep, result: TaskResult) -> None:
    """Driver-side store mode: write a run's returned rows and final status into the shared store."""
    if result.status not in ("finished", "failed"):
        return  # skipped: already in the store; interrupted/cancelled: the private store is gone, redo later
    spec = sweep.runs[result.index]
    config = spec.make_config()
    run_id = spec.stored_run_id(store, config)
    existing = store.get_run(run_id)
    if existing is not None and existing["status"] == "finished":
        return
    if result.status == "finished" and existing is not None and int(existing["step"]) > 0:
        store.delete_run(run_id)  # partial rows of an earlier attempt; the worker re-ran the run from scratch
    store.start_run(spec.benchmark, spec.method_label, config_to_dict(config), spec.seed, preset=spec.preset,
                    run_id=run_id)
    if result.status == "finished":
        store.commit_chunk(run_id, result.rows or [], None, result.step)
        store.finish_run(run_id)
    else:  # rows without a checkpoint could not be resumed, so a failed run keeps only its traceback
        store.fail_run(run_id, result.error)


def progress_bar(total: int, initial: int, enabled: bool | str, description: str) -> Any:
    """The overall tqdm bar over runs (on stderr), or None when progress is off."""
    if not progress_enabled(enabled):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="run", file=sys.stderr, dynamic_ncols=True)


class Collector:
    """Gathers task results into outcomes, writes them in driver-store mode and advances the progress bar."""

    def __init__(self, sweep: Sweep, store: Any, driver_writes: bool, bar: Any):
        self.sweep, self.store, self.driver_writes, self.bar = sweep, store, driver_writes, bar
        self.outcomes: dict[int, RunOutcome] = {}

    def add(self, results: Iterable[TaskResult]) -> None:
        """Record the results of one finished task."""
        for result in results:
            if self.driver_writes:
                try:
                    _absorb(self.store, self.sweep, result)
                except Exception:  # noqa: BLE001
                    result = dataclasses.replace(result, status="failed", error=traceback.format_exc())
            spec = self.sweep.runs[result.index]
            self.outcomes[result.index] = RunOutcome(spec, result.status, result.error, result.seconds)
            if self.bar is not None and result.status != "cancelled":
                self.bar.update(1)

    def fail(self, task: Task, error: str) -> None:
        """A task died without reporting (worker crash): its runs are failed, in the store too if registered."""
        for index, spec in zip(task.indices, task.specs):
            with contextlib.suppress(Exception):
                run_id = spec.stored_run_id(self.store)
                record = self.store.get_run(run_id)
                if record is not None and record["status"] != "finished":
                    self.store.fail_run(run_id, error)
            self.outcomes[index] = RunOutcome(spec, "failed", error)
            if self.bar is not None:
                self.bar.update(1)


def run_sequential(tasks: list[Task], collect: Collector) -> bool:
    """Tasks one after the other in this process; returns True if interrupted (Ctrl-C)."""
    for task in tasks:
        try:
            results = run_task(task)
        except KeyboardInterrupt:
            return True
        collect.add(results)
        if any(r.status == "interrupted" for r in results):
            return True
    return False
