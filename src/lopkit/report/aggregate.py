"""Turn the store's tidy metric rows into per-configuration curves with mean and 95 % interval over seeds."""

from __future__ import annotations

import json
import math
from typing import Iterable

import numpy as np
import pandas as pd
from scipy import stats

MODEL_LAYER = "model"
# configuration keys that never distinguish methods (they differ per run by construction)
IGNORED_CONFIG_KEYS = {"seed"}


def config_labels(runs: pd.DataFrame) -> pd.Series:
    """A short human label per run naming only what differs between configurations (method and varying keys).

    Runs that differ only by seed get the same label, so they are pooled as seeds of one configuration.
    """
    if runs.empty:
        return pd.Series(dtype=str)
    configs = [json.loads(c) if isinstance(c, str) else dict(c or {}) for c in runs["config_json"]]
    frame = pd.DataFrame(configs, index=runs.index).drop(columns=list(IGNORED_CONFIG_KEYS), errors="ignore")
    frame = frame.map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    varying = [c for c in frame.columns if frame[c].astype(str).nunique() > 1]
    parts = []
    multi_benchmark = runs["benchmark"].nunique() > 1
    for idx in runs.index:
        label = []
        if multi_benchmark:
            label.append(str(runs.at[idx, "benchmark"]))
        method = runs.at[idx, "method"] if "method" in runs.columns else None
        label.append(str(method) if method not in (None, "", "none") else "sgd")
        label += [f"{key}={frame.at[idx, key]}" for key in varying]
        parts.append(" ".join(label))
    return pd.Series(parts, index=runs.index, name="label")


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


def layer_mean(metrics: pd.DataFrame) -> pd.DataFrame:
    """Average each metric over layers (whole-model rows kept as they are) -> one value per (run, step, task, metric)."""
    if metrics.empty:
        return metrics.assign(value=pd.Series(dtype=float))
    return (
        metrics.groupby(["run_id", "step", "task", "metric"], as_index=False, sort=True)["value"]
        .mean()
        .reset_index(drop=True)
    )


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


def summary_table(values: pd.DataFrame, labels: pd.Series, metrics: list[str], final_fraction: float = 0.1) -> pd.DataFrame:
    """Per configuration: each metric averaged over the final ``final_fraction`` of each run, mean and 95 % CI over seeds."""
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
            table.setdefault(label, {})[metric] = f"{mean:.4g} [{low:.4g}, {high:.4g}]"
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
