"""Imports every benchmark module so that each registers itself in ``lopkit.benchmarks.base.BENCHMARKS``."""

from lopkit.benchmarks import toy  # noqa: F401
from lopkit.benchmarks import bitflip  # noqa: F401
from lopkit.benchmarks import cloning  # noqa: F401
from lopkit.benchmarks import continual  # noqa: F401
