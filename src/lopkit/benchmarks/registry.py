"""Benchmark registry: name -> class, with classes imported lazily from ``"module:Class"`` strings.

The core never imports a benchmark module (nor the seed systems ``lopkit.moe`` / ``lopkit.kws``) until that
benchmark is asked for by name. Three sources, first match wins:

1. :data:`BENCHMARKS`, filled by the ``@register_benchmark`` decorator of ``lopkit.benchmarks.base`` when a
   module defining a benchmark is imported (also how a user's own script registers one);
2. :data:`BUILTIN_BENCHMARKS`, a table of ``"module:Class"`` strings for lopkit's own benchmarks, the core's
   and the seed systems';
3. package entry points in the group :data:`ENTRY_POINT_GROUP` (``lopkit.benchmarks``), for benchmarks
   shipped by other packages: ``[project.entry-points."lopkit.benchmarks"] mybench = "mypkg.bench:MyBench"``.

This module is a leaf: it imports nothing from lopkit at module level but ``lopkit.configs``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lopkit.configs import ConfigError

if TYPE_CHECKING:
    from lopkit.benchmarks.base import Benchmark

__all__ = ["BENCHMARKS", "BUILTIN_BENCHMARKS", "ENTRY_POINT_GROUP", "benchmark_names", "benchmark_specs",
           "get_benchmark", "load_target"]

#: Benchmarks registered so far (by ``@register_benchmark`` or by loading a spec), by name.
BENCHMARKS: dict[str, type[Benchmark]] = {}

#: lopkit's own benchmarks as ``"module:Class"`` strings, imported only when asked for.
BUILTIN_BENCHMARKS: dict[str, str] = {
    "toy": "lopkit.benchmarks.toy:ToyBenchmark",
    "bitflip": "lopkit.benchmarks.bitflip:BitFlipBenchmark",
    "cloning": "lopkit.benchmarks.cloning:CloningBenchmark",
    "class_split": "lopkit.benchmarks.continual:ClassSplitBenchmark",
    "permuted": "lopkit.benchmarks.continual:PermutedBenchmark",
    "random_labels": "lopkit.benchmarks.continual:RandomLabelsBenchmark",
    # the seed systems built on the core: MoE-PHDS stages and the HEiMDaL keyword spotter
    "moe_pretrain": "lopkit.moe.pretrain:MoEPretrain",
    "moe_finetune": "lopkit.moe.finetune:MoEFinetune",
    "kws_train": "lopkit.kws.train:KWSTrainBenchmark",
    "kws_continual": "lopkit.kws.continual:KWSContinualBenchmark",
}

#: Entry-point group through which other packages add benchmarks.
ENTRY_POINT_GROUP = "lopkit.benchmarks"


def _entry_point_specs() -> dict[str, str]:
    """``name -> "module:Class"`` of the installed packages' ``lopkit.benchmarks`` entry points."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def benchmark_specs() -> dict[str, str]:
    """Every known lazily loadable benchmark, ``name -> "module:Class"`` (built-ins win over entry points)."""
    return {**_entry_point_specs(), **BUILTIN_BENCHMARKS}


def benchmark_names() -> list[str]:
    """Sorted names of every benchmark that :func:`get_benchmark` can return, without importing any of them."""
    return sorted(set(BENCHMARKS) | set(benchmark_specs()))


def load_target(spec: str) -> object:
    """Import ``"package.module:Attr"`` and return the attribute (ValueError for a malformed spec)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:Class', got {spec!r}")
    target: object = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    return target


def get_benchmark(name: str) -> type[Benchmark]:
    """The benchmark class registered under ``name``, importing its module on first use (ConfigError if unknown)."""
    if name in BENCHMARKS:
        return BENCHMARKS[name]
    spec = benchmark_specs().get(name)
    if spec is None:
        raise ConfigError(f"unknown benchmark {name!r}; available: {', '.join(benchmark_names())}")
    cls = load_target(spec)
    if getattr(cls, "name", None) != name:
        raise ConfigError(f"benchmark {name!r} points to {spec}, whose name is {getattr(cls, 'name', None)!r}; "
                          f"fix the registration so the two agree")
    BENCHMARKS.setdefault(name, cls)  # type: ignore[arg-type]
    return BENCHMARKS[name]
