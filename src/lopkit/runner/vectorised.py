"""Several runs of one benchmark (seeds, or configs that share shapes, e.g. an lr grid) trained as ONE learner.

A benchmark offers this by registering a :class:`VectorisedRunner` (:func:`register_vectorised_runner`): the
import path of two callables,

- ``refusal(configs, methods) -> str | None``: why these runs (their typed configs, the resolved mitigation
  list shared by all of them) cannot be vectorised, in one line; None when they can;
- ``build(benchmark_cls, members, methods) -> group``: the learner for ``members``, a list of
  ``(config, seed)``; it raises ConfigError (or another set-up error) for bad input and any other
  exception when the runs turn out not to fit together once built (they then run separately). The group
  offers ``step``, ``total_steps``, ``done``, ``progress()``, ``run(n_steps)`` ->
  one row list per member (the rows each separate run would produce), ``state_dicts()`` -> one state per
  member that the benchmark's own ``load_state_dict`` accepts, and ``load_state_dicts(states)`` (states of
  separate runs or of the group, all at one step).

:func:`vectorisation_refusal` is the up-front check ``lopkit run`` and sweeps use to pick the path;
:func:`execute_group` runs the group into a results store with the same run ids, rows, checkpoints and
resume rules as separate :func:`~lopkit.runner.execute.execute_run` calls (a checkpoint of either path
resumes in the other). When the group cannot start together (runs at different steps) or stops on an error
(e.g. one member diverges), it says so in one line and continues each run separately from its last commit,
so every failure is recorded exactly as a separate run records it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from lopkit.benchmarks.base import Benchmark, BenchmarkConfig, check_accepts_methods
from lopkit.configs import config_to_dict
from lopkit.runner.execute import (
    PIECE_SECONDS,
    SETUP_ERRORS,
    RunResult,
    _graceful_sigint,
    _ProgressBar,
    _resolve_benchmark,
    default_checkpoint_every,
    execute_run,
    method_label,
    progress_enabled,
    resolve_methods,
)
from lopkit.runner.store import ResultStore, StoreError, deserialize_state, serialize_state

__all__ = [
    "GROUP_ENGINE",
    "VectorisedRunner",
    "execute_group",
    "register_vectorised_runner",
    "split_refused_groups",
    "vectorisation_refusal",
    "vectorised_group_key",
    "vectorised_runner",
]


#: ``_Task.vectorize_engine`` of a sweep task that runs a group here (and the prefix of its group key).
GROUP_ENGINE = "group"


@dataclasses.dataclass(frozen=True)
class VectorisedRunner:
    """Where a benchmark's vectorised learner lives: ``module`` and the names of its callables (imported lazily).

    ``varying`` names the module's tuple of config fields that may differ within one group (e.g. ``lr``);
    sweeps group runs whose configs agree on every other field.
    """

    module: str
    refusal: str
    build: str
    varying: str | None = None

    def load(self) -> tuple[Callable[..., str | None], Callable[..., Any]]:
        """The (refusal, build) callables, imported on first use."""
        module = importlib.import_module(self.module)
        return getattr(module, self.refusal), getattr(module, self.build)

    def varying_fields(self) -> tuple[str, ...]:
        """Config fields that may differ between the members of one group."""
        return tuple(getattr(importlib.import_module(self.module), self.varying)) if self.varying else ()


_CONTINUAL = VectorisedRunner(
    "lopkit.benchmarks.vectorised_continual", "continual_refusal", "VectorisedContinual", "VARYING_FIELDS"
)
_RUNNERS: dict[str, VectorisedRunner] = {
    "class_split": _CONTINUAL,
    "permuted": _CONTINUAL,
    "random_labels": _CONTINUAL,
    "bitflip": VectorisedRunner("lopkit.benchmarks.vmap_seeds", "bitflip_refusal", "BitFlipVectorised",
                                "BITFLIP_VARYING_FIELDS"),
    "toy": VectorisedRunner("lopkit.benchmarks.toy", "toy_refusal", "ToySeedGroup", "VARYING_FIELDS"),
    "cloning": VectorisedRunner("lopkit.benchmarks.cloning", "cloning_refusal", "CloningSeedGroup", "VARYING_FIELDS"),
}


def register_vectorised_runner(benchmark: str, runner: VectorisedRunner) -> None:
    """Let ``lopkit run --seeds N`` and sweeps train several runs of ``benchmark`` as one learner."""
    if not isinstance(runner, VectorisedRunner):
        raise TypeError(f"runner must be a VectorisedRunner, got {type(runner).__name__}")
    _RUNNERS[benchmark] = runner


def vectorised_runner(benchmark: str) -> VectorisedRunner | None:
    """The registered runner of ``benchmark`` (None: its runs are always separate)."""
    return _RUNNERS.get(benchmark)


def vectorisation_refusal(
    benchmark_cls: type[Benchmark] | str, configs: Sequence[BenchmarkConfig], methods: Sequence[Any] = ()
) -> str | None:
    """Why these runs (one config each, all with ``methods``) must run separately, in one line; None: vectorise."""
    cls = _resolve_benchmark(benchmark_cls)
    if len(configs) < 2:
        return "a single run"
    runner = vectorised_runner(cls.name)
    if runner is None:
        return f"{cls.name} has no vectorised learner"
    refusal, _build = runner.load()
    return refusal(list(configs), list(methods))


def vectorised_group_key(spec: Any) -> str | None:
    """Sweep grouping key of a :class:`~lopkit.runner.sweep.RunSpec` (None: its benchmark has no vectorised learner).

    Runs with one key share the benchmark, preset, methods and every config field but the runner's ``varying``.
    """
    runner = vectorised_runner(spec.benchmark)
    if runner is None:
        return None
    varying = runner.varying_fields()
    shared = {k: v for k, v in config_to_dict(spec.make_config()).items() if k not in varying}
    return f"{GROUP_ENGINE}:" + json.dumps([spec.benchmark, spec.preset, spec.method_label, shared], sort_keys=True,
                                            default=str)


def split_refused_groups(runs: Sequence[Any], groups: dict[str, list[int]], log: Callable[[str], None] | None = None
                         ) -> list[int]:
    """Drop from ``groups`` the vectorised groups (keys from :func:`vectorised_group_key`) that must run separately.

    Returns the indices (into ``runs``) of their runs; ``log`` (default: stderr) gets one line per group saying
    which path it takes and, for a refused group of several runs, why.
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    separate: list[int] = []
    for key in [k for k in groups if k.startswith(f"{GROUP_ENGINE}:")]:
        members = groups[key]
        first = runs[members[0]]
        reason = "a single run" if len(members) < 2 else vectorisation_refusal(
            first.benchmark, [runs[i].make_config() for i in members], resolve_methods(first.methods))
        where = f"sweep: {len(members)} {first.benchmark} runs ({first.method_label})"
        if reason is None:
            log(f"{where}: vectorised, trained as one learner per task")
            continue
        if len(members) > 1:
            log(f"{where}: separate runs: {reason}")
        separate += groups.pop(key)
    return separate


def _member_start(store: ResultStore, run_id: str) -> tuple[str, int | None]:
    """``("finished", step)``, ``("resume", checkpoint step or 0)`` or ``("separate", None)`` for one member."""
    record = store.get_run(run_id)
    if record is not None and record["status"] == "finished":
        return "finished", int(record["step"])
    checkpoint = store.load_checkpoint_bytes(run_id)
    if checkpoint is not None:
        return "resume", checkpoint[0]
    if record is not None and int(record["step"] or 0) > 0:
        return "separate", None  # rows without a checkpoint: leave it to execute_run's rules
    return "resume", 0


def execute_group(
    store: ResultStore,
    benchmark_cls: type[Benchmark] | str,
    members: Sequence[tuple[BenchmarkConfig, int]],
    method_names: str | Sequence[str] = (),
    checkpoint_every: int | None = None,
    progress: bool | str = True,
    *,
    preset: str | None = None,
    label: str | None = None,
    commit_seconds: float = 30.0,
    handle_sigint: bool = True,
    log: Callable[[str], None] = print,
) -> list[RunResult]:
    """Run ``members`` (``(config, seed)`` pairs) as one vectorised learner into ``store``; one result per member.

    Finished members are skipped; the rest must all start at the same step (fresh, or checkpoints at one step),
    else they run separately (``log`` says why). An error of the group (a member diverging, ...) hands every
    unfinished member to :func:`execute_run` from its last commit, which records failures as usual; only
    set-up errors (:data:`SETUP_ERRORS`) and store errors are raised. Results never raise for a run's error.
    """
    cls = _resolve_benchmark(benchmark_cls)
    members = list(members)
    methods = resolve_methods(method_names)
    check_accepts_methods(cls, methods)
    label = label or method_label(method_names)
    run_ids = [store.resolve_run_id(cls.name, label, config, seed) for config, seed in members]
    if len(set(run_ids)) != len(run_ids):
        raise ValueError("the members of a vectorised group must be distinct runs (a seed or config given twice)")
    results: list[RunResult | None] = [None] * len(members)
    todo: list[int] = []
    starts: dict[int, int | None] = {}
    for index, run_id in enumerate(run_ids):
        kind, step = _member_start(store, run_id)
        if kind == "finished":
            results[index] = RunResult(run_id, "skipped", int(step or 0), store.get_run(run_id)["total_steps"])
        else:
            todo.append(index)
            starts[index] = step

    def separately(indices: Sequence[int]) -> None:
        for index in indices:
            config, seed = members[index]
            results[index] = execute_run(store, cls, config, seed, method_names, checkpoint_every, progress,
                                         preset=preset, label=label, raise_on_error=False,
                                         commit_seconds=commit_seconds, handle_sigint=handle_sigint)

    start_steps = {starts[i] for i in todo}
    if len(todo) < 2 or None in start_steps or len(start_steps) != 1:
        if len(todo) >= 2:
            log(f"separate runs: the unfinished runs are at different steps ({sorted(map(str, start_steps))})")
        separately(todo)
        return results  # type: ignore[return-value]
    _refusal, build = vectorised_runner(cls.name).load()  # type: ignore[union-attr]
    try:
        group = build(cls, [members[i] for i in todo], methods)
    except SETUP_ERRORS:
        raise
    except Exception as err:  # noqa: BLE001  (the runs do not fit together: they run separately)
        log(f"separate runs: {err}")
        separately(todo)
        return results  # type: ignore[return-value]
    for index in todo:
        config, seed = members[index]
        store.start_run(cls.name, label, config_to_dict(config), seed, preset=preset, run_id=run_ids[index])
        store.set_total_steps(run_ids[index], int(group.total_steps))
    if start_steps != {0}:
        group.load_state_dicts([deserialize_state(store.load_checkpoint_bytes(run_ids[i])[1]) for i in todo])
    resumed_from = group.step or None
    started = time.monotonic()
    bar = _ProgressBar(progress_enabled(progress), int(group.total_steps), group.step,
                       f"{cls.name} {label} x{len(todo)} vectorised")
    try:
        with _graceful_sigint(handle_sigint) as interrupt:
            status = _advance_group(store, [run_ids[i] for i in todo], group, checkpoint_every, commit_seconds,
                                    interrupt, bar)
    except (StoreError, KeyboardInterrupt):
        bar.close()
        raise
    except Exception as err:  # noqa: BLE001  (each run redoes its part alone and records its own outcome)
        bar.close()
        log(f"vectorised learner stopped ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "continuing each run separately from its last checkpoint")
        separately(todo)
        return results  # type: ignore[return-value]
    bar.close()
    seconds = time.monotonic() - started
    for index in todo:
        if status == "finished":
            store.finish_run(run_ids[index])
        results[index] = RunResult(run_ids[index], status, group.step, int(group.total_steps), seconds,
                                   resumed_from=resumed_from)
    return results  # type: ignore[return-value]


def _advance_group(
    store: ResultStore,
    run_ids: list[str],
    group: Any,
    checkpoint_every: int | None,
    commit_seconds: float,
    interrupt: Any,
    bar: _ProgressBar,
) -> str:
    """Advance the group in about-a-second pieces, committing every member's rows and checkpoint together."""
    total = int(group.total_steps)
    chunk = int(checkpoint_every) if checkpoint_every is not None else default_checkpoint_every(total)
    pending: list[list[dict[str, Any]]] = [[] for _ in run_ids]
    since_commit, last_commit, rate = 0, time.monotonic(), None
    first_piece = max(1, min(chunk, -(-chunk // 10)))

    def commit() -> None:
        nonlocal pending, since_commit, last_commit
        for run_id, rows, state in zip(run_ids, pending, group.state_dicts()):
            store.commit_chunk(run_id, rows, serialize_state(state), group.step)
        pending, since_commit, last_commit = [[] for _ in run_ids], 0, time.monotonic()

    while not group.done and not interrupt.requested:
        piece = first_piece if rate is None else max(1, int(rate * PIECE_SECONDS))
        piece = max(1, min(piece, chunk - since_commit))
        before, tick = group.step, time.monotonic()
        for rows, new in zip(pending, group.run(piece)):
            rows.extend(new)
        advanced = group.step - before
        if advanced <= 0 and not group.done:
            raise RuntimeError(f"vectorised group made no progress at step {before} of {total}")
        elapsed = time.monotonic() - tick
        rate = advanced / elapsed if elapsed > 0 else None
        since_commit += advanced
        bar.update(advanced, group.progress())
        if since_commit >= chunk or time.monotonic() - last_commit >= commit_seconds or group.done:
            commit()
    if since_commit or any(pending):
        commit()
    if group.done:
        return "finished"
    return "interrupted"
