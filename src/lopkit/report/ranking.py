"""Ranking table of a method comparison: per method, the benchmark's primary metric and plasticity diagnostics.

For every run the ranking takes, from the store's tidy rows:

- ``final``: the primary metric averaged over the final window of the run (the last ``final_fraction`` of its
  measured step range, see :func:`lopkit.report.aggregate.final_window_means`);
- ``auc``: the normalised area under the primary metric's curve against step (its time-average over the run,
  :func:`lopkit.report.aggregate.normalised_auc`);
- ``dead_fraction``, ``duplicate_fraction``, ``effective_rank``: final-window means of the Monitor diagnostics,
  averaged over the *representation layers* (the layers for which the Monitor records ``dead_fraction``, i.e.
  the activation outputs; all monitored layers if none has it).

Every quantity comes from :func:`lopkit.report.aggregate.step_values` (layers chosen by
:func:`~lopkit.report.aggregate.select_layers`), the same values as the summary table of ``lopkit report``, so a
method's final value here equals its summary cell there for the same runs.

Runs are pooled per configuration label (the method, see :func:`lopkit.report.aggregate.config_labels`) and each
quantity is reported as mean and 95 % t-interval over seeds. Methods are sorted by the mean final value of the
primary metric in its better direction (lower error first, or higher accuracy first); NaN goes last.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Iterable

import pandas as pd

from lopkit.diagnostics.errors import LopkitWarning
from lopkit.report import aggregate
from lopkit.runner.store import last_error_line

#: Whether a higher value of a metric is better (used to sort the ranking).
HIGHER_IS_BETTER: dict[str, bool] = {
    "online_mse": False,
    "online_loss": False,
    "loss": False,
    "task_final_loss": False,
    "task_online_loss": False,
    "base_loss": False,
    "clone_loss": False,
    "clone_probe_loss": False,
    "online_accuracy": True,
    "task_online_accuracy": True,
    "task_test_accuracy": True,
    "task_final_train_accuracy": True,
}

#: Primary metric candidates per benchmark, first present one wins.
PRIMARY_METRICS: dict[str, tuple[str, ...]] = {
    "bitflip": ("online_mse",),
    "class_split": ("task_test_accuracy", "online_accuracy"),
    "permuted": ("task_test_accuracy", "online_accuracy"),
    "random_labels": ("task_final_train_accuracy", "online_accuracy"),
    "cloning": ("clone_loss", "clone_probe_loss"),
    "toy": ("online_mse", "online_loss", "loss"),
}

#: Candidates for a benchmark missing from ``PRIMARY_METRICS``.
FALLBACK_PRIMARY_METRICS: tuple[str, ...] = (
    "online_mse", "online_loss", "online_accuracy", "task_test_accuracy", "task_final_train_accuracy", "loss",
)

#: Monitor diagnostics shown next to the primary metric (final-window mean over representation layers).
DIAGNOSTICS: tuple[str, ...] = ("dead_fraction", "duplicate_fraction", "effective_rank")

#: The layer of whole-model rows.
MODEL_LAYER = aggregate.MODEL_LAYER


@dataclasses.dataclass(frozen=True)
class PrimaryMetric:
    """The metric methods are ranked by, and whether a higher value of it is better."""

    name: str
    higher_is_better: bool

    @property
    def direction(self) -> str:
        """``"higher"`` or ``"lower"`` (is better)."""
        return "higher" if self.higher_is_better else "lower"


def parse_primary_metric(text: str) -> PrimaryMetric:
    """``"online_mse"`` or ``"online_mse:lower"`` / ``"my_score:higher"`` -> PrimaryMetric (ValueError if unknown)."""
    name, _, direction = text.strip().partition(":")
    name, direction = name.strip(), direction.strip().lower()
    if not name:
        raise ValueError("the ranking metric is empty; pass a metric name such as online_mse or online_accuracy:higher")
    if direction in ("higher", "max", "up"):
        return PrimaryMetric(name, True)
    if direction in ("lower", "min", "down"):
        return PrimaryMetric(name, False)
    if direction:
        raise ValueError(f"ranking direction must be 'higher' or 'lower', got {direction!r} in {text!r}")
    if name not in HIGHER_IS_BETTER:
        raise ValueError(
            f"no known direction for metric {name!r}; write it as {name}:higher or {name}:lower"
        )
    return PrimaryMetric(name, HIGHER_IS_BETTER[name])


def choose_primary_metric(benchmark: str, available: Iterable[str]) -> PrimaryMetric:
    """The benchmark's primary metric among the ``available`` metric names (ValueError if none is present)."""
    present = set(available)
    candidates = PRIMARY_METRICS.get(benchmark, FALLBACK_PRIMARY_METRICS)
    for name in candidates:
        if name in present:
            return PrimaryMetric(name, HIGHER_IS_BETTER[name])
    raise ValueError(
        f"none of the primary metrics {', '.join(candidates)} of benchmark {benchmark!r} was recorded; "
        f"pass one of the recorded metrics ({', '.join(sorted(present)) or 'none'}) as the ranking metric"
    )


#: Layers whose rows carry ``dead_fraction`` (one definition, shared with the report's summary and plots).
representation_layers = aggregate.representation_layers


def _quantity_names(primary: PrimaryMetric) -> list[str]:
    return [f"final_{primary.name}", f"auc_{primary.name}", *DIAGNOSTICS]


def per_run_scores(runs: pd.DataFrame, metrics: pd.DataFrame, primary: PrimaryMetric,
                   final_fraction: float = 0.1) -> pd.DataFrame:
    """One row per run (index run_id): label, seed, final and AUC of the primary metric, final diagnostics."""
    runs = runs.set_index("run_id", drop=False) if "run_id" in runs.columns else runs
    labels = aggregate.config_labels(runs)
    values = aggregate.step_values(metrics)
    columns = {
        f"final_{primary.name}": aggregate.final_window_means(values, primary.name, final_fraction),
        f"auc_{primary.name}": aggregate.normalised_auc(values, primary.name),
    }
    for name in DIAGNOSTICS:
        columns[name] = aggregate.final_window_means(values, name, final_fraction)
    scores = pd.DataFrame(index=runs.index.rename("run_id"))
    scores["label"] = labels
    scores["seed"] = runs["seed"] if "seed" in runs.columns else math.nan
    for name, series in columns.items():
        scores[name] = series.reindex(scores.index).astype(float)
    return scores


@dataclasses.dataclass
class Ranking:
    """A ranking table (numeric: ``<quantity>_mean/_low/_high`` columns, one row per method) and how it was made."""

    table: pd.DataFrame
    per_run: pd.DataFrame
    primary: PrimaryMetric
    final_fraction: float
    layers: list[str]

    def formatted(self, digits: int = 4) -> pd.DataFrame:
        """Human-readable table: ``mean [low, high]`` strings, best method first."""
        return format_ranking(self.table, self.primary, digits)

    def to_text(self, digits: int = 4) -> str:
        """The formatted table as plain text for a terminal."""
        with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 60):
            return self.formatted(digits).to_string()

    def caption(self) -> str:
        """One sentence saying what the columns are and how the rows are sorted."""
        return (
            f"Ranking by the final-window mean of {self.primary.name} ({self.primary.direction} is better): "
            f"final = mean over the last {self.final_fraction:.0%} of each run's steps; auc = area under the "
            f"curve divided by the step range; diagnostics = final-window means over "
            f"{'layers ' + ', '.join(self.layers) if self.layers else 'monitored layers (none recorded)'}; "
            f"each cell is mean [95 % t-interval] over seeds ({aggregate.INTERVAL_NOTE}); the same final-window "
            f"values as the summary table of the report."
        )


def ranking_table(runs: pd.DataFrame, metrics: pd.DataFrame, primary: PrimaryMetric | str | None = None,
                  final_fraction: float = 0.1, benchmark: str | None = None) -> Ranking:
    """Rank the configurations of ``runs`` (one per label) by the primary metric; mean [95 % CI] over seeds.

    ``primary`` is a PrimaryMetric, a ``"name[:higher|lower]"`` string, or None for the benchmark's default
    (``benchmark`` or the single benchmark of ``runs``). Runs without rows of a quantity get NaN there.
    """
    if runs.empty:
        raise ValueError("no runs to rank; run the comparison first")
    metrics = metrics[metrics["run_id"].isin(runs["run_id"])]
    if isinstance(primary, str):
        primary = parse_primary_metric(primary)
    if primary is None:
        names = benchmark or (runs["benchmark"].iloc[0] if runs["benchmark"].nunique() == 1 else "")
        primary = choose_primary_metric(str(names), metrics["metric"].unique())
    per_run = per_run_scores(runs, metrics, primary, final_fraction)
    quantities = _quantity_names(primary)
    rows = []
    for label, group in per_run.groupby("label", sort=True):
        row: dict[str, float | str | int] = {"method": label, "seeds": int(len(group))}
        for name in quantities:
            mean, low, high = aggregate.interval95(group[name].tolist())
            row.update({f"{name}_mean": mean, f"{name}_low": low, f"{name}_high": high})
        rows.append(row)
    table = pd.DataFrame(rows).set_index("method")
    key = f"final_{primary.name}_mean"
    if table[key].isna().all():
        warnings.warn(f"no run recorded {primary.name}; the ranking order is arbitrary", LopkitWarning, stacklevel=2)
    table = table.sort_values(key, ascending=not primary.higher_is_better, na_position="last", kind="mergesort")
    ordered = table[key] if primary.higher_is_better else -table[key]
    table.insert(0, "position", ordered.rank(ascending=False, method="min").astype("Int64"))
    return Ranking(table, per_run, primary, final_fraction, representation_layers(metrics))


def partial_grid_note(runs: pd.DataFrame, unfinished: int = 0, failed: pd.DataFrame | None = None) -> list[str]:
    """Markdown lines saying how partial a compare grid is ([] when every method has the same finished seeds).

    ``runs``: the finished runs (columns ``method``, ``seed``); ``unfinished``: started runs neither finished nor
    failed; ``failed``: the failed runs (``method``, ``seed``, ``error``), each named with its error's last line.
    """
    lines: list[str] = []
    per_method = runs.groupby("method")["seed"].nunique() if not runs.empty else pd.Series(dtype=int)
    if unfinished or per_method.nunique() > 1:
        lines += [f"**Partial grid:** {per_method.min()}-{per_method.max()} finished seeds per method (the `seeds` "
                  f"column), {unfinished} started cell(s) unfinished; rerun the command to resume. Methods with "
                  "fewer seeds have wider intervals.", ""]
    if failed is not None and not failed.empty:
        cells = "; ".join(f"{row.method} seed {int(row.seed)} ({last_error_line(row.error) or 'no error stored'})"
                          for row in failed.sort_values(["method", "seed"]).itertuples())
        lines += [f"**Failed cells (not in the table):** {cells}.", ""]
    return lines


def format_ranking(table: pd.DataFrame, primary: PrimaryMetric, digits: int = 4) -> pd.DataFrame:
    """String cells ``mean [low, high]`` with headers saying the direction of the primary metric.

    Cells are written by :func:`lopkit.report.aggregate.format_interval` (the summary table's format): an interval
    end outside the metric's valid range is clipped and the cell marked ``*``.
    """
    arrow = "↑" if primary.higher_is_better else "↓"
    headers = {
        f"final_{primary.name}": f"final {primary.name} {arrow}",
        f"auc_{primary.name}": f"auc {primary.name} {arrow}",
        "dead_fraction": "dead fraction",
        "duplicate_fraction": "duplicate fraction",
        "effective_rank": "effective rank",
    }
    out = pd.DataFrame(index=table.index)
    out["#"] = table["position"]
    out["seeds"] = table["seeds"]
    for name, header in headers.items():
        metric = primary.name if name.startswith(("final_", "auc_")) and name not in DIAGNOSTICS else name
        out[header] = [
            aggregate.format_interval(m, lo, hi, metric, digits)
            for m, lo, hi in zip(table[f"{name}_mean"], table[f"{name}_low"], table[f"{name}_high"])
        ]
    return out
