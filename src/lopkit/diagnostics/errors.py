"""Warning type and helpers used when a diagnostic is undefined for its input."""

from __future__ import annotations

import warnings


class LopkitWarning(UserWarning):
    """Raised (as a warning) when a metric cannot be computed and NaN is returned instead."""


def warn_nan(reason: str, stacklevel: int = 3) -> float:
    """Emit ``reason`` as a :class:`LopkitWarning` and return ``float('nan')``.

    ``stacklevel=3`` points the warning at the caller of the metric that gave up.
    """
    warnings.warn(reason, LopkitWarning, stacklevel=stacklevel)
    return float("nan")


def warn(reason: str, stacklevel: int = 3) -> None:
    """Emit ``reason`` as a :class:`LopkitWarning` without returning a value."""
    warnings.warn(reason, LopkitWarning, stacklevel=stacklevel)
