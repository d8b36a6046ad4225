"""Definitions shared by the MoE-PHDS pipeline and its report (a leaf: imports nothing from lopkit)."""

from __future__ import annotations

__all__ = ["TIMINGS_FILE", "k_low"]

#: Stage timings written by the pipeline in its output folder and read by the report.
TIMINGS_FILE = "moe_timings.json"


def k_low(k_pre: int) -> int:
    """The low k of the naive baseline and the bottom of K_train: ``max(1, k_pre // 2)``."""
    return max(1, k_pre // 2)
