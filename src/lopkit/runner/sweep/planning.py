"""Planning: the tasks of the runs still to do (seed groups of bitflip runs vectorised, the rest one per task)."""

from __future__ import annotations

import json
from collections.abc import Iterable

from lopkit.benchmarks.base import get_benchmark
from lopkit.mitigations.registry import METHODS, parse_method_spec
from lopkit.runner.sweep.schema import RunSpec, Sweep
from lopkit.runner.sweep.tasks import Task

__all__ = ["plan_tasks", "plugin_modules"]


def plan_tasks(
    sweep: Sweep, pending: list[int], store: str | None, parallelism: int, threads: int | None
) -> list[Task]:
    """Tasks for the runs still to do: one per run, except seed groups of bitflip runs (fast path)."""
    from lopkit.runner.vectorised import GROUP_ENGINE, split_refused_groups, vectorised_group_key

    imports = plugin_modules(sweep.runs[i] for i in pending)
    groups: dict[str, list[int]] = {}
    singles: list[int] = []
    for index in pending:
        spec = sweep.runs[index]
        if sweep.vectorize_seeds and spec.benchmark == "bitflip" and spec.method_label == "sgd":
            key = json.dumps([spec.preset, [list(kv) for kv in spec.overrides]], default=str)
            groups.setdefault(key, []).append(index)
        elif sweep.vectorize_seeds is not False and (key := vectorised_group_key(spec)) is not None:
            groups.setdefault(key, []).append(index)  # lopkit.runner.vectorised (e.g. continual seeds, lr grids)
        else:
            singles.append(index)
    singles += split_refused_groups(sweep.runs, groups)
    tasks = []
    # split seed groups only as far as needed to keep every worker busy (bigger groups vectorise better)
    idle_workers = parallelism - len(singles)
    chunks_per_group = max(1, -(-idle_workers // len(groups))) if groups and idle_workers > 0 else 1
    for key, members in groups.items():
        size = max(1, -(-len(members) // min(chunks_per_group, len(members))))
        for start in range(0, len(members), size):
            chunk = members[start : start + size]
            engine = GROUP_ENGINE if key.startswith(GROUP_ENGINE) else sweep.vectorize_engine
            tasks.append(Task(chunk, [sweep.runs[i] for i in chunk], store, sweep.checkpoint_every,
                              engine, threads, imports))
    for index in singles:
        tasks.append(Task([index], [sweep.runs[index]], store, sweep.checkpoint_every, None, threads, imports))
    return sorted(tasks, key=lambda t: t.indices[0])


def plugin_modules(specs: Iterable[RunSpec]) -> tuple[str, ...]:
    """Modules outside lopkit that registered a benchmark or a method these runs use (workers import them)."""
    classes = []
    for spec in specs:
        classes.append(get_benchmark(spec.benchmark))
        for text in spec.methods:
            classes += [METHODS[name] for name, _ in parse_method_spec(text) if name in METHODS]
    modules = {cls.__module__ for cls in classes}
    return tuple(sorted(m for m in modules if m.split(".")[0] != "lopkit" and m not in ("__main__", "__mp_main__")))
