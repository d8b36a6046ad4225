"""Tasks: what one worker of any backend executes (one run, several runs trained as one vectorised learner, or
one part of the seeds of ``lopkit run --workers N``).

Tasks and their results are plain picklable objects, so the same functions serve every backend."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

from lopkit.benchmarks.vmap_seeds import run_bitflip_seeds
from lopkit.configs import config_to_dict
from lopkit.runner.execute import execute_run
from lopkit.runner.store import ResultStore
from lopkit.runner.sweep.schema import RunSpec

__all__ = ["SEEDS_ENGINE", "Task", "TaskResult", "run_task", "sigint_raises", "worker_init"]

#: ``Task.vectorize_engine`` of one part of ``lopkit run --workers N``: its seeds (one config) run the way
#: ``lopkit run`` runs seeds in one process (:func:`lopkit.runner.seed_runs.run_seeds`).
SEEDS_ENGINE = "seeds"

# ------------------------------------------------------------------------------------------------ tasks
#
# A task is what one worker executes: one run, or (fast path) several bitflip seeds trained together.
# Tasks and their results are plain picklable objects, so the same functions serve every backend.


@dataclasses.dataclass
class Task:
    """One unit of work for a worker: the runs (indices into the sweep) and how to execute them."""

    indices: list[int]
    specs: list[RunSpec]
    store: str | None  # the shared results store; None = write into a private temporary store and return rows
    checkpoint_every: int | None = None
    vectorize_engine: str | None = None  # set for a seed-vectorised group
    threads: int | None = 1
    imports: tuple[str, ...] = ()  # modules outside lopkit that register the sweep's benchmarks or methods
    vectorise: bool = True  # SEEDS_ENGINE only: False runs the seeds one after the other (--no-vectorise)


@dataclasses.dataclass
class TaskResult:
    """What a worker reports for one run of a task (``rows`` only when the driver writes the store)."""

    index: int
    status: str
    error: str = ""
    seconds: float = 0.0
    step: int = 0
    rows: list[dict[str, Any]] | None = None


_STOP_EVENT: Any = None  # set in pool workers: the driver's "stop starting new runs" event


def worker_init(stop_event: Any) -> None:
    """Pool-worker initialiser: own process group, SIGINT ignored between runs, and the driver's stop event.

    The driver forwards exactly one SIGINT per Ctrl-C to each worker; a running run (``execute_run``) turns
    it into "commit a checkpoint and return"; an idle worker ignores it, so the pool never breaks.
    """
    global _STOP_EVENT
    _STOP_EVENT = stop_event
    with contextlib.suppress(OSError):
        os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()


def _exit_when_orphaned(parent_pid: int, period: float = 1.0) -> None:
    """Exit this worker at once if the driver died (e.g. SIGKILL): the run stays resumable from its last commit."""
    while True:
        time.sleep(period)
        if os.getppid() != parent_pid:
            os._exit(1)


@contextlib.contextmanager
def sigint_raises() -> Iterator[None]:
    """While the body runs, SIGINT raises KeyboardInterrupt (also in pool workers that otherwise ignore it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _task_environment(threads: int | None) -> Iterator[None]:
    """Intra-op threads of the task (1 by default: one run per core).

    Metric warnings (e.g. NaN ranks of dead layers) follow each Monitor's own policy
    (:attr:`lopkit.diagnostics.monitor.MonitorConfig.warnings`, once per layer and metric by default).
    """
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _rows_of(store: Any, run_id: str) -> list[dict[str, Any]]:
    """The metric rows of a run as ``{step, task, layer, metric, value}`` dicts (NaN kept)."""
    frame = store.metrics(run_id=run_id)
    return [
        {"step": int(r.step), "task": int(r.task), "layer": str(r.layer), "metric": str(r.metric),
         "value": float(r.value)}
        for r in frame.itertuples(index=False)
    ]


def _execute_one(store: Any, task: Task, index: int, spec: RunSpec) -> TaskResult:
    """One run through ``execute_run`` (start, resume or skip; failure recorded with its traceback)."""
    started = time.monotonic()
    try:
        config = spec.make_config()
        result = execute_run(
            store, spec.benchmark, config, spec.seed, spec.methods, task.checkpoint_every, progress="never",
            preset=spec.preset, raise_on_error=False,
        )
    except Exception:  # noqa: BLE001  (e.g. the config became invalid since validation; never stop the sweep)
        return TaskResult(index, "failed", traceback.format_exc(), time.monotonic() - started)
    rows = _rows_of(store, result.run_id) if task.store is None else None
    return TaskResult(index, result.status, result.error, result.seconds, result.step, rows)


def _execute_vectorised(store: Any, task: Task) -> list[TaskResult]:
    """Several bitflip seeds of one config trained together (``run_bitflip_seeds``); same rows per run."""
    started = time.monotonic()
    config = task.specs[0].make_config()
    runs = []  # (index, spec, run_id) of the seeds that start from scratch here
    results: list[TaskResult] = []
    for index, spec in zip(task.indices, task.specs):
        run_id = spec.stored_run_id(store, config)
        record = store.get_run(run_id)
        if record is not None and record["status"] == "finished":
            results.append(TaskResult(index, "skipped", step=int(record["step"])))
        elif record is not None and int(record["step"]) > 0 and store.load_checkpoint_bytes(run_id) is not None:
            results.append(_execute_one(store, task, index, spec))  # resume an earlier separate run's checkpoint
        else:
            if record is not None and int(record["step"]) > 0:  # rows without a checkpoint cannot be resumed
                store.delete_run(run_id)
            store.start_run(spec.benchmark, spec.method_label, config_to_dict(config), spec.seed,
                            preset=spec.preset, total_steps=config.num_steps, run_id=run_id)
            runs.append((index, spec, run_id))
    if not runs:
        return results
    try:
        with sigint_raises():
            seeds = [spec.seed for _, spec, _ in runs]
            rows = run_bitflip_seeds(config, seeds, engine=task.vectorize_engine or "lean")
    except KeyboardInterrupt:  # the group left 'running' at step 0: a restarted sweep trains it again
        return results + [TaskResult(index, "interrupted") for index, _spec, _run_id in runs]
    except Exception:  # noqa: BLE001  (recorded for every run of the group)
        text = traceback.format_exc()
        for index, _spec, run_id in runs:
            store.fail_run(run_id, text)
            results.append(TaskResult(index, "failed", text, time.monotonic() - started))
        return results
    seconds = (time.monotonic() - started) / len(runs)
    for index, spec, run_id in runs:
        store.commit_chunk(run_id, rows[spec.seed], None, config.num_steps)
        store.finish_run(run_id)
        shipped = rows[spec.seed] if task.store is None else None
        results.append(TaskResult(index, "finished", seconds=seconds, step=config.num_steps, rows=shipped))
    return results


def _execute_group(store: Any, task: Task) -> list[TaskResult]:
    """Runs trained as one vectorised learner (:func:`lopkit.runner.vectorised.execute_group`); same rows per run."""
    from lopkit.runner.vectorised import execute_group

    spec = task.specs[0]
    try:
        with sigint_raises():
            results = execute_group(store, spec.benchmark, [(s.make_config(), s.seed) for s in task.specs],
                                    spec.methods, task.checkpoint_every, progress="never", preset=spec.preset,
                                    handle_sigint=False, log=lambda line: print(f"sweep: {line}", file=sys.stderr))
    except KeyboardInterrupt:  # the runs keep their last commits; a restarted sweep resumes them
        return [TaskResult(index, "interrupted") for index in task.indices]
    except Exception:  # noqa: BLE001  (a set-up error: recorded for every run of the group, the sweep goes on)
        return [TaskResult(index, "failed", traceback.format_exc()) for index in task.indices]
    return [TaskResult(index, r.status, r.error, r.seconds, r.step,
                       _rows_of(store, r.run_id) if task.store is None else None)
            for index, r in zip(task.indices, results)]


def _flat(text: str) -> str:
    """A multi-line message on one line (``; ``-joined), so that it is its own last line."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _execute_seeds(store: Any, task: Task) -> list[TaskResult]:
    """One part of ``lopkit run --workers N``: its seeds run as ``lopkit run --seed-list PART`` runs them.

    Stops after a run reports ``interrupted`` (the driver forwarded Ctrl-C) or when the driver's stop event is set;
    the seeds not reached are then ``interrupted`` too (they resume from their last commit on the next command).
    """
    from lopkit.benchmarks.base import get_benchmark
    from lopkit.runner.seed_runs import run_seeds

    spec = task.specs[0]
    index_of = {s.seed: index for index, s in zip(task.indices, task.specs)}
    seeds = [s.seed for s in task.specs]
    name = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}..{seeds[-1]}"
    results: dict[int, TaskResult] = {}
    rest = "interrupted"

    def log(line: str) -> None:
        print(f"worker ({name}): {line}", file=sys.stderr, flush=True)

    try:
        with sigint_raises():
            cls = get_benchmark(spec.benchmark)
            for seed, result in run_seeds(store, cls, spec.make_config(), seeds, spec.methods, task.checkpoint_every,
                                          "never", preset=spec.preset, vectorise=task.vectorise, log=log,
                                          announce=False):  # the driver said how the seeds run
                index = index_of[seed]
                if isinstance(result, BaseException):  # a set-up error (missing dataset, ...) or a store error
                    rest = "failed"
                    results[index] = TaskResult(index, "failed", _flat(f"{type(result).__name__}: {result}"))
                    break
                if result is None or result.status == "interrupted":
                    results[index] = TaskResult(index, "interrupted", step=result.step if result is not None else 0)
                    break
                rows = _rows_of(store, result.run_id) if task.store is None else None
                results[index] = TaskResult(index, result.status, result.error, result.seconds, result.step, rows)
                if _STOP_EVENT is not None and _STOP_EVENT.is_set():
                    break
    except KeyboardInterrupt:  # a Ctrl-C between runs: every run keeps its last commit
        pass
    except Exception:  # noqa: BLE001  (e.g. a config that no longer validates: recorded for the seeds not run)
        rest = "failed"
        error = traceback.format_exc()
        for index in task.indices:
            results.setdefault(index, TaskResult(index, "failed", error))
    failed = [r.error for r in results.values() if r.status == "failed"]
    return [results.get(index) or TaskResult(index, rest, failed[0] if rest == "failed" and failed else "")
            for index in task.indices]


def run_task(task: Task) -> list[TaskResult]:
    """Execute one task in this process (any backend's worker entry point); never raises for a run's error."""
    import tempfile

    if _STOP_EVENT is not None and _STOP_EVENT.is_set():
        return [TaskResult(index, "cancelled") for index in task.indices]
    for module in task.imports:  # a fresh worker knows only lopkit's own benchmarks and methods
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001
            text = f"{traceback.format_exc()}\nthe worker could not import {module!r}, which registers a benchmark " \
                   "or method of this sweep; make it importable on every worker (PYTHONPATH)"
            return [TaskResult(index, "failed", text) for index in task.indices]
    with contextlib.ExitStack() as stack:
        folder = task.store or stack.enter_context(tempfile.TemporaryDirectory(prefix="lopkit-sweep-"))
        store = stack.enter_context(ResultStore(folder))
        stack.enter_context(_task_environment(task.threads))
        if task.vectorize_engine == SEEDS_ENGINE:
            return _execute_seeds(store, task)
        if task.vectorize_engine == "group":  # lopkit.runner.vectorised.GROUP_ENGINE
            return _execute_group(store, task)
        if task.vectorize_engine is not None:
            return _execute_vectorised(store, task)
        return [_execute_one(store, task, index, spec) for index, spec in zip(task.indices, task.specs)]
