"""Matplotlib figures of the report: one PNG per metric, mean and 95 % band over seeds, one colour per configuration."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

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
    "dead_fraction": "Dead fraction (mean over layers)",
    "frozen_fraction": "Derivative-frozen fraction (mean over layers)",
    "dormant_fraction": "Dormant fraction (mean over layers)",
    "saturated_fraction": "Saturated fraction (mean over layers)",
    "duplicate_fraction": "Duplicate fraction (mean over layers)",
    "effective_rank": "Effective rank (mean over layers)",
    "stable_rank": "Stable rank (mean over layers)",
    "correlation_rank": "Correlation (Renyi-2) rank (mean over layers)",
    "cloning_r2_forward": "Cloning R² forward (mean over layers)",
    "cloning_r2_backward": "Cloning R² backward (mean over layers)",
    "cloning_r2_std_ratio_barriers_forward": "Cloning R² forward, std ratio (Barriers code; mean over modules)",
    "cloning_r2_std_ratio_barriers_backward": "Cloning R² backward, std ratio (Barriers code; mean over modules)",
    "cloning_r2_variance_ratio_forward": "Cloning R² forward, variance ratio (paper text; mean over modules)",
    "cloning_r2_variance_ratio_backward": "Cloning R² backward, variance ratio (paper text; mean over modules)",
    "base_effective_rank": "Base effective rank",
    "clone_effective_rank": "Clone effective rank",
}


def colour_map(labels: list[str]) -> dict[str, tuple]:
    """A stable colour per configuration label (sorted order, tab10/tab20)."""
    palette = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: palette(i % palette.N) for i, label in enumerate(sorted(labels))}


def plot_curves(curve: pd.DataFrame, metric: str, x: str, colours: dict[str, tuple], path: Path) -> Path:
    """Draw one metric's curves (mean line, 95 % band) and save them as PNG at ``path``."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for label, group in curve.groupby("label", sort=True):
        group = group.sort_values(x)
        colour = colours.get(label)
        seeds = int(group["n"].max())
        ax.plot(group[x], group["mean"], color=colour, marker="o" if x == "task" else None, markersize=3,
                label=f"{label} (n={seeds})")
        if seeds > 1:
            ax.fill_between(group[x], group["low"], group["high"], color=colour, alpha=0.2, linewidth=0)
    ax.set_title(METRIC_TITLES.get(metric, metric), fontsize=10)
    ax.set_xlabel("task" if x == "task" else "step")
    if x == "task":
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
