"""``lopkit run --workers N``: the seeds cut into N contiguous parts, each trained in its own spawned process.

Each part is one task of the local sweep backend's process pool (:func:`lopkit.runner.sweep.local.run_local`)
with the :data:`~lopkit.runner.sweep.tasks.SEEDS_ENGINE`: the worker runs its seeds exactly as
``lopkit run --seed-list PART`` would in one process (one vectorised learner when the benchmark and methods
allow it, else one after the other), with ``--threads`` shared out between the workers. All write into the
same ``OUT/results.sqlite``. The parts depend only on the seeds and N, so rerunning the command gives each
worker the same seeds: finished parts start no process, and an interrupted group resumes as a group.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lopkit.runner.cli_common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from lopkit.runner.seed_runs import describe_result, seed_parts, seeds_refusal, threads_per_worker

__all__ = ["run_with_workers", "workers_plan_line"]


def _sizes(parts: Sequence[Sequence[int]], joiner: str = "- and ") -> str:
    """Distinct part sizes, largest first: ``[[0, 1, 2, 3], [4, 5, 6]]`` -> ``"4- and 3"``; equal parts -> ``"4"``."""
    return joiner.join(str(size) for size in sorted({len(part) for part in parts}, reverse=True))


def workers_plan_line(parts: Sequence[Sequence[int]], refusal: str | None, threads: int, finished: int = 0) -> str:
    """How the seeds of ``parts`` run, e.g. ``8 seeds as 2 workers x 4-seed vectorised groups, 1 thread each``.

    ``refusal``: why a part's seeds cannot be one vectorised learner (None: they can); ``finished``: seeds of
    the experiment already finished in parts that start no worker.
    """
    count = sum(len(part) for part in parts)
    workers = f"{len(parts)} worker{'s' if len(parts) != 1 else ''}"
    if max(len(part) for part in parts) == 1:
        how = "1 seed"
    elif refusal is None:
        how = f"{_sizes(parts)}-seed vectorised group{'s' if len(parts) != 1 else ''}"
    else:
        how = f"{_sizes(parts, ' and ')} seeds one after the other (separate runs: {refusal})"
    left = f" ({finished} more already finished)" if finished else ""
    return (f"workers: {count} seed{'s' if count != 1 else ''} as {workers} x {how}, "
            f"{threads} thread{'s' if threads != 1 else ''} each{left}")


def run_with_workers(
    store: Any,
    cls: Any,
    config: Any,
    seeds: Sequence[int],
    method_names: Sequence[str],
    *,
    out: Path,
    preset: str,
    overrides: dict[str, Any],
    workers: int,
    threads: int | None,
    checkpoint_every: int | None,
    vectorise: bool,
    resume: str,
    log: Callable[[str], None] = print,
) -> int:
    """Run ``seeds`` in ``workers`` processes into ``store``; print one line per seed; the ``lopkit run`` exit code.

    0: every seed finished (or was already); 1: a seed failed (its error on stderr, the others kept);
    130: interrupted (Ctrl-C: the running groups commit what they have; the line printed says how to resume).
    """
    from lopkit.runner.execute import RunResult, method_label, resolve_methods
    from lopkit.runner.sweep.collect import Collector
    from lopkit.runner.sweep.local import run_local
    from lopkit.runner.sweep.planning import plugin_modules
    from lopkit.runner.sweep.schema import RunSpec, Sweep
    from lopkit.runner.sweep.tasks import SEEDS_ENGINE, Task

    seeds = list(seeds)
    label = method_label(method_names)
    run_ids = {seed: store.resolve_run_id(cls.name, label, config, seed) for seed in seeds}
    finished = {seed for seed in seeds if (store.get_run(run_ids[seed]) or {}).get("status") == "finished"}
    parts = seed_parts(seeds, workers)
    todo = [part for part in parts if any(seed not in finished for seed in part)]
    specs = [RunSpec(cls.name, preset, tuple(overrides.items()), tuple(method_names), seed) for seed in seeds]
    index_of = {seed: index for index, seed in enumerate(seeds)}
    collect = Collector(Sweep(Path(out), specs, checkpoint_every), store, False, None)
    interrupted = False
    if todo:
        store.ensure_writable()  # read-only storage: one StoreError before any worker starts
        per_worker = threads_per_worker(threads, len(todo))
        refusal = seeds_refusal(cls, config, max(len(part) for part in todo), resolve_methods(method_names), vectorise)
        skipped = sum(len(part) for part in parts if part not in todo)
        log(workers_plan_line(todo, refusal, per_worker, skipped))
        log(f"progress of each seed: lopkit list {out}")
        imports = plugin_modules(specs)
        tasks = [Task([index_of[s] for s in part], [specs[index_of[s]] for s in part], str(out), checkpoint_every,
                      SEEDS_ENGINE, per_worker, imports, vectorise) for part in todo]
        try:
            interrupted = run_local(tasks, collect, len(tasks), resume_hint="run the same command again")
        except KeyboardInterrupt:  # a second Ctrl-C: the workers were stopped at once; the store holds their commits
            interrupted = True
    failures, stopped = 0, []
    for seed in seeds:
        record = store.get_run(run_ids[seed]) or {}
        outcome = collect.outcomes.get(index_of[seed])
        status = "skipped" if outcome is None and seed in finished else getattr(outcome, "status", "interrupted")
        if status in ("interrupted", "cancelled"):
            stopped.append(seed)
            where = f" at step {record['step']}/{record['total_steps']}" if record else ""
            print(f"seed {seed}: interrupted{where}; completed chunks are saved in {store.path}", file=sys.stderr)
            continue
        result = RunResult(run_ids[seed], status, int(record.get("step") or 0), record.get("total_steps"),
                           getattr(outcome, "seconds", 0.0), getattr(outcome, "error", ""))
        log(describe_result(seed, result))
        if status == "failed":
            failures += 1
            where = " (full traceback in the store, runs.error)" if record.get("error") else ""
            print(f"error: seed {seed} failed: {result.error_line}{where}", file=sys.stderr)
    if interrupted or stopped:
        print(f"to resume, run the same command again: {resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failures else EXIT_OK
