"""Warning type and helpers used when a diagnostic is undefined for its input."""

from __future__ import annotations

import warnings


class LopkitWarning(UserWarning):
    """Raised (as a warning) when a metric cannot be computed and NaN is returned instead."""


class ConstantUnitWarning(LopkitWarning):
    """Constant units were dropped from a correlation (dead units: an expected LoP state ``dead_fraction`` counts)."""


def warn_nan(reason: str, stacklevel: int = 3) -> float:
    """Emit ``reason`` as a :class:`LopkitWarning` and return ``float('nan')``.

    ``stacklevel=3`` points the warning at the caller of the metric that gave up.
    """
    warnings.warn(reason, LopkitWarning, stacklevel=stacklevel)
    return float("nan")


def warn(reason: str, stacklevel: int = 3, category: type[LopkitWarning] = LopkitWarning) -> None:
    """Emit ``reason`` as a :class:`LopkitWarning` (or a subclass) without returning a value."""
    warnings.warn(reason, category, stacklevel=stacklevel)
