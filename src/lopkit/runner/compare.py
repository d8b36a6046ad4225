"""``lopkit compare``: run a benchmark x methods x seeds grid through the runner, then rank the methods.

Fairness: every cell of the grid uses the *same* benchmark config (one preset plus the same overrides), the
same list of seeds and therefore the same step budget; only the mitigation differs. Cells run one after the
other through :func:`lopkit.runner.execute.execute_run` into one :class:`~lopkit.runner.store.ResultStore`,
seed by seed (every method on seed 0, then every method on seed 1, ...), so an interrupted grid still holds a
balanced comparison. Re-running the same command skips finished cells and resumes an interrupted one from its
last checkpoint; run ids are the runner's (``lopkit run`` with the same config, method and seed is the same run).

Method names are validated, and every method is built once so bad hyper-parameters fail too, before anything
runs. A method entry is a registry spec ``name[:key=value...]``; ``+`` combines methods (``cbp+l2init``);
:data:`METHOD_ALIASES` maps common short names (``snp`` -> ``shrink_perturb``) to registered ones.

Outputs in the experiment folder: ``ranking.csv`` (numeric ranking, one row per method), ``ranking_runs.csv``
(the per-run values it pools) and the HTML report of :func:`lopkit.report.build.build_report` with the ranking
table on top.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from lopkit.benchmarks.base import check_accepts_methods, get_benchmark
from lopkit.configs import ConfigError, config_to_dict
from lopkit.mitigations.registry import METHOD_ALIASES, canonical_spec, split_method_specs
from lopkit.report.build import build_report
from lopkit.report.ranking import ranking_table
from lopkit.runner.cli_common import parse_seeds
from lopkit.runner.execute import RunResult, execute_run, method_label, resolve_methods
from lopkit.runner.store import make_run_id

__all__ = [
    "METHOD_ALIASES",
    "CellResult",
    "ComparePlan",
    "MethodEntry",
    "build_plan",
    "parse_method_list",
    "parse_seeds",
    "rank_plan",
    "run_plan",
    "write_outputs",
]

@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """One method of the grid: its label (the runner's method label) and the registry specs it composes."""

    label: str
    specs: tuple[str, ...]


def resolve_alias(spec: str) -> str:
    """``"SNP:sigma=0.1"`` -> ``"shrink_perturb:sigma=0.1"`` (the registry's :func:`canonical_spec`)."""
    return canonical_spec(spec)


def parse_method_list(text: str | Sequence[str]) -> list[MethodEntry]:
    """``"sgd,cbp:replacement_rate=1e-4,cbp+l2init"`` -> one entry per comma-separated method (aliases resolved).

    Not yet validated against the registry (see :func:`validate_methods`). ConfigError for an empty list or a
    method given twice (all baseline names such as ``sgd``/``none`` are the same method).
    """
    items = [text] if isinstance(text, str) else list(text)
    entries: list[MethodEntry] = []
    for item in items:
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            specs = tuple(split_method_specs(part))
            label = method_label(specs)
            kept = tuple(split_method_specs(label)) if label != method_label(()) else ()
            if any(e.label == label for e in entries):
                raise ConfigError(f"method {label!r} is listed twice in --methods (every baseline name means "
                                  f"{method_label(())!r}); list each method once")
            entries.append(MethodEntry(label, kept))
    if not entries:
        raise ConfigError("--methods is empty; give a comma-separated list such as sgd,cbp,l2init")
    return entries


def validate_methods(entries: Sequence[MethodEntry], benchmark_cls: Any = None) -> None:
    """Build every method once so unknown names, bad hyper-parameters and methods given to a benchmark that cannot
    apply them (``benchmark_cls``) fail (ConfigError) before any run."""
    for entry in entries:
        try:
            built = resolve_methods(entry.specs)
            if benchmark_cls is not None:
                check_accepts_methods(benchmark_cls, built)
        except ConfigError as err:
            raise ConfigError(f"method {entry.label!r}: {err}") from None


@dataclasses.dataclass
class ComparePlan:
    """A validated grid: one benchmark config shared by every method and seed."""

    benchmark: str
    preset: str
    overrides: dict[str, Any]
    config: Any
    methods: list[MethodEntry]
    seeds: list[int]

    @property
    def cells(self) -> list[tuple[MethodEntry, int]]:
        """(method, seed) pairs, seed-major so that a partial grid stays balanced across methods."""
        return [(method, seed) for seed in self.seeds for method in self.methods]

    def run_id(self, method: MethodEntry, seed: int) -> str:
        """The runner's id of one cell (same as ``lopkit run`` with this config, method and seed)."""
        return make_run_id(self.benchmark, method.label, self.config, seed)

    @property
    def run_ids(self) -> list[str]:
        """Ids of every cell, in grid order."""
        return [self.run_id(method, seed) for method, seed in self.cells]


def build_plan(benchmark: str, methods: str | Sequence[str], seeds: str | int | Sequence[int] = 5,
               preset: str = "default", overrides: dict[str, Any] | None = None) -> ComparePlan:
    """Validate benchmark, preset, overrides, methods and seeds (ConfigError naming the problem) into a plan."""
    cls = get_benchmark(benchmark)
    config = cls.make_config(preset, overrides or {})
    entries = parse_method_list(methods)
    validate_methods(entries, cls)
    return ComparePlan(cls.name, preset, dict(overrides or {}), config, entries, parse_seeds(seeds))


@dataclasses.dataclass
class CellResult:
    """What happened to one cell: the method, the seed and the runner's :class:`RunResult`."""

    method: MethodEntry
    seed: int
    result: Any


def run_plan(plan: ComparePlan, store: Any, *, progress: bool | str = True, checkpoint_every: int | None = None,
             on_result: Callable[[CellResult], None] | None = None,
             on_skip: Callable[[MethodEntry, ConfigError], None] | None = None) -> list[CellResult]:
    """Run every cell through ``execute_run`` (finished ones are skipped); stops early on an interrupt.

    A failed cell is recorded in the store and the grid goes on. A method the benchmark refuses at set-up (a
    ConfigError, e.g. ``proper_adam`` on an SGD benchmark) is reported through ``on_skip`` once and its other
    seeds are not tried; the other methods go on. An interrupted cell (Ctrl-C) ends the grid: its last result has
    status ``interrupted``; run the same plan again to resume.
    """
    results = []
    refused: set[str] = set()
    for method, seed in plan.cells:
        if method.label in refused:
            continue
        try:
            result = execute_run(store, plan.benchmark, plan.config, seed, method.specs, checkpoint_every, progress,
                                 preset=plan.preset, label=method.label, raise_on_error=False)
        except KeyboardInterrupt:
            result = RunResult(plan.run_id(method, seed), "interrupted", 0, None)
        except ConfigError as err:  # this method cannot run on this benchmark/config: skip it, keep the grid going
            refused.add(method.label)
            if on_skip is None:
                raise
            on_skip(method, err)
            continue
        cell = CellResult(method, seed, result)
        results.append(cell)
        if on_result is not None:
            on_result(cell)
        if result.status in ("interrupted", "paused"):
            break
    return results


def grid_rows(plan: ComparePlan, store: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The store's runs and metric rows of this plan's *finished* cells only."""
    wanted = set(plan.run_ids)
    runs = store.runs()
    runs = runs[runs["run_id"].isin(wanted) & (runs["status"] == "finished")].reset_index(drop=True)
    metrics = store.metrics(run_id=list(runs["run_id"])) if len(runs) else store.metrics(run_id=[])
    return runs, metrics


def rank_plan(plan: ComparePlan, store: Any, primary: str | None = None, final_fraction: float = 0.1) -> Any:
    """The :class:`~lopkit.report.ranking.Ranking` of the plan's finished cells (ValueError if none finished)."""
    runs, metrics = grid_rows(plan, store)
    if runs.empty:
        raise ValueError("no finished run in this grid yet; run the comparison first")
    return ranking_table(runs, metrics, primary, final_fraction, benchmark=plan.benchmark)


def describe_plan(plan: ComparePlan) -> str:
    """One line: benchmark, preset, overrides, methods, seeds and the shared config."""
    sets = " ".join(f"{k}={v}" for k, v in plan.overrides.items())
    return (f"{plan.benchmark} preset={plan.preset}{' ' + sets if sets else ''} "
            f"methods={','.join(m.label for m in plan.methods)} seeds={','.join(map(str, plan.seeds))} "
            f"({len(plan.cells)} runs, config {json.dumps(config_to_dict(plan.config), sort_keys=True)})")


@dataclasses.dataclass
class CompareOutputs:
    """Files written by :func:`write_outputs` (``html`` is None when the report was skipped)."""

    csv: Path
    runs_csv: Path
    html: Path | None


def write_outputs(plan: ComparePlan, out_dir: str | Path, ranking: Any, html_path: str | Path | None = None,
                  report: bool = True, files_dir: str | Path | None = None) -> CompareOutputs:
    """Write ``ranking.csv``, ``ranking_runs.csv`` and (unless ``report=False``) the HTML report with the ranking.

    The store is read from ``out_dir``; the CSVs go to ``files_dir`` (default ``out_dir``, e.g. another folder
    when ``out_dir`` is read-only).
    """
    store_dir = Path(out_dir)
    out_dir = Path(files_dir) if files_dir is not None else store_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    table = ranking.table.copy()
    table.insert(1, "primary_metric", ranking.primary.name)
    table.insert(2, "better", ranking.primary.direction)
    csv_path = out_dir / "ranking.csv"
    table.to_csv(csv_path)
    runs_path = out_dir / "ranking_runs.csv"
    ranking.per_run.sort_values(["label", "seed"]).to_csv(runs_path)
    html = None
    if report:
        html_path = Path(html_path) if html_path else out_dir / "report.html"
        notes = [f"Comparison: {describe_plan(plan)}.",
                 "Every method ran with the same config, the same seeds and the same number of steps."]
        result = build_report(store_dir, html_path, title=f"lopkit compare: {plan.benchmark}",
                              extra_tables=[(f"Ranking ({ranking.primary.name}, {ranking.primary.direction} is better)",
                                             ranking.formatted())],
                              extra_notes=notes + [ranking.caption()], final_fraction=ranking.final_fraction)
        html = result.html_path
    return CompareOutputs(csv_path, runs_path, html)
