"""Sweeps: a YAML file of benchmarks x methods x grids x seeds, expanded into runs and executed on a backend.

A sweep file (see ``docs/sweeps.md``) is parsed and validated at once by :func:`load_sweep`: unknown keys,
unknown benchmarks, presets, config values (through the benchmark's ``make_config``) and method names
(through the mitigation registry) are all collected and reported in one :class:`SweepError`. The result is
a :class:`Sweep`, a flat, ordered list of :class:`RunSpec` (one per benchmark x grid point x method x seed).

:func:`run_sweep` executes the runs with one of three backends, each run through
:func:`lopkit.runner.execute.execute_run` into the same results store as ``lopkit run``
(``EXPERIMENT/results.sqlite``):

- ``sequential``: one run after the other in this process (the reference);
- ``local``: a pool of spawned worker processes on this machine (a worker that dies, e.g. killed by the
  out-of-memory killer, costs only its own run: it is retried once on a fresh worker, then recorded failed);
- ``ray``: one Ray task per run (``num_cpus=1``), on a local Ray instance or an existing cluster (``address``).

Workers re-open the store themselves (SQLite in WAL mode lets several processes write). Finished runs are
skipped, unfinished ones resume from their last checkpoint, and a run that raises is recorded as failed
with its traceback without stopping the sweep. :func:`run_sweep` returns one :class:`RunOutcome` per run.

Fast path (``vectorize_seeds: true``): runs of the ``bitflip`` benchmark that share a config, use no
mitigation and differ only by seed are trained together in one task by
:func:`lopkit.benchmarks.vmap_seeds.run_bitflip_seeds`, which writes the same rows per run into the store
(equal to separate runs up to float32 rounding). ``vectorize_engine`` picks its engine: ``lean`` (default,
the benchmark's hand-written step batched over seeds) or ``func`` (``torch.func.vmap`` over any learner;
faster than separate autograd runs but slower than the lean engine on this two-layer net, see
``benchmarks/sweep_backends.py``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import itertools
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lopkit.configs import ConfigError, config_to_dict
from lopkit.runner.cli_common import parse_seeds

__all__ = [
    "BACKENDS",
    "RAY_INSTALL_HINT",
    "RunOutcome",
    "RunSpec",
    "Sweep",
    "SweepError",
    "format_summary",
    "load_sweep",
    "parse_sweep",
    "run_sweep",
]

BACKENDS = ("sequential", "local", "ray")
RAY_INSTALL_HINT = "the 'ray' backend needs Ray: pip install 'lopkit[ray]'"
VECTORIZE_ENGINES = ("lean", "func")

_TOP_KEYS = {
    "experiment": "output folder of the sweep (one results.sqlite); relative to the current directory",
    "preset": "preset of every benchmark unless a run entry sets its own (smoke, default, paper)",
    "seeds": "number of seeds (0..n-1) or an explicit list of seeds",
    "methods": "default methods of every run entry",
    "checkpoint_every": "steps between checkpoints of each run (default: the runner's default)",
    "vectorize_seeds": "true trains bitflip runs that differ only by seed together in one task; false also turns "
                       "off the automatic grouping of runs that share shapes (docs/vectorised_runs.md)",
    "vectorize_engine": "engine of the fast path: lean (batched NumPy step, default) or func (torch.func.vmap)",
    "runs": "list of run entries (benchmark, methods, grid, set, preset, seeds)",
    "description": "free text, ignored",
}
_ENTRY_KEYS = {
    "benchmark": "registered benchmark name",
    "methods": "list of method specs, e.g. [sgd, cbp, 'cbp:replacement_rate=1e-3', 'l2init,shrink_perturb']",
    "grid": "mapping of config key -> list of values; every combination is one run",
    "set": "mapping of config key -> value applied to every run of the entry",
    "preset": "preset of this entry",
    "seeds": "seeds of this entry (number or list)",
}


class SweepError(ConfigError):
    """A sweep file is invalid; the message lists every problem found (with where it is) at once."""

    def __init__(self, problems: Sequence[str], source: str = "sweep"):
        self.problems = list(dict.fromkeys(problems))  # each problem once, in the order found
        lines = "\n".join(f"  - {p}" for p in self.problems)
        count = len(self.problems)
        super().__init__(f"{source} has {count} problem{'s' if count != 1 else ''}:\n{lines}")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: benchmark, preset + overrides (its config), method specs and seed. Picklable."""

    benchmark: str
    preset: str
    overrides: tuple[tuple[str, Any], ...]
    methods: tuple[str, ...]
    seed: int
    grid_keys: tuple[str, ...] = dataclasses.field(default=(), compare=False)
    """Config keys that vary over the entry's grid (shown in the label)."""

    @property
    def overrides_dict(self) -> dict[str, Any]:
        """The config overrides as a dict (grid point merged with ``set``)."""
        return dict(self.overrides)

    def make_config(self) -> Any:
        """The validated typed config of this run (the benchmark's ``make_config``)."""
        from lopkit.benchmarks.base import get_benchmark

        return get_benchmark(self.benchmark).make_config(self.preset, self.overrides_dict)

    @property
    def method_label(self) -> str:
        """The method label stored in the results (``+``-joined specs; ``sgd`` for no mitigation)."""
        from lopkit.runner.execute import method_label

        return method_label(self.methods)

    def run_id(self, config: Any | None = None) -> str:
        """The run's id in the results store (the same id ``lopkit run`` gives it)."""
        from lopkit.runner.store import make_run_id

        config = self.make_config() if config is None else config
        return make_run_id(self.benchmark, self.method_label, config_to_dict(config), self.seed)

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. ``bitflip[width=5] cbp seed=0`` (only grid keys are shown)."""
        grid = ",".join(f"{k}={v}" for k, v in self.overrides if k in self.grid_keys)
        return f"{self.benchmark}{f'[{grid}]' if grid else ''} {self.method_label} seed={self.seed}"


@dataclasses.dataclass
class Sweep:
    """A validated, expanded sweep: where results go, the runs in order, and execution options."""

    experiment: Path
    runs: list[RunSpec]
    checkpoint_every: int | None = None
    vectorize_seeds: bool | None = None  # None: runs with a vectorised learner are grouped, bitflip's fast path off
    vectorize_engine: str = "lean"
    source: str = "sweep"


@dataclasses.dataclass
class RunOutcome:
    """What happened to one run: ``finished`` (ran now), ``skipped`` (already finished) or ``failed``."""

    spec: RunSpec
    status: str
    error: str = ""
    seconds: float = 0.0

    @property
    def error_line(self) -> str:
        """The last non-empty line of the error (for a traceback: the exception and its message)."""
        lines = [line for line in self.error.strip().splitlines() if line.strip()]
        return lines[-1].strip() if lines else ""


# ---------------------------------------------------------------------------------------------- parsing


def _as_seed_list(value: Any, where: str, problems: list[str]) -> list[int] | None:
    """``3`` -> [0, 1, 2]; ``"0-4"`` / ``"0,2"`` / a list -> those seeds (the CLI's grammar); otherwise a problem."""
    try:
        return parse_seeds(value, where)
    except ConfigError as err:
        problems.append(str(err))
        return None


def _check_keys(data: Mapping[str, Any], allowed: Mapping[str, str], where: str, problems: list[str]) -> None:
    """Report every key of ``data`` that is not in ``allowed``, listing the valid ones."""
    for key in data:
        if key not in allowed:
            problems.append(f"{where}: unknown key {key!r}; valid keys: {', '.join(allowed)}")


def _normalise_methods(value: Any, where: str, problems: list[str]) -> list[tuple[str, ...]] | None:
    """A methods list -> one tuple of method specs per method setup (``"a,b"``, ``"a+b"`` or ``[a, b]`` compose)."""
    from lopkit.runner.execute import split_method_names

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        problems.append(f"{where}: expected a non-empty list of method specs, e.g. [sgd, cbp], got {value!r}")
        return None
    result = []
    for i, item in enumerate(value):
        parts = list(item) if isinstance(item, (list, tuple)) else [item]
        if not parts or not all(isinstance(p, str) and p.strip() for p in parts):
            problems.append(f"{where}[{i}]: a method is a spec string like 'cbp:replacement_rate=1e-4', got {item!r}")
            continue
        result.append(tuple(split_method_names(parts)))
    return result


def _check_methods(methods: tuple[str, ...], where: str, problems: list[str], benchmark_cls: Any = None) -> bool:
    """Build the methods once through the registry (unknown names, bad hyper-parameters, a benchmark that cannot
    apply methods become problems)."""
    from lopkit.benchmarks.base import check_accepts_methods
    from lopkit.runner.execute import resolve_methods

    try:
        built = resolve_methods(methods)
        if benchmark_cls is not None:
            check_accepts_methods(benchmark_cls, built)
    except (ConfigError, ValueError, TypeError) as err:
        problems.append(f"{where}: {'+'.join(methods)}: {err}")
        return False
    return True


def _grid_points(grid: Any, where: str, problems: list[str]) -> list[dict[str, Any]] | None:
    """Cartesian product of a ``{key: [values]}`` mapping (a scalar counts as one value), in key order."""
    if grid is None:
        return [{}]
    if not isinstance(grid, Mapping):
        problems.append(f"{where}: expected a mapping of config key -> list of values, got {grid!r}")
        return None
    axes = []
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)):
            values = [values]
        if not values:
            problems.append(f"{where}.{key}: the list of values is empty")
        axes.append([(key, v) for v in values])
    if any(not axis for axis in axes):
        return None
    return [dict(point) for point in itertools.product(*axes)]


def _parse_entry(
    entry: Any, index: int, defaults: dict[str, Any], problems: list[str]
) -> list[tuple[RunSpec, Any]]:
    """Expand one run entry into (spec, config) pairs, appending every problem found to ``problems``."""
    from lopkit.benchmarks.base import get_benchmark

    where = f"runs[{index}]"
    if not isinstance(entry, Mapping):
        problems.append(f"{where}: expected a mapping with at least 'benchmark', got {entry!r}")
        return []
    _check_keys(entry, _ENTRY_KEYS, where, problems)
    name = entry.get("benchmark")
    benchmark_cls = None
    if not isinstance(name, str):
        problems.append(f"{where}: missing 'benchmark' (a registered benchmark name)")
    else:
        try:
            benchmark_cls = get_benchmark(name)
        except ConfigError as err:
            problems.append(f"{where}.benchmark: {err}")
        else:
            where = f"runs[{index}] ({name})"
    preset = entry.get("preset", defaults["preset"])
    if benchmark_cls is not None and preset not in benchmark_cls.presets:
        problems.append(f"{where}.preset: no preset {preset!r}; choose one of {', '.join(benchmark_cls.presets)}")
        benchmark_cls = None  # configs cannot be checked without a preset; the rest of the entry still is
    seeds = _as_seed_list(entry["seeds"], f"{where}.seeds", problems) if "seeds" in entry else defaults["seeds"]
    methods = _normalise_methods(entry.get("methods", defaults["methods"]), f"{where}.methods", problems)
    checked_methods = [
        specs for i, specs in enumerate(methods or [])
        if _check_methods(specs, f"{where}.methods[{i}]", problems, benchmark_cls)
    ]
    fixed = entry.get("set") or {}
    if not isinstance(fixed, Mapping):
        problems.append(f"{where}.set: expected a mapping of config key -> value, got {fixed!r}")
        fixed = None
    points = _grid_points(entry.get("grid"), f"{where}.grid", problems)
    if fixed is not None and points:
        for key in sorted(set(fixed) & set(points[0])):
            problems.append(f"{where}: {key!r} is both in 'set' and in 'grid'; keep it in one of them")
    if benchmark_cls is None:
        return []
    # every key on its own first (unknown keys and wrong types: each reported), then every grid point as a whole
    # (the config's own checks of values, which may depend on several keys)
    bad: set[str] = set()  # repr((key, value)) of the overrides that failed on their own
    for key, value in (fixed or {}).items():
        if not _check_override(benchmark_cls, preset, key, value, f"{where}.set.{key}", problems):
            bad.add(repr((key, value)))
    grid = entry.get("grid")
    for key, values in (grid.items() if isinstance(grid, Mapping) else ()):
        for value in (values if isinstance(values, (list, tuple)) else [values]):
            if repr((key, value)) not in bad and not _check_override(
                    benchmark_cls, preset, key, value, f"{where}.grid.{key}={value}", problems):
                bad.add(repr((key, value)))
    if seeds is None or methods is None or fixed is None or points is None:
        return []
    result = []
    for point in points:
        overrides = {**fixed, **point}
        try:  # the overrides already reported are left out, so the checks of the other values still run
            config = benchmark_cls.make_config(
                preset, {k: v for k, v in overrides.items() if repr((k, v)) not in bad})
        except ConfigError as err:
            shown = ", ".join(f"{k}={v}" for k, v in point.items())
            problems.append(f"{where}{f' at {shown}' if shown else ''}: {err}")
            continue
        if any(repr((k, v)) in bad for k, v in overrides.items()):
            continue
        for specs in checked_methods:
            for seed in seeds:
                spec = RunSpec(name, preset, tuple(overrides.items()), specs, seed, tuple(point))
                result.append((spec, config))
    return result


def _check_override(benchmark_cls: Any, preset: str, key: str, value: Any, where: str, problems: list[str]) -> bool:
    """An unknown config key or a value of the wrong type becomes a problem (False); values are checked later.

    Only the key and the type are checked here, independently of the other keys, so that every such problem of
    an entry is reported; whether a value is allowed can depend on other keys (the config's ``validate``).
    """
    from lopkit.configs import coerce_value, config_field_types, build_config

    fields = config_field_types(benchmark_cls.Config)
    try:
        if key not in fields:
            build_config(benchmark_cls.Config, {key: value})  # raises the registry's "unknown config key" message
        else:
            coerce_value(value, fields[key], key)
    except ConfigError as err:
        problems.append(f"{where}: {err}")
        return False
    return True


def parse_sweep(data: Any, source: str = "sweep", experiment: str | os.PathLike | None = None) -> Sweep:
    """Validate a sweep mapping (the parsed YAML) and expand it into runs; SweepError lists every problem.

    ``experiment`` (e.g. from the command line) overrides the file's ``experiment`` key.
    """
    problems: list[str] = []
    if not isinstance(data, Mapping):
        found = type(data).__name__
        raise SweepError([f"expected a mapping with keys such as 'experiment' and 'runs', got {found}"], source)
    _check_keys(data, _TOP_KEYS, "top level", problems)
    experiment = experiment if experiment is not None else data.get("experiment")
    if not isinstance(experiment, (str, os.PathLike)) or not str(experiment).strip():
        problems.append("top level: missing 'experiment' (the output folder), or pass --experiment")
    seeds = _as_seed_list(data.get("seeds", 1), "seeds", problems)
    defaults = {"preset": data.get("preset", "default"), "seeds": seeds or [0], "methods": data.get("methods", ["sgd"])}
    checkpoint_every = data.get("checkpoint_every")
    if checkpoint_every is not None and (
        isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1
    ):
        problems.append(f"checkpoint_every: expected a positive integer number of steps, got {checkpoint_every!r}")
    vectorize = data.get("vectorize_seeds")
    if vectorize is not None and not isinstance(vectorize, bool):
        problems.append(f"vectorize_seeds: expected true or false, got {vectorize!r}")
    engine = data.get("vectorize_engine", "lean")
    if engine not in VECTORIZE_ENGINES:
        problems.append(f"vectorize_engine: expected one of {', '.join(VECTORIZE_ENGINES)}, got {engine!r}")
    entries = data.get("runs")
    if not isinstance(entries, list) or not entries:
        problems.append("runs: expected a non-empty list of run entries, each with at least 'benchmark'")
        entries = []
    pairs = [pair for i, entry in enumerate(entries) for pair in _parse_entry(entry, i, defaults, problems)]
    seen: dict[str, RunSpec] = {}
    for spec, config in pairs:
        key = spec.run_id(config)
        if key in seen:
            problems.append(f"run {spec.label} appears twice (also as {seen[key].label}); remove the duplicate")
        seen.setdefault(key, spec)
    if problems:
        raise SweepError(problems, source)
    return Sweep(
        experiment=Path(experiment).expanduser(),
        runs=[spec for spec, _ in pairs],
        checkpoint_every=checkpoint_every,
        vectorize_seeds=vectorize,
        vectorize_engine=engine,
        source=source,
    )


def load_sweep(path: str | os.PathLike, experiment: str | os.PathLike | None = None) -> Sweep:
    """Read and validate a sweep YAML file (SweepError with every problem, or a missing-file error)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SweepError([f"no such sweep file: {path}"], str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError([f"not valid YAML: {err}"], str(path)) from None
    return parse_sweep(data, source=str(path), experiment=experiment)


# ------------------------------------------------------------------------------------------------ tasks
#
# A task is what one worker executes: one run, or (fast path) several bitflip seeds trained together.
# Tasks and their results are plain picklable objects, so the same functions serve every backend.


@dataclasses.dataclass
class _Task:
    """One unit of work for a worker: the runs (indices into the sweep) and how to execute them."""

    indices: list[int]
    specs: list[RunSpec]
    store: str | None  # the shared results store; None = write into a private temporary store and return rows
    checkpoint_every: int | None = None
    vectorize_engine: str | None = None  # set for a seed-vectorised group
    threads: int | None = 1
    imports: tuple[str, ...] = ()  # modules outside lopkit that register the sweep's benchmarks or methods


@dataclasses.dataclass
class _TaskResult:
    """What a worker reports for one run of a task (``rows`` only when the driver writes the store)."""

    index: int
    status: str
    error: str = ""
    seconds: float = 0.0
    step: int = 0
    rows: list[dict[str, Any]] | None = None


_STOP_EVENT: Any = None  # set in pool workers: the driver's "stop starting new runs" event


def _worker_init(stop_event: Any) -> None:
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
def _sigint_raises() -> Iterator[None]:
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
    """Intra-op threads of the task (1 by default: one run per core) and no per-step metric warnings."""
    import warnings

    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. NaN ranks of dead layers, repeated at every measurement
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


def _execute_one(store: Any, task: _Task, index: int, spec: RunSpec) -> _TaskResult:
    """One run through ``execute_run`` (start, resume or skip; failure recorded with its traceback)."""
    from lopkit.runner.execute import execute_run

    started = time.monotonic()
    try:
        config = spec.make_config()
        result = execute_run(
            store, spec.benchmark, config, spec.seed, spec.methods, task.checkpoint_every, progress="never",
            preset=spec.preset, raise_on_error=False,
        )
    except Exception:  # noqa: BLE001  (e.g. the config became invalid since validation; never stop the sweep)
        return _TaskResult(index, "failed", traceback.format_exc(), time.monotonic() - started)
    rows = _rows_of(store, result.run_id) if task.store is None else None
    return _TaskResult(index, result.status, result.error, result.seconds, result.step, rows)


def _execute_vectorised(store: Any, task: _Task) -> list[_TaskResult]:
    """Several bitflip seeds of one config trained together (``run_bitflip_seeds``); same rows per run."""
    from lopkit.benchmarks.vmap_seeds import run_bitflip_seeds

    started = time.monotonic()
    config = task.specs[0].make_config()
    runs = []  # (index, spec, run_id) of the seeds that start from scratch here
    results: list[_TaskResult] = []
    for index, spec in zip(task.indices, task.specs):
        run_id = spec.run_id(config)
        record = store.get_run(run_id)
        if record is not None and record["status"] == "finished":
            results.append(_TaskResult(index, "skipped", step=int(record["step"])))
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
        with _sigint_raises():
            seeds = [spec.seed for _, spec, _ in runs]
            rows = run_bitflip_seeds(config, seeds, engine=task.vectorize_engine or "lean")
    except KeyboardInterrupt:  # the group left 'running' at step 0: a restarted sweep trains it again
        return results + [_TaskResult(index, "interrupted") for index, _spec, _run_id in runs]
    except Exception:  # noqa: BLE001  (recorded for every run of the group)
        text = traceback.format_exc()
        for index, _spec, run_id in runs:
            store.fail_run(run_id, text)
            results.append(_TaskResult(index, "failed", text, time.monotonic() - started))
        return results
    seconds = (time.monotonic() - started) / len(runs)
    for index, spec, run_id in runs:
        store.commit_chunk(run_id, rows[spec.seed], None, config.num_steps)
        store.finish_run(run_id)
        shipped = rows[spec.seed] if task.store is None else None
        results.append(_TaskResult(index, "finished", seconds=seconds, step=config.num_steps, rows=shipped))
    return results


def _execute_group(store: Any, task: _Task) -> list[_TaskResult]:
    """Runs trained as one vectorised learner (:func:`lopkit.runner.vectorised.execute_group`); same rows per run."""
    from lopkit.runner.vectorised import execute_group

    spec = task.specs[0]
    try:
        with _sigint_raises():
            results = execute_group(store, spec.benchmark, [(s.make_config(), s.seed) for s in task.specs],
                                    spec.methods, task.checkpoint_every, progress="never", preset=spec.preset,
                                    handle_sigint=False, log=lambda line: print(f"sweep: {line}", file=sys.stderr))
    except KeyboardInterrupt:  # the runs keep their last commits; a restarted sweep resumes them
        return [_TaskResult(index, "interrupted") for index in task.indices]
    except Exception:  # noqa: BLE001  (a set-up error: recorded for every run of the group, the sweep goes on)
        return [_TaskResult(index, "failed", traceback.format_exc()) for index in task.indices]
    return [_TaskResult(index, r.status, r.error, r.seconds, r.step,
                        _rows_of(store, r.run_id) if task.store is None else None)
            for index, r in zip(task.indices, results)]


def _run_task(task: _Task) -> list[_TaskResult]:
    """Execute one task in this process (any backend's worker entry point); never raises for a run's error."""
    import tempfile

    from lopkit.runner.store import ResultStore

    if _STOP_EVENT is not None and _STOP_EVENT.is_set():
        return [_TaskResult(index, "cancelled") for index in task.indices]
    for module in task.imports:  # a fresh worker knows only lopkit's own benchmarks and methods
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001
            text = f"{traceback.format_exc()}\nthe worker could not import {module!r}, which registers a benchmark " \
                   "or method of this sweep; make it importable on every worker (PYTHONPATH)"
            return [_TaskResult(index, "failed", text) for index in task.indices]
    with contextlib.ExitStack() as stack:
        folder = task.store or stack.enter_context(tempfile.TemporaryDirectory(prefix="lopkit-sweep-"))
        store = stack.enter_context(ResultStore(folder))
        stack.enter_context(_task_environment(task.threads))
        if task.vectorize_engine == "group":  # lopkit.runner.vectorised.GROUP_ENGINE
            return _execute_group(store, task)
        if task.vectorize_engine is not None:
            return _execute_vectorised(store, task)
        return [_execute_one(store, task, index, spec) for index, spec in zip(task.indices, task.specs)]


# ------------------------------------------------------------------------------------------------ driver


def _plan_tasks(
    sweep: Sweep, pending: list[int], store: str | None, parallelism: int, threads: int | None
) -> list[_Task]:
    """Tasks for the runs still to do: one per run, except seed groups of bitflip runs (fast path)."""
    from lopkit.runner.vectorised import GROUP_ENGINE, split_refused_groups, vectorised_group_key

    imports = _plugin_modules(sweep.runs[i] for i in pending)
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
            tasks.append(_Task(chunk, [sweep.runs[i] for i in chunk], store, sweep.checkpoint_every,
                               engine, threads, imports))
    for index in singles:
        tasks.append(_Task([index], [sweep.runs[index]], store, sweep.checkpoint_every, None, threads, imports))
    return sorted(tasks, key=lambda t: t.indices[0])


def _plugin_modules(specs: Iterable[RunSpec]) -> tuple[str, ...]:
    """Modules outside lopkit that registered a benchmark or a method these runs use (workers import them)."""
    from lopkit.benchmarks.base import get_benchmark
    from lopkit.mitigations.registry import METHODS, parse_method_spec

    classes = []
    for spec in specs:
        classes.append(get_benchmark(spec.benchmark))
        for text in spec.methods:
            classes += [METHODS[name] for name, _ in parse_method_spec(text) if name in METHODS]
    modules = {cls.__module__ for cls in classes}
    return tuple(sorted(m for m in modules if m.split(".")[0] != "lopkit" and m not in ("__main__", "__mp_main__")))


def _absorb(store: Any, sweep: Sweep, result: _TaskResult) -> None:
    """Driver-side store mode: write a run's returned rows and final status into the shared store."""
    if result.status not in ("finished", "failed"):
        return  # skipped: already in the store; interrupted/cancelled: the private store is gone, redo later
    spec = sweep.runs[result.index]
    config = spec.make_config()
    run_id = spec.run_id(config)
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


def _progress_bar(total: int, initial: int, enabled: bool | str, description: str) -> Any:
    """The overall tqdm bar over runs (on stderr), or None when progress is off."""
    from lopkit.runner.execute import progress_enabled

    if not progress_enabled(enabled):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="run", file=sys.stderr, dynamic_ncols=True)


class _Collector:
    """Gathers task results into outcomes, writes them in driver-store mode and advances the progress bar."""

    def __init__(self, sweep: Sweep, store: Any, driver_writes: bool, bar: Any):
        self.sweep, self.store, self.driver_writes, self.bar = sweep, store, driver_writes, bar
        self.outcomes: dict[int, RunOutcome] = {}

    def add(self, results: Iterable[_TaskResult]) -> None:
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

    def fail(self, task: _Task, error: str) -> None:
        """A task died without reporting (worker crash): its runs are failed, in the store too if registered."""
        for index, spec in zip(task.indices, task.specs):
            with contextlib.suppress(Exception):
                run_id = spec.run_id()
                record = self.store.get_run(run_id)
                if record is not None and record["status"] != "finished":
                    self.store.fail_run(run_id, error)
            self.outcomes[index] = RunOutcome(spec, "failed", error)
            if self.bar is not None:
                self.bar.update(1)


def _run_sequential(tasks: list[_Task], collect: _Collector) -> bool:
    """Tasks one after the other in this process; returns True if interrupted (Ctrl-C)."""
    for task in tasks:
        try:
            results = _run_task(task)
        except KeyboardInterrupt:
            return True
        collect.add(results)
        if any(r.status == "interrupted" for r in results):
            return True
    return False


WORKER_DEATH_RETRIES = 1
"""How often a task whose worker process died (crash, SIGKILL, out-of-memory kill) is run again on a fresh
worker before its runs are recorded as failed. The retry resumes from the run's last checkpoint."""


def describe_worker_death(exitcode: int | None) -> str:
    """Why a worker process ended, for the error of its run: ``signal 9 / SIGKILL: killed, maybe out of memory``."""
    if exitcode is None:
        return "the process vanished"
    if exitcode < 0:
        number = -exitcode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown signal"
        if number == signal.SIGKILL:
            return f"signal {number} / {name}: killed, maybe by the out-of-memory killer"
        return f"signal {number} / {name}"
    return f"exit code {exitcode}"


def worker_death_error(cause: str, attempts: int) -> str:
    """The error recorded for the runs of a task whose worker died ``attempts`` times."""
    tries = f" (on each of its {attempts} attempts)" if attempts > 1 else ""
    return (f"worker process died ({cause}) while running this run{tries}; the other runs went on; "
            "rerun the sweep to resume it from its last checkpoint")


def _worker_loop(conn: Any, stop_event: Any) -> None:
    """A local-backend worker: run the tasks received on ``conn`` one at a time, send back their results."""
    _worker_init(stop_event)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the driver is gone
            return
        if task is None:
            return
        try:
            results = _run_task(task)
        except KeyboardInterrupt:  # a second Ctrl-C inside a run: its last commit is in the store
            results = [_TaskResult(index, "interrupted") for index in task.indices]
        except BaseException:  # noqa: BLE001  (never lose the answer: the driver waits for it)
            results = [_TaskResult(index, "failed", traceback.format_exc()) for index in task.indices]
        try:
            conn.send(results)
        except (EOFError, OSError):  # the driver is gone
            return
        except Exception:  # noqa: BLE001  (a result that cannot be pickled: report that instead)
            conn.send([_TaskResult(index, "failed", traceback.format_exc()) for index in task.indices])


class _LocalWorker:
    """One spawned worker process of the local backend, the driver's end of its pipe and the task it runs."""

    def __init__(self, context: Any, stop_event: Any):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_loop, args=(child, stop_event), name="lopkit-sweep-worker")
        self.process.start()
        child.close()
        self.task: _Task | None = None

    def send(self, task: _Task) -> None:
        """Hand ``task`` to the worker."""
        self.task = task
        self.conn.send(task)

    def interrupt(self) -> None:
        """Forward one SIGINT (the worker lives in its own process group, so a terminal's Ctrl-C misses it)."""
        with contextlib.suppress(OSError, TypeError):
            os.kill(self.process.pid, signal.SIGINT)

    def stop(self, timeout: float) -> None:
        """Ask the worker to exit, wait up to ``timeout`` seconds, then terminate it."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.conn.close()


def _run_local(tasks: list[_Task], collect: _Collector, max_workers: int) -> bool:
    """Tasks on up to ``max_workers`` spawned worker processes; returns True if interrupted (Ctrl-C).

    A worker that dies (crash, SIGKILL, out-of-memory kill) costs only the task it was running: that task is
    run once more on a fresh worker (``WORKER_DEATH_RETRIES``), then its runs are recorded as failed with the
    cause, while every other task goes on.
    """
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    queue = collections.deque(tasks)
    deaths: dict[int, int] = {}
    workers: list[_LocalWorker] = []
    interrupted = False
    try:
        while True:
            try:
                if not interrupted:
                    for worker in workers:
                        if worker.task is None and queue:
                            worker.send(queue.popleft())
                    while queue and len(workers) < max_workers:
                        workers.append(_LocalWorker(context, stop))
                        workers[-1].send(queue.popleft())
                busy = [w for w in workers if w.task is not None]
                if not busy:
                    break
                ready = set(multiprocessing.connection.wait(
                    [w.conn for w in busy] + [w.process.sentinel for w in busy]))
                for worker in busy:
                    if worker.conn in ready or worker.process.sentinel in ready:
                        _settle(worker, workers, queue, deaths, collect, retry=not interrupted)
            except KeyboardInterrupt:
                if interrupted:
                    raise
                interrupted = True
                stop.set()  # workers start no new task
                queue.clear()  # runs not started stay 'cancelled'
                for worker in workers:
                    if worker.task is not None:
                        worker.interrupt()  # running runs commit what they have and return 'interrupted'
                print("\ninterrupt: the running runs are saving a checkpoint (press Ctrl-C again to abort at once)",
                      file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # second Ctrl-C: abort now; the store holds every run's last commit
        for worker in workers:
            worker.interrupt()
        raise
    finally:
        for worker in workers:
            worker.stop(timeout=10 if worker.task is None else 0.5)
    return interrupted


def _settle(worker: _LocalWorker, workers: list[_LocalWorker], queue: Any, deaths: dict[int, int],
            collect: _Collector, retry: bool) -> None:
    """Collect a worker's answer, or handle its death: retry its task on a fresh worker, or fail its runs."""
    task = worker.task
    assert task is not None
    try:
        results = worker.conn.recv()
    except (EOFError, OSError):
        results = None
    except Exception:  # noqa: BLE001  (an answer that cannot be unpickled)
        worker.task = None
        collect.fail(task, traceback.format_exc())
        return
    if results is not None:
        worker.task = None
        collect.add(results)
        return
    worker.process.join(5)
    cause = describe_worker_death(worker.process.exitcode)
    workers.remove(worker)
    worker.task = None
    worker.conn.close()
    attempts = deaths[id(task)] = deaths.get(id(task), 0) + 1
    labels = ", ".join(spec.label for spec in task.specs)
    if retry and attempts <= WORKER_DEATH_RETRIES:
        print(f"warning: a sweep worker died ({cause}) while running {labels}; running it again on a fresh "
              "worker", file=sys.stderr, flush=True)
        queue.appendleft(task)
        return
    print(f"warning: a sweep worker died ({cause}) while running {labels}; recorded as failed, the sweep goes on",
          file=sys.stderr, flush=True)
    collect.fail(task, worker_death_error(cause, attempts))


def _import_ray() -> Any:
    """Import Ray lazily, with the install hint when it is missing."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise RuntimeError(RAY_INSTALL_HINT) from None
    return ray


def _init_ray(ray: Any, address: str | None, num_cpus: int | None) -> bool:
    """Connect to ``address`` or start a quiet local Ray; returns True if this call started it."""
    if ray.is_initialized():
        return False
    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
    return True


def _run_ray(tasks: list[_Task], collect: _Collector, ray: Any) -> bool:
    """One Ray task per task (``num_cpus=1`` each); returns True if interrupted (Ctrl-C)."""
    # a task whose worker process dies is retried once by Ray (as the local backend does), then recorded failed
    remote = ray.remote(num_cpus=1, max_retries=WORKER_DEATH_RETRIES)(_run_task)
    refs = {remote.remote(task): task for task in tasks}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                _collect_ray(ray, ref, refs[ref], collect)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)
        print("\ninterrupt: cancelled the remaining Ray tasks; rerun the sweep to continue",
              file=sys.stderr, flush=True)
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=30)
        for ref in done:
            _collect_ray(ray, ref, refs[ref], collect)
        return True
    return False


def _collect_ray(ray: Any, ref: Any, task: _Task, collect: _Collector) -> None:
    """Record a finished Ray task's results (or its crash / cancellation)."""
    try:
        results = ray.get(ref)
    except ray.exceptions.TaskCancelledError:
        return
    except Exception as err:  # noqa: BLE001  (worker died, serialisation failed...)
        died = tuple(getattr(ray.exceptions, name) for name in (
            "WorkerCrashedError", "OutOfMemoryError", "NodeDiedError", "LocalRayletDiedError")
            if hasattr(ray.exceptions, name))
        if isinstance(err, died):
            cause = {"OutOfMemoryError": "killed by Ray's out-of-memory monitor",
                     "NodeDiedError": "its node died"}.get(type(err).__name__, "the Ray worker crashed or was killed")
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            collect.fail(task, f"{traceback.format_exc()}\n"
                               f"{worker_death_error(f'{cause}: {first.strip()}', 1 + WORKER_DEATH_RETRIES)}")
            return
        collect.fail(task, traceback.format_exc())
        return
    collect.add(results)


def _cluster_cpus(ray: Any) -> int:
    """CPUs of the connected Ray cluster (at least 1)."""
    with contextlib.suppress(Exception):
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return 1


def run_sweep(
    sweep: Sweep,
    backend: str = "local",
    *,
    max_workers: int | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    store_mode: str = "auto",
    threads_per_run: int | None = 1,
    progress: bool | str = True,
) -> list[RunOutcome]:
    """Execute every run of ``sweep`` on ``backend``; one outcome per run, in sweep order.

    Finished runs are skipped (status ``skipped``); unfinished ones resume from their last checkpoint; a run
    that raises is ``failed`` (traceback in the store and the outcome) and the sweep goes on. On Ctrl-C the
    running runs commit a checkpoint, the rest are ``cancelled``, and the sweep returns early.

    ``max_workers``: processes of the ``local`` backend (default: CPU count). ``address``/``num_cpus``: an
    existing Ray cluster to join, or the CPUs of the local Ray it starts. ``store_mode``: ``shared`` (workers
    write the store themselves), ``driver`` (workers use a private store and ship rows back; for clusters
    whose nodes do not share the experiment folder's disk) or ``auto`` (``driver`` with an ``address``).
    ``threads_per_run``: torch intra-op threads inside each run (None leaves torch's default).
    """
    from lopkit.runner.store import ResultStore

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if store_mode not in ("auto", "shared", "driver"):
        raise ValueError(f"store_mode must be auto, shared or driver, got {store_mode!r}")
    if max_workers is not None and max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    if threads_per_run is not None and threads_per_run < 1:
        raise ValueError(f"threads_per_run must be >= 1 (or None for torch's default), got {threads_per_run}")
    if address and backend != "ray":
        raise ValueError("an address is only used by the ray backend; add --backend ray")
    driver_writes = store_mode == "driver" or (store_mode == "auto" and backend == "ray" and bool(address))
    ray = _import_ray() if backend == "ray" else None
    sweep.experiment.mkdir(parents=True, exist_ok=True)
    with ResultStore(sweep.experiment) as store:
        store.ensure_writable()  # read-only storage: one StoreError before any worker starts
        configs = [spec.make_config() for spec in sweep.runs]
        done: dict[int, RunOutcome] = {}
        for index, (spec, config) in enumerate(zip(sweep.runs, configs)):
            record = store.get_run(spec.run_id(config))
            if record is not None and record["status"] == "finished":
                done[index] = RunOutcome(spec, "skipped")
        pending = [i for i in range(len(sweep.runs)) if i not in done]
        bar = _progress_bar(len(sweep.runs), len(done), progress, f"sweep ({backend})")
        collect = _Collector(sweep, store, driver_writes, bar)
        collect.outcomes.update(done)
        shared_store = None if driver_writes else str(sweep.experiment)
        started_ray = False
        try:
            if backend == "sequential":
                tasks = _plan_tasks(sweep, pending, shared_store, 1, threads_per_run)
                _run_sequential(tasks, collect)
            elif backend == "local":
                workers = max_workers or os.cpu_count() or 1
                tasks = _plan_tasks(sweep, pending, shared_store, workers, threads_per_run)
                if tasks:
                    _run_local(tasks, collect, min(workers, len(tasks)))
            elif pending:
                started_ray = _init_ray(ray, address, num_cpus)
                tasks = _plan_tasks(sweep, pending, shared_store, _cluster_cpus(ray), threads_per_run)
                _run_ray(tasks, collect, ray)
        finally:
            if bar is not None:
                bar.close()
            if started_ray:
                ray.shutdown()
    return [collect.outcomes.get(i, RunOutcome(spec, "cancelled")) for i, spec in enumerate(sweep.runs)]


# ------------------------------------------------------------------------------------------------ summary


def summary_counts(outcomes: Sequence[RunOutcome]) -> dict[str, int]:
    """Number of runs per status, in a fixed order (statuses with zero runs omitted)."""
    order = ("finished", "skipped", "failed", "interrupted", "paused", "cancelled")
    counts = {status: sum(o.status == status for o in outcomes) for status in order}
    return {status: count for status, count in counts.items() if count}


def format_summary(outcomes: Sequence[RunOutcome], max_rows: int = 40) -> str:
    """A plain-text table: one line per run (status, seconds, run, first line of the error) and the totals.

    With more than ``max_rows`` runs only the runs that did not finish or skip are listed.
    """
    listed = list(outcomes) if len(outcomes) <= max_rows else [
        o for o in outcomes if o.status not in ("finished", "skipped")
    ]
    lines = []
    if listed:
        width = max(len(o.spec.label) for o in listed)
        lines.append(f"{'status':<11} {'seconds':>8}  {'run':<{width}}  error")
        for o in listed:
            seconds = f"{o.seconds:8.1f}" if o.status == "finished" or o.seconds else f"{'-':>8}"
            lines.append(f"{o.status:<11} {seconds}  {o.spec.label:<{width}}  {o.error_line}".rstrip())
    totals = ", ".join(f"{count} {status}" for status, count in summary_counts(outcomes).items())
    lines.append(f"{len(outcomes)} runs: {totals}")
    return "\n".join(lines)
