"""Turn the store's tidy metric rows into per-configuration curves with mean and 95 % interval over seeds."""

from __future__ import annotations

from collections.abc import Sequence

import json
import math
from typing import Iterable

import numpy as np
import pandas as pd
from scipy import stats

from lopkit.report.ranges import valid_range

MODEL_LAYER = "model"
# configuration keys that never distinguish methods (they differ per run by construction)
IGNORED_CONFIG_KEYS = {"seed"}


def _config_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """One column per configuration key of ``runs`` (seed dropped; lists and dicts as JSON text)."""
    configs = [json.loads(c) if isinstance(c, str) else dict(c or {}) for c in runs["config_json"]]
    frame = pd.DataFrame(configs, index=runs.index).drop(columns=list(IGNORED_CONFIG_KEYS), errors="ignore")
    return frame.map(lambda v: json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v)


def _with_neutral_defaults(frame: pd.DataFrame, benchmark: str) -> pd.DataFrame:
    """Fill a config field that older runs lack with its default when the benchmark marks it ``run_id_neutral``.

    A store may hold runs written before such a field existed next to newer ones; they ran the same configuration,
    so they get the same label (and the same run id, :func:`lopkit.configs.run_identity`).
    """
    from lopkit.benchmarks.registry import get_benchmark
    from lopkit.configs import ConfigError, neutral_defaults

    try:
        config_cls = get_benchmark(benchmark).Config
    except ConfigError:
        return frame
    frame = frame.copy()
    for name, value in neutral_defaults(config_cls).items():
        if name in frame.columns:
            value = json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value  # as _config_frame
            frame[name] = frame[name].map(lambda v, d=value: d if v is None or (isinstance(v, float) and math.isnan(v)) else v)
    return frame


def varying_keys(frame: pd.DataFrame) -> list[str]:
    """Columns of a config frame whose value differs between rows (a key some rows lack counts as differing)."""
    def text(value: object) -> str:
        return "<unset>" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(value)

    return [c for c in frame.columns if frame[c].map(text).nunique() > 1]


def _label_value(value: object) -> str:
    """A config value as shown in a label (a key this run's config lacks shows as ``unset``)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "unset"
    return str(value)


def config_labels(runs: pd.DataFrame) -> pd.Series:
    """A short human label per run naming only what differs between configurations (method and varying keys).

    Runs are grouped by benchmark first: with several benchmarks the label starts with the benchmark's name, and
    the configuration keys in a label are those that differ between runs *of the same benchmark* (a key another
    benchmark does not have never shows up as ``key=nan``). Runs that differ only by seed get the same label, so
    they are pooled as seeds of one configuration.
    """
    if runs.empty:
        return pd.Series(dtype=str)
    benchmarks = runs["benchmark"].astype(str) if "benchmark" in runs.columns else pd.Series("", index=runs.index)
    multi_benchmark = benchmarks.nunique() > 1
    parts = pd.Series("", index=runs.index, name="label", dtype=object)
    for benchmark, group in runs.groupby(benchmarks, sort=True):
        frame = _with_neutral_defaults(_config_frame(group), str(benchmark)).dropna(axis=1, how="all")
        varying = varying_keys(frame)
        for idx in group.index:
            label = [str(benchmark)] if multi_benchmark else []
            method = group.at[idx, "method"] if "method" in group.columns else None
            label.append(str(method) if method not in (None, "", "none") else "sgd")
            label += [f"{key}={_label_value(frame.at[idx, key])}" for key in varying]
            parts.at[idx] = " ".join(label)
    return parts.astype(str)


def interval95(values: Iterable[float]) -> tuple[float, float, float]:
    """Mean and two-sided 95 % t-interval of the mean (NaN-free input; a single value gives a zero-width interval)."""
    array = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if array.size == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(array.mean())
    if array.size == 1:
        return (mean, mean, mean)
    half = float(stats.t.ppf(0.975, array.size - 1) * array.std(ddof=1) / math.sqrt(array.size))
    return (mean, mean - half, mean + half)


def representation_layers(metrics: pd.DataFrame) -> list[str]:
    """Layers whose rows carry ``dead_fraction`` (activation outputs); else every non-model layer."""
    if metrics.empty:
        return []
    with_dead = metrics.loc[metrics["metric"] == "dead_fraction", "layer"].unique()
    if len(with_dead):
        return sorted(map(str, with_dead))
    return sorted(str(layer) for layer in metrics["layer"].unique() if layer != MODEL_LAYER)


def restrict_layers(metrics: pd.DataFrame, layers: Sequence[str] | None) -> pd.DataFrame:
    """Per metric, only the rows of ``layers`` when the metric was recorded there (e.g. ``["fc1"]``: bit-flipping's
    duplicate fraction and rank on the pre-activations, as the paper plots them); other metrics keep every row."""
    if metrics.empty or not layers:
        return metrics
    wanted = metrics["layer"].astype(str).isin({str(layer) for layer in layers})
    if not wanted.any():
        found = sorted(str(layer) for layer in metrics["layer"].unique() if layer != MODEL_LAYER)
        raise ValueError(f"no metric was recorded on layer(s) {', '.join(layers)}; this store has {', '.join(found)}")
    has_wanted = wanted.groupby(metrics["metric"]).transform("any")
    return metrics[wanted | ~has_wanted]


def select_layers(metrics: pd.DataFrame) -> pd.DataFrame:
    """The rows that report, ranking and plots average: per metric, its representation-layer rows if it has any.

    A metric recorded on some of :func:`representation_layers` keeps only those rows (so ``effective_rank`` of a
    network monitored at ``fc1`` and ``act1`` is that of ``act1``, the layer with ``dead_fraction``); a metric
    recorded on none of them (whole-model metrics, ``weight_norm`` of a linear layer) keeps all its rows.
    """
    if metrics.empty:
        return metrics
    layers = set(representation_layers(metrics))
    on_representation = metrics["layer"].astype(str).isin(layers)
    has_representation = on_representation.groupby(metrics["metric"]).transform("any")
    return metrics[on_representation | ~has_representation]


def layers_by_metric(metrics: pd.DataFrame) -> dict[str, list[str]]:
    """Per metric, the layers :func:`select_layers` averages (empty for whole-model metrics)."""
    if metrics.empty:
        return {}
    selected = select_layers(metrics)
    return {
        str(metric): sorted(str(layer) for layer in group.unique() if layer != MODEL_LAYER)
        for metric, group in selected.groupby("metric", sort=True)["layer"]
    }


def describe_layers(layers: dict[str, list[str]]) -> str:
    """One phrase naming the layers each layer metric is averaged over, e.g. ``"act1 (weight_norm: fc1)"``."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for metric, names in layers.items():
        if names:
            groups.setdefault(tuple(names), []).append(metric)
    if not groups:
        return "no layer metrics"
    ordered = sorted(groups.items(), key=lambda item: -len(item[1]))
    main, rest = ordered[0], ordered[1:]
    text = ", ".join(main[0])
    if rest:
        text += " (" + "; ".join(f"{', '.join(metrics)}: {', '.join(names)}" for names, metrics in rest) + ")"
    return text


def layer_mean(metrics: pd.DataFrame) -> pd.DataFrame:
    """Average each metric over layers (whole-model rows kept as they are) -> one value per (run, step, task, metric)."""
    if metrics.empty:
        return metrics.assign(value=pd.Series(dtype=float))
    return (
        metrics.groupby(["run_id", "step", "task", "metric"], as_index=False, sort=True)["value"]
        .mean()
        .reset_index(drop=True)
    )


def step_values(metrics: pd.DataFrame) -> pd.DataFrame:
    """One value per (run, step, task, metric): layer metrics averaged over the layers of :func:`select_layers`.

    The report's summary table and ``lopkit compare``'s ranking both take their final-window means from these.
    """
    return layer_mean(select_layers(metrics))


def seed_values(values: pd.DataFrame, labels: pd.Series, metric: str, x: str) -> pd.DataFrame:
    """The per-run points of ``metric`` against ``x`` with each run's label (columns label, run_id, ``x``, value)."""
    subset = values[values["metric"] == metric]
    columns = ["label", "run_id", x, "value"]
    if subset.empty:
        return pd.DataFrame(columns=columns)
    return subset.assign(label=subset["run_id"].map(labels))[columns].reset_index(drop=True)


def per_task_last(values: pd.DataFrame) -> pd.DataFrame:
    """Keep, per (run, task, metric), the last measurement of the task (end-of-task value)."""
    if values.empty:
        return values
    ordered = values.sort_values(["run_id", "metric", "task", "step"])
    return ordered.groupby(["run_id", "metric", "task"], as_index=False).tail(1)


def curves(values: pd.DataFrame, labels: pd.Series, metric: str, x: str) -> pd.DataFrame:
    """Mean and 95 % interval over seeds of ``metric`` against ``x`` ("step" or "task"), one curve per label."""
    subset = values[values["metric"] == metric]
    if subset.empty:
        return pd.DataFrame(columns=["label", x, "mean", "low", "high", "n"])
    subset = subset.assign(label=subset["run_id"].map(labels))
    rows = []
    for (label, position), group in subset.groupby(["label", x], sort=True):
        mean, low, high = interval95(group["value"].tolist())
        rows.append({"label": label, x: position, "mean": mean, "low": low, "high": high, "n": len(group)})
    return pd.DataFrame(rows)


#: What a ``*`` in a table cell and a seed count under 3 mean (for captions).
INTERVAL_NOTE = ("* = interval clipped to the metric's valid range; with fewer than 3 seeds the interval is not "
                 "worth reading")


def format_interval(mean: float, low: float, high: float, metric: str | None = None, digits: int = 4) -> str:
    """``mean [low, high]`` to ``digits`` significant digits, ends clipped to ``metric``'s valid range (then ``*``); NaN -> ``–``."""
    if mean is None or math.isnan(mean):
        return "–"
    low_bound, high_bound = valid_range(metric) if metric else (-math.inf, math.inf)
    clipped = low < low_bound or high > high_bound
    low, high = max(low, low_bound), min(high, high_bound)
    return f"{mean:.{digits}g} [{low:.{digits}g}, {high:.{digits}g}]" + ("*" if clipped else "")


def summary_table(values: pd.DataFrame, labels: pd.Series, metrics: list[str], final_fraction: float = 0.1) -> pd.DataFrame:
    """Per configuration: each metric averaged over the final ``final_fraction`` of each run, mean and 95 % CI over seeds.

    ``values`` are :func:`step_values`; cells as :func:`format_interval` writes them (clipped ends marked ``*``).
    """
    if values.empty:
        return pd.DataFrame()
    table: dict[str, dict[str, str]] = {}
    for metric in metrics:
        subset = values[values["metric"] == metric]
        if subset.empty:
            continue
        finals = final_window_means(subset, metric, final_fraction).to_dict()
        per_label: dict[str, list[float]] = {}
        for run_id, final in finals.items():
            per_label.setdefault(labels.get(run_id, run_id), []).append(final)
        for label, finals_of_label in per_label.items():
            mean, low, high = interval95(finals_of_label)
            table.setdefault(label, {})[metric] = format_interval(mean, low, high, metric)
    frame = pd.DataFrame.from_dict(table, orient="index")
    frame.index.name = "configuration"
    seeds = values.assign(label=values["run_id"].map(labels)).groupby("label")["run_id"].nunique()
    frame.insert(0, "seeds", seeds.reindex(frame.index).fillna(0).astype(int))
    return frame.sort_index()


def final_window_means(values: pd.DataFrame, metric: str, final_fraction: float = 0.1) -> pd.Series:
    """Per run, the mean of ``metric`` over the final ``final_fraction`` of its measured step range (index: run_id).

    The window of a run is ``step >= last - final_fraction * (last - first)`` over that run's rows of ``metric``,
    so a run with a single measurement uses it, and ``final_fraction=0`` keeps only the last step.
    """
    if not 0.0 <= final_fraction <= 1.0:
        raise ValueError(f"final_fraction must be in [0, 1], got {final_fraction}")
    subset = values[values["metric"] == metric]
    finals = {}
    for run_id, group in subset.groupby("run_id", sort=True):
        steps = group["step"]
        cutoff = steps.max() - final_fraction * (steps.max() - steps.min())
        finals[run_id] = float(group.loc[steps >= cutoff, "value"].mean())
    return pd.Series(finals, dtype=float, name=metric).rename_axis("run_id")


def normalised_auc(values: pd.DataFrame, metric: str) -> pd.Series:
    """Per run, the trapezoid area under ``metric`` against step divided by the step range (a time-average).

    Rows sharing a step are averaged first (e.g. over layers); a run with one measurement gets that value.
    """
    subset = values[values["metric"] == metric]
    areas = {}
    for run_id, group in subset.groupby("run_id", sort=True):
        curve = group.groupby("step", sort=True)["value"].mean()
        steps = curve.index.to_numpy(dtype=float)
        heights = curve.to_numpy(dtype=float)
        if steps.size == 1 or steps[-1] == steps[0]:
            areas[run_id] = float(heights.mean())
        else:
            areas[run_id] = float(np.trapezoid(heights, steps) / (steps[-1] - steps[0]))
    return pd.Series(areas, dtype=float, name=metric).rename_axis("run_id")
