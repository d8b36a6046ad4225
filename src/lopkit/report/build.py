"""Build the experiment report: PNG per metric plus one self-contained HTML page with a summary table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from lopkit.report import aggregate, html, plots
from lopkit.runner.store import ResultStore, store_path

PERFORMANCE_METRICS = [
    "task_test_accuracy", "task_final_train_accuracy", "online_accuracy", "online_loss", "online_mse",
    "task_final_loss", "base_loss", "clone_loss", "loss",
]
PLASTICITY_METRICS = [
    "dead_fraction", "frozen_fraction", "dormant_fraction", "duplicate_fraction", "effective_rank", "stable_rank",
    "correlation_rank", "cloning_r2_forward", "cloning_r2_backward", "base_effective_rank", "clone_effective_rank",
    "cloning_r2_std_ratio_barriers_forward", "cloning_r2_std_ratio_barriers_backward",
    "cloning_r2_variance_ratio_forward", "cloning_r2_variance_ratio_backward",
]


@dataclasses.dataclass
class ReportResult:
    """What ``build_report`` wrote."""

    html_path: Path
    png_paths: list[Path]
    summary: pd.DataFrame


def _load(experiment_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    path = store_path(experiment_dir)
    if not path.exists():
        raise FileNotFoundError(
            f"no results store at {path}; run an experiment first, e.g. 'lopkit run bitflip --out {experiment_dir}'"
        )
    store = ResultStore(path, read_only=True)  # reading works on read-only storage too
    try:
        return store.runs(), store.metrics()
    finally:
        store.close()


def task_or_step_values(metrics: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Layer-averaged values on the x axis the data calls for: per task (end-of-task) if runs have tasks, else per step.

    Per task, ``online_*`` metrics are averaged over the task and every other metric takes its end-of-task value.
    """
    values = aggregate.step_values(metrics)
    if values.empty or values.groupby("run_id")["task"].nunique().max() <= 1:
        return values, "step"
    online = values["metric"].str.startswith("online_")
    averaged = values[online].groupby(["run_id", "task", "metric"], as_index=False).agg(
        step=("step", "max"), value=("value", "mean"))
    last = aggregate.per_task_last(values[~online])
    return pd.concat([averaged, last], ignore_index=True), "task"


def build_report(experiment_dir: str | Path, output: str | Path | None = None, png_dir: str | Path | None = None,
                 title: str | None = None, extra_tables: list[tuple[str, pd.DataFrame]] | None = None,
                 extra_notes: list[str] | None = None, final_fraction: float = 0.1,
                 layers: list[str] | None = None) -> ReportResult:
    """Read ``EXPERIMENT_DIR/results.sqlite`` and write PNGs and ``report.html`` (paths returned).

    ``extra_tables`` (caption, table) are shown before the summary (e.g. the ranking of ``lopkit compare``) and
    ``extra_notes`` after the standard notes. ``final_fraction``: the summary's final window (the ranking's
    ``--final-fraction``, so both tables use the same window). ``layers``: read each metric on these layers where
    it was recorded there (default: the activation layers; see :func:`aggregate.select_layers`).
    """
    experiment_dir = Path(experiment_dir)
    runs, metrics = _load(experiment_dir)
    metrics = aggregate.restrict_layers(metrics, layers)
    output = Path(output) if output else experiment_dir / "report.html"
    png_dir = Path(png_dir) if png_dir else output.parent / (output.stem + "_png")
    png_dir.mkdir(parents=True, exist_ok=True)
    output.parent.mkdir(parents=True, exist_ok=True)

    runs = runs.set_index("run_id", drop=False)
    labels = aggregate.config_labels(runs)
    values, x_axis = task_or_step_values(metrics)
    present = set(values["metric"].unique()) if not values.empty else set()
    colours = plots.colour_map(sorted(set(labels.tolist())))
    layers = aggregate.layers_by_metric(metrics)

    def figure(metric: str) -> tuple[Path, list[str]]:
        curve = aggregate.curves(values, labels, metric, x_axis)
        path = plots.plot_curves(curve, metric, x_axis, colours, png_dir / f"{metric}.png",
                                 seeds=aggregate.seed_values(values, labels, metric, x_axis),
                                 layers=layers.get(metric))
        return path, plots.band_caption(curve, metric)

    sections: list[tuple[str, list[tuple[Path, list[str]]]]] = []
    pngs: list[Path] = []
    other = sorted(present - set(PERFORMANCE_METRICS) - set(PLASTICITY_METRICS))
    for heading, names in (("Performance", PERFORMANCE_METRICS), ("Plasticity diagnostics", PLASTICITY_METRICS),
                           ("Other metrics", other)):
        figures = [figure(metric) for metric in names if metric in present]
        if figures:
            sections.append((heading, figures))
            pngs += [path for path, _ in figures]

    summary = aggregate.summary_table(aggregate.step_values(metrics).sort_values("step"), labels,
                                      [m for m in PERFORMANCE_METRICS + PLASTICITY_METRICS if m in present],
                                      final_fraction)
    layer_text = aggregate.describe_layers(layers)
    status = runs.groupby("status").size().to_dict() if not runs.empty else {}
    notes = [
        f"Runs: {len(runs)} ({', '.join(f'{k}: {v}' for k, v in sorted(status.items()))}); "
        f"benchmarks: {', '.join(sorted(runs['benchmark'].unique())) if not runs.empty else '-'}.",
        f"Curves: mean over seeds with a 95 % t-interval band, clipped to the metric's valid range (a caption under "
        f"the plot says where); configurations with fewer than {plots.MIN_BAND_SEEDS} seeds get no band, their seeds "
        f"are drawn as thin lines. Layer metrics are averaged over layers {layer_text}. "
        + ("x axis = task (online metrics averaged over the task, others at its end)." if x_axis == "task"
           else "x axis = optimiser step."),
        f"Summary: each metric averaged over the final {final_fraction:.0%} of each run's measured steps (the same "
        f"values as the ranking of 'lopkit compare'; layer metrics over layers {layer_text}), then mean [95 % CI] "
        f"over seeds ({aggregate.INTERVAL_NOTE}).",
    ]
    failed = runs[runs["status"] == "failed"] if not runs.empty else runs
    for _, run in failed.iterrows():
        error = str(run.get("error") or "").strip().splitlines()
        notes.append(f"FAILED run {run['run_id']} (seed {run['seed']}): {error[-1] if error else 'no message'}")
    stopped = runs[runs["status"] == "interrupted"] if not runs.empty else runs
    for _, run in stopped.iterrows():  # 'running' in the store, but its process is gone (SIGKILL, Ctrl-C, crash)
        notes.append(f"INTERRUPTED run {run['run_id']} (seed {run['seed']}) at step {run['step']}/{run['total_steps']}: "
                     "its process is gone; rerun the command that started it to resume from its last checkpoint")
    notes += list(extra_notes or [])
    from lopkit.report.diagnose_section import diagnose_tables

    diagnosis_tables, diagnosis_notes = diagnose_tables(experiment_dir)
    notes += diagnosis_notes
    page = html.render_page(title or f"lopkit report: {experiment_dir.name}",
                            f"Experiment folder {experiment_dir.resolve()}", sections,
                            list(extra_tables or [])
                            + [(f"Summary (final {final_fraction:.0%} of each run; layer metrics over {layer_text})",
                                summary)] + diagnosis_tables, notes)
    output.write_text(page, encoding="utf-8")
    return ReportResult(output, pngs, summary)
