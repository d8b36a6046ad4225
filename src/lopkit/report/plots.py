"""Matplotlib figures of the report: one PNG per metric, mean and 95 % band over seeds, one colour per configuration.

Bands are clipped to the metric's valid range (:mod:`lopkit.report.ranges`) and a caption under the plot says
where. A configuration with fewer than :data:`MIN_BAND_SEEDS` seeds gets no band: its seeds are drawn as thin
lines instead, and the caption says why (a 95 % t-interval from 2 seeds is about 13 standard errors wide).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from lopkit.report import ranges  # noqa: E402

#: Fewest seeds of a configuration for which a 95 % t-interval band is drawn.
MIN_BAND_SEEDS = 3

METRIC_TITLES = {
    "task_test_accuracy": "Test accuracy on each new task (end of task)",
    "task_final_train_accuracy": "Training accuracy reached on each task",
    "online_accuracy": "Online training accuracy",
    "online_loss": "Online training loss",
    "online_mse": "Online squared error (per bin)",
    "task_final_loss": "Loss at the end of each task",
    "base_loss": "Base network loss",
    "clone_loss": "Cloned network loss",
    "loss": "Loss",
    "dead_fraction": "Dead fraction",
    "frozen_fraction": "Derivative-frozen fraction",
    "dormant_fraction": "Dormant fraction",
    "saturated_fraction": "Saturated fraction",
    "duplicate_fraction": "Duplicate fraction",
    "effective_rank": "Effective rank",
    "stable_rank": "Stable rank",
    "correlation_rank": "Correlation (Renyi-2) rank",
    "cloning_r2_forward": "Cloning R² forward",
    "cloning_r2_backward": "Cloning R² backward",
    "cloning_r2_std_ratio_barriers_forward": "Cloning R² forward, std ratio (Barriers code)",
    "cloning_r2_std_ratio_barriers_backward": "Cloning R² backward, std ratio (Barriers code)",
    "cloning_r2_variance_ratio_forward": "Cloning R² forward, variance ratio (paper text)",
    "cloning_r2_variance_ratio_backward": "Cloning R² backward, variance ratio (paper text)",
    "base_effective_rank": "Base effective rank",
    "clone_effective_rank": "Clone effective rank",
}


def colour_map(labels: list[str]) -> dict[str, tuple]:
    """A stable colour per configuration label (sorted order, tab10/tab20)."""
    palette = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: palette(i % palette.N) for i, label in enumerate(sorted(labels))}


def metric_title(metric: str, layers: list[str] | None = None) -> str:
    """The plot title of ``metric``, naming the layers it is averaged over when there are any."""
    title = METRIC_TITLES.get(metric, metric)
    if layers:
        title += f" (mean over {', '.join(layers)})" if len(layers) > 1 else f" ({layers[0]})"
    return title


def seed_counts(curve: pd.DataFrame) -> dict[str, int]:
    """Seeds per configuration label of a curve (the most seeds pooled at any of its points)."""
    if curve.empty:
        return {}
    return {str(label): int(n) for label, n in curve.groupby("label", sort=True)["n"].max().items()}


def band_curve(curve: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, int]:
    """The rows of ``curve`` that get a band (labels with enough seeds), clipped to the valid range; and the count clipped."""
    counts = seed_counts(curve)
    banded = curve[curve["label"].map(lambda label: counts.get(str(label), 0) >= MIN_BAND_SEEDS)] if counts else curve
    return ranges.clip_band(banded, metric)


def band_caption(curve: pd.DataFrame, metric: str) -> list[str]:
    """Lines to show under the plot: where the band was clipped to the valid range, and which labels have too few seeds."""
    lines = []
    _, clipped = band_curve(curve, metric)
    if clipped:
        bounds = ranges.describe_range(ranges.valid_range(metric))
        lines.append(f"95 % band clipped to the valid range {bounds} at {clipped} point{'s' if clipped != 1 else ''}.")
    few = {label: n for label, n in seed_counts(curve).items() if n < MIN_BAND_SEEDS}
    if few:
        names = ", ".join(f"{label} (n={n})" for label, n in few.items())
        lines.append(f"Fewer than {MIN_BAND_SEEDS} seeds, so no band (a t-interval that wide is not worth reading); "
                     f"each seed drawn as a thin line: {names}.")
    return lines


def plot_curves(curve: pd.DataFrame, metric: str, x: str, colours: dict[str, tuple], path: Path,
                seeds: pd.DataFrame | None = None, layers: list[str] | None = None) -> Path:
    """Draw one metric's curves (mean line, 95 % band clipped to the valid range) and save them as PNG at ``path``.

    ``seeds`` (columns label, run_id, ``x``, value) draws the runs of configurations with too few seeds for a
    band; ``layers`` names the layers a layer metric is averaged over (in the title). The caption lines of
    :func:`band_caption` are written under the axes.
    """
    counts = seed_counts(curve)
    banded, _ = band_curve(curve, metric)
    caption = band_caption(curve, metric)
    fig, ax = plt.subplots(figsize=(6.4, 3.8 + 0.22 * len(caption)), dpi=110)
    for label, group in curve.groupby("label", sort=True):
        group = group.sort_values(x)
        colour = colours.get(label)
        n = counts.get(str(label), 0)
        ax.plot(group[x], group["mean"], color=colour, marker="o" if x == "task" else None, markersize=3,
                label=f"{label} (n={n})")
        if n < MIN_BAND_SEEDS:
            if seeds is not None and not seeds.empty:
                for _, run in seeds[seeds["label"] == label].groupby("run_id", sort=True):
                    run = run.sort_values(x)
                    ax.plot(run[x], run["value"], color=colour, linewidth=0.7, alpha=0.45, linestyle="--")
            continue
        band = banded[banded["label"] == label].sort_values(x)
        ax.fill_between(band[x], band["low"], band["high"], color=colour, alpha=0.2, linewidth=0)
    ax.set_title(metric_title(metric, layers), fontsize=10)
    ax.set_xlabel("task" if x == "task" else "step")
    if x == "task":
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    bottom = 0.0
    if caption:
        text = "\n".join(textwrap.fill(line, 110) for line in caption)
        rows = text.count("\n") + 1
        bottom = min(0.4, 0.035 * rows + 0.01)
        fig.text(0.01, 0.01, text, fontsize=6.5, color="#444", ha="left", va="bottom")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path
