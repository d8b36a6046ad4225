"""Imports every benchmark module so that each registers itself in ``lopkit.benchmarks.base.BENCHMARKS``."""

from lopkit.benchmarks import toy  # noqa: F401
from lopkit.benchmarks import bitflip  # noqa: F401
from lopkit.benchmarks import cloning  # noqa: F401
from lopkit.benchmarks import continual  # noqa: F401

# the seed systems built on the same core: MoE-PHDS stages and the HEiMDaL keyword spotter
from lopkit.moe import train as moe_train  # noqa: F401,E402
from lopkit.kws import train as kws_train  # noqa: F401,E402
from lopkit.kws import continual as kws_continual  # noqa: F401,E402
