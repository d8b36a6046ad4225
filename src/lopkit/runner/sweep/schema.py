"""Sweep files: their keys, the validated :class:`Sweep` of :class:`RunSpec` runs, and the parser that reports
every problem of a file at once (:class:`SweepError`)."""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lopkit.benchmarks.base import check_accepts_methods, get_benchmark
from lopkit.configs import ConfigError, coerce_value, config_field_types, resolve_key
from lopkit.runner.cli_common import parse_seeds
from lopkit.runner.execute import method_label, resolve_methods, split_method_names
from lopkit.runner.store import last_error_line, make_run_id

__all__ = ["BACKENDS", "RAY_INSTALL_HINT", "VECTORIZE_ENGINES", "RunOutcome", "RunSpec", "Sweep", "SweepError",
           "load_sweep", "parse_sweep"]

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
        return get_benchmark(self.benchmark).make_config(self.preset, self.overrides_dict)

    @property
    def method_label(self) -> str:
        """The method label stored in the results (``+``-joined specs; ``sgd`` for no mitigation)."""
        return method_label(self.methods)

    def run_id(self, config: Any | None = None) -> str:
        """The run's id in the results store (the same id ``lopkit run`` gives it)."""
        config = self.make_config() if config is None else config
        return make_run_id(self.benchmark, self.method_label, config, self.seed)

    def stored_run_id(self, store: Any, config: Any | None = None) -> str:
        """The id ``store`` holds this run under (an older store may use an older id; see ``resolve_run_id``)."""
        config = self.make_config() if config is None else config
        return store.resolve_run_id(self.benchmark, self.method_label, config, self.seed)

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
        return last_error_line(self.error)


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
    fields = config_field_types(benchmark_cls.Config)
    try:
        coerce_value(value, fields[resolve_key(benchmark_cls.Config, key)], key)  # flat or dotted (optim.lr)
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
