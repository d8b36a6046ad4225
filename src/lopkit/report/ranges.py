"""The valid range of each recorded metric (fractions in [0, 1], losses and ranks >= 0), used to clip report bands.

One table, :data:`METRIC_RANGES`, names the metrics the benchmarks record; :data:`SUFFIX_RANGES` covers the rest
by the end of their name (``*_fraction``, ``*_accuracy``, ``*_loss``, ``*_rank``, ``*_norm``, ...). A metric
matching neither is unbounded. A mean over seeds of in-range values stays in range; only the 95 % t-interval
around it can leave it, which :func:`clip_band` undoes (and counts, so the plot can say so).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

UNIT = (0.0, 1.0)
NON_NEGATIVE = (0.0, math.inf)
AT_MOST_ONE = (-math.inf, 1.0)
UNBOUNDED = (-math.inf, math.inf)

#: Valid (low, high) range of the metrics the benchmarks and the Monitor record.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    # fractions of units and accuracies
    "dead_fraction": UNIT,
    "dormant_fraction": UNIT,
    "frozen_fraction": UNIT,
    "saturated_fraction": UNIT,
    "duplicate_fraction": UNIT,
    "online_accuracy": UNIT,
    "task_test_accuracy": UNIT,
    "task_final_train_accuracy": UNIT,
    "task_online_accuracy": UNIT,
    "task_test_frr": UNIT,
    "task_test_far": UNIT,
    # errors, losses, ranks and norms
    "online_mse": NON_NEGATIVE,
    "online_loss": NON_NEGATIVE,
    "loss": NON_NEGATIVE,
    "task_final_loss": NON_NEGATIVE,
    "task_online_loss": NON_NEGATIVE,
    "base_loss": NON_NEGATIVE,
    "clone_loss": NON_NEGATIVE,
    "clone_probe_loss": NON_NEGATIVE,
    "effective_rank": NON_NEGATIVE,
    "stable_rank": NON_NEGATIVE,
    "correlation_rank": NON_NEGATIVE,
    "base_effective_rank": NON_NEGATIVE,
    "clone_effective_rank": NON_NEGATIVE,
    "weight_norm": NON_NEGATIVE,
    "gradient_norm": NON_NEGATIVE,
    # coefficients of determination: at most 1, unbounded below
    "cloning_r2_forward": AT_MOST_ONE,
    "cloning_r2_backward": AT_MOST_ONE,
}

#: Range by the end of a metric's name, for metrics missing from :data:`METRIC_RANGES` (first match wins).
SUFFIX_RANGES: tuple[tuple[str, tuple[float, float]], ...] = (
    ("_fraction", UNIT),
    ("_accuracy", UNIT),
    ("_frr", UNIT),
    ("_far", UNIT),
    ("_auc", UNIT),
    ("_loss", NON_NEGATIVE),
    ("_mse", NON_NEGATIVE),
    ("_rank", NON_NEGATIVE),
    ("_norm", NON_NEGATIVE),
)


def valid_range(metric: str) -> tuple[float, float]:
    """(low, high) a value of ``metric`` can take; (-inf, inf) for a metric of unknown range."""
    if metric in METRIC_RANGES:
        return METRIC_RANGES[metric]
    for suffix, bounds in SUFFIX_RANGES:
        if metric.endswith(suffix):
            return bounds
    return UNBOUNDED


def describe_range(bounds: tuple[float, float]) -> str:
    """``[0, 1]``, ``[0, inf)``, ``(-inf, 1]`` or ``(-inf, inf)``."""
    low, high = bounds
    left = "(-inf" if math.isinf(low) else f"[{low:g}"
    right = "inf)" if math.isinf(high) else f"{high:g}]"
    return f"{left}, {right}"


def clip_band(curve: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, int]:
    """``curve`` with its ``low``/``high`` columns clipped to the metric's valid range, and how many points were clipped.

    A point counts once if its low end, its high end or both left the range; NaN stays NaN.
    """
    low_bound, high_bound = valid_range(metric)
    if curve.empty:
        return curve, 0
    low = curve["low"].to_numpy(dtype=float)
    high = curve["high"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        outside = (low < low_bound) | (high > high_bound)
    clipped = curve.assign(low=np.clip(low, low_bound, high_bound), high=np.clip(high, low_bound, high_bound))
    return clipped, int(np.count_nonzero(outside))
