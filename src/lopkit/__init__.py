"""lopkit: find, explain and fix loss of plasticity (LoP) in PyTorch models.

Everyday names are available from the top level and imported on first use, so ``import lopkit`` stays fast
and loads neither torch nor any sub-package until a name is touched::

    import lopkit as lk
    monitor = lk.Monitor(model, lk.MonitorConfig(every=100))
    method = lk.build_methods("cbp:replacement_rate=1e-4,l2init")

Sub-packages, in the order data flows through them:
``data`` -> ``benchmarks`` -> ``runner`` (+ ``mitigations``, + ``diagnostics.Monitor``) -> store -> ``report``.
``diagnostics`` and ``theory`` are standalone and never import the runner. The seed systems ``moe`` and ``kws``
are built on the core; the core never imports them (their benchmarks are registered by name).
"""

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing would double the time of ``import lopkit``

from lopkit._lazy import lazy_attributes

__version__ = "0.1.0"

#: Public name -> the module defining it (imported lazily by ``__getattr__``, PEP 562).
_EXPORTS: dict[str, str] = {
    # diagnostics
    "Monitor": "lopkit.diagnostics.monitor",
    "MonitorConfig": "lopkit.diagnostics.monitor",
    "MetricSpec": "lopkit.diagnostics.metric_registry",
    "MetricContext": "lopkit.diagnostics.metric_registry",
    "register_metric": "lopkit.diagnostics.metric_registry",
    "available_metrics": "lopkit.diagnostics.metric_registry",
    "diagnose": "lopkit.diagnostics.diagnose",
    "DiagnoseConfig": "lopkit.diagnostics.diagnose",
    # theory
    "clone": "lopkit.theory.cloning",
    "Partition": "lopkit.theory.partition",
    # mitigations
    "Mitigation": "lopkit.mitigations.base",
    "build_methods": "lopkit.mitigations.registry",
    "get_method": "lopkit.mitigations.registry",
    "available_methods": "lopkit.mitigations.registry",
    "UnitGroup": "lopkit.mitigations.layers",
    "find_unit_groups": "lopkit.mitigations.layers",
    "reset_units": "lopkit.mitigations.layers",
    "L2": "lopkit.mitigations.regularizers",
    "L2Init": "lopkit.mitigations.regularizers",
    "NoisySGD": "lopkit.mitigations.perturbation",
    "ShrinkPerturb": "lopkit.mitigations.perturbation",
    "ContinualBackprop": "lopkit.mitigations.resets",
    "AggressiveContinualBackprop": "lopkit.mitigations.resets",
    "ReDo": "lopkit.mitigations.resets",
    "ResetFrozen": "lopkit.mitigations.resets",
    "BreakClones": "lopkit.mitigations.resets",
    "LayerNormInsertion": "lopkit.mitigations.architecture",
    "BatchNormInsertion": "lopkit.mitigations.architecture",
    "DropoutInsertion": "lopkit.mitigations.architecture",
    "CReLUActivation": "lopkit.mitigations.architecture",
    "NormalizeAndProject": "lopkit.mitigations.architecture",
    "ProperAdam": "lopkit.mitigations.field",
    "Parseval": "lopkit.mitigations.field",
    "Spectral": "lopkit.mitigations.field",
    "PeriodicReset": "lopkit.mitigations.field",
    "HareTortoise": "lopkit.mitigations.field",
    "UPGD": "lopkit.mitigations.field",
    "InFeR": "lopkit.mitigations.field",
    "CChain": "lopkit.mitigations.field",
    "PlasticityInjection": "lopkit.mitigations.field",
    "FIRE": "lopkit.mitigations.field",
    "ReGraMa": "lopkit.mitigations.field",
    "SelfNormalizedResets": "lopkit.mitigations.field",
    "DASH": "lopkit.mitigations.field2",
    "SWR": "lopkit.mitigations.field2",
    "TRAC": "lopkit.mitigations.field2",
    "CCBP": "lopkit.mitigations.field2",
    "OptimizerReset": "lopkit.mitigations.field2",
    "LeakyReLUSwap": "lopkit.mitigations.field2",
    "plasticity_probe": "lopkit.diagnostics.plasticity",
    # benchmarks and results
    "Benchmark": "lopkit.benchmarks.base",
    "register_benchmark": "lopkit.benchmarks.base",
    "get_benchmark": "lopkit.benchmarks.registry",
    "ResultStore": "lopkit.runner.store",
    "ConfigError": "lopkit.configs",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time the names come from __getattr__
    from lopkit.benchmarks.base import Benchmark, register_benchmark
    from lopkit.benchmarks.registry import get_benchmark
    from lopkit.configs import ConfigError
    from lopkit.diagnostics.diagnose import DiagnoseConfig, diagnose
    from lopkit.diagnostics.metric_registry import MetricContext, MetricSpec, available_metrics, register_metric
    from lopkit.diagnostics.monitor import Monitor, MonitorConfig
    from lopkit.diagnostics.plasticity import plasticity_probe
    from lopkit.mitigations.architecture import (
        BatchNormInsertion,
        CReLUActivation,
        DropoutInsertion,
        LayerNormInsertion,
        NormalizeAndProject,
    )
    from lopkit.mitigations.base import Mitigation
    from lopkit.mitigations.layers import UnitGroup, find_unit_groups, reset_units
    from lopkit.mitigations.field import (
        FIRE,
        UPGD,
        CChain,
        HareTortoise,
        InFeR,
        Parseval,
        PeriodicReset,
        PlasticityInjection,
        ProperAdam,
        ReGraMa,
        SelfNormalizedResets,
        Spectral,
    )
    from lopkit.mitigations.field2 import CCBP, DASH, SWR, TRAC, LeakyReLUSwap, OptimizerReset
    from lopkit.mitigations.perturbation import NoisySGD, ShrinkPerturb
    from lopkit.mitigations.registry import available_methods, build_methods, get_method
    from lopkit.mitigations.regularizers import L2, L2Init
    from lopkit.mitigations.resets import AggressiveContinualBackprop, BreakClones, ContinualBackprop, ReDo, ResetFrozen
    from lopkit.runner.store import ResultStore
    from lopkit.theory.cloning import clone
    from lopkit.theory.partition import Partition


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
