"""The Monitor's metric registry: every per-layer metric is a :class:`MetricSpec` (built-ins included).

A metric says which layers it applies to (layer kinds or a predicate) and which tensors it needs; the Monitor
captures only what the chosen metrics need and hands each one a :class:`MetricContext`::

    import lopkit as lk

    def mean_activation(ctx: lk.MetricContext) -> float:
        return float(ctx.output.mean())

    lk.register_metric(lk.MetricSpec("mean_activation", mean_activation, layers=("activation",)))
    # or for one Monitor only: lk.Monitor(model, extra_metrics=[lk.MetricSpec(...)])

Layer kinds: ``"activation"`` (elementwise activations, also the ones the Monitor found inside a
transformer layer), ``"parametric"`` (Linear/Conv weight layers; ``"weight"`` is accepted as an alias) and
``"other"`` (any other module named in ``layers=``, e.g. a norm or a residual block). What a metric may need
(:data:`NEEDS`): ``"output"`` (always given), ``"pre_activation"`` (the module input ``z``),
``"output_grad"`` (``dL/dh``: needs a probe loss), ``"parameters"`` (the layer has parameters) and
``"parameter_grads"`` (``dL/dtheta``: needs a probe loss), ``"partition"`` (the layer has block ids).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lopkit.diagnostics.activations import dead_fraction, dormant_fraction, frozen_fraction, saturated_fraction
from lopkit.diagnostics.cloning import cloning_r2
from lopkit.diagnostics.curvature import gradient_norm, parameter_norm
from lopkit.diagnostics.heads import concat_heads_of, duplicate_heads_fraction
from lopkit.diagnostics.rank import RankWorkspace
from lopkit.diagnostics.similarity import duplicate_fraction

if TYPE_CHECKING:
    from lopkit.diagnostics.monitor import MonitorConfig

__all__ = [
    "LAYER_KINDS",
    "NEEDS",
    "LayerInfo",
    "MetricContext",
    "MetricSpec",
    "available_metrics",
    "get_metric",
    "register_metric",
    "unregister_metric",
]

#: Layer kinds a metric can name in ``layers`` ("weight" is an alias of "parametric").
LAYER_KINDS: tuple[str, ...] = ("activation", "parametric", "other")
_KIND_ALIASES = {"weight": "parametric"}

#: What a metric can ask the Monitor for.
NEEDS: tuple[str, ...] = ("output", "pre_activation", "output_grad", "parameters", "parameter_grads", "partition")

#: Needs that require a probe loss (``probe_targets`` and ``loss_fn`` in ``measure``).
LOSS_NEEDS = frozenset({"output_grad", "parameter_grads"})

#: Whole-model metric names computed by the Monitor itself (not per layer, not in the registry).
MODEL_METRICS: tuple[str, ...] = ("loss", "hessian_top_eigenvalue")


@dataclass(frozen=True)
class LayerInfo:
    """What a ``layers`` predicate sees of a candidate layer: its name, module, kind and the Monitor's config."""

    name: str
    module: nn.Module
    kind: str
    in_partition: bool
    config: MonitorConfig


@dataclass
class MetricContext:
    """Everything a metric function may read about one call of one layer during the probe pass.

    Matrices are ``(samples, units)``: ``output`` is ``h``, ``pre_activation`` is ``z`` (or None when not
    captured), ``output_grad`` is ``dL/dh`` (None without a loss or when it is not finite).
    """

    label: str
    """Row label of this layer call (the layer name, ``"name#i"`` for a module called several times)."""
    name: str
    """The monitored layer's name."""
    module: nn.Module
    kind: str
    config: MonitorConfig
    output: Tensor
    pre_activation: Tensor | None = None
    output_grad: Tensor | None = None
    parameter_grads: list[Tensor] | None = None
    block_ids: Tensor | None = None
    activation: Any = None
    """The elementwise function of an activation layer (the module itself, or the function a transformer
    layer calls), used for derivatives."""
    _sampled: Tensor | None = field(default=None, repr=False)
    _ranks: RankWorkspace | None = field(default=None, repr=False)

    @property
    def parameters(self) -> list[Tensor]:
        """The layer module's parameters (detached)."""
        return [p.detach() for p in self.module.parameters()]

    @property
    def sampled_output(self) -> Tensor:
        """At most ``config.rank_max_samples`` rows of ``output`` (a seeded random subset, kept in order)."""
        if self._sampled is None:
            self._sampled = row_subsample(self.output, self.config.rank_max_samples, self.config.seed)
        return self._sampled

    @property
    def ranks(self) -> RankWorkspace:
        """The Gram matrix and spectrum of ``sampled_output``, shared by the rank metrics of this layer call."""
        if self._ranks is None:
            self._ranks = RankWorkspace(self.sampled_output)
        return self._ranks


LayerSelector = tuple[str, ...] | Callable[[LayerInfo], bool]


@dataclass(frozen=True)
class MetricSpec:
    """One per-layer metric: its name, ``fn(ctx) -> float``, the layers it applies to and what it needs.

    ``layers`` is a tuple of layer kinds (see :data:`LAYER_KINDS`) or a predicate ``(LayerInfo) -> bool``.
    ``needs`` lists entries of :data:`NEEDS`; a metric needing a gradient is skipped when ``measure`` gets no
    loss, one needing ``"parameters"`` applies only to layers with parameters, one needing ``"partition"``
    only to partition layers. NaN/inf in a layer's output makes every metric NaN except those that need
    only ``"parameters"``.
    """

    name: str
    fn: Callable[[MetricContext], float]
    layers: LayerSelector = ("activation", "parametric", "other")
    needs: tuple[str, ...] = ("output",)
    description: str = ""

    def __post_init__(self) -> None:
        """Validate the name, the function, the layer kinds and the needs (ValueError naming the bad field)."""
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"MetricSpec.name must be an identifier such as 'mean_activation', got {self.name!r}")
        if self.name in MODEL_METRICS:
            raise ValueError(f"MetricSpec.name {self.name!r} is reserved for the whole-model rows")
        if not callable(self.fn):
            raise ValueError(f"MetricSpec.fn must be a callable fn(ctx) -> float, got {self.fn!r}")
        if not callable(self.layers):
            kinds = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
            kinds = tuple(_KIND_ALIASES.get(k, k) for k in kinds)
            bad = [k for k in kinds if k not in LAYER_KINDS]
            if bad or not kinds:
                raise ValueError(
                    f"MetricSpec.layers must be layer kinds from {LAYER_KINDS} (or a predicate), got {self.layers!r}"
                )
            object.__setattr__(self, "layers", kinds)
        needs = (self.needs,) if isinstance(self.needs, str) else tuple(self.needs)
        bad = [n for n in needs if n not in NEEDS]
        if bad:
            raise ValueError(f"MetricSpec.needs has unknown entries {bad}; valid: {', '.join(NEEDS)}")
        object.__setattr__(self, "needs", needs)

    @property
    def needs_loss(self) -> bool:
        """Whether the metric needs a probe loss (a gradient)."""
        return bool(LOSS_NEEDS & set(self.needs))

    @property
    def output_free(self) -> bool:
        """Whether the metric is still defined when the layer output is not finite (it reads only parameters)."""
        return set(self.needs) <= {"parameters"}

    def applies_to(self, info: LayerInfo) -> bool:
        """Whether this metric is computed on a layer (its kind/predicate, parameters and partition needs)."""
        if "parameters" in self.needs or "parameter_grads" in self.needs:
            if not any(True for _ in info.module.parameters()):
                return False
        if "partition" in self.needs and not info.in_partition:
            return False
        if callable(self.layers):
            return bool(self.layers(info))
        return info.kind in self.layers


def row_subsample(matrix: Tensor, max_rows: int, seed: int) -> Tensor:
    """At most ``max_rows`` rows of ``matrix``, chosen by a seeded random draw (kept in order)."""
    n_rows = matrix.shape[0]
    if n_rows <= max_rows:
        return matrix
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(n_rows, generator=generator)[:max_rows].sort().values
    return matrix.index_select(0, index.to(matrix.device))


# ---------------------------------------------------------------------------- built-in metric functions
def _dead(ctx: MetricContext) -> float:
    """Dead fraction of the activation output."""
    cfg = ctx.config
    return dead_fraction(ctx.output, threshold=cfg.dead_threshold, sample_fraction=cfg.dead_sample_fraction)


def _dormant(ctx: MetricContext) -> float:
    """ReDo dormant fraction of the activation output."""
    return dormant_fraction(ctx.output, tau=ctx.config.dormant_tau)


def _frozen(ctx: MetricContext) -> float:
    """Frozen fraction from the activation's derivative at the pre-activation."""
    if ctx.pre_activation is None or ctx.activation is None:
        return float("nan")
    cfg = ctx.config
    return frozen_fraction(ctx.pre_activation, ctx.activation, eps=cfg.frozen_eps,
                           sample_fraction=cfg.frozen_sample_fraction)


def _saturated(ctx: MetricContext) -> float:
    """Saturated fraction from ``h`` and ``dL/dh``."""
    if ctx.output_grad is None:
        return float("nan")
    cfg = ctx.config
    return saturated_fraction(ctx.output, ctx.output_grad, ratio_threshold=cfg.saturation_ratio,
                              sample_fraction=cfg.saturation_sample_fraction)


def _duplicate(ctx: MetricContext) -> float:
    """Duplicate-unit fraction of the (subsampled) output."""
    cfg = ctx.config
    return duplicate_fraction(ctx.sampled_output, threshold=cfg.duplicate_threshold,
                              centered=cfg.duplicate_centered, absolute=cfg.duplicate_absolute)


def _duplicate_heads(ctx: MetricContext) -> float:
    """Duplicate-heads fraction of the concatenated head outputs a layer reads (its input)."""
    heads = concat_heads_of(ctx.module)
    if ctx.pre_activation is None or heads is None:
        return float("nan")
    cfg = ctx.config
    concat = row_subsample(ctx.pre_activation, cfg.rank_max_samples, cfg.seed)
    return duplicate_heads_fraction(concat, heads, threshold=cfg.duplicate_threshold, centered=cfg.duplicate_centered,
                                    absolute=cfg.duplicate_absolute)


def _reads_heads(info: LayerInfo) -> bool:
    """Layers whose input is a concatenation of attention-head outputs (an integer ``concat_heads`` attribute)."""
    return concat_heads_of(info.module) is not None


def _rank(metric: str) -> Callable[[MetricContext], float]:
    """A rank metric read from the layer call's shared :class:`RankWorkspace`."""

    def compute(ctx: MetricContext) -> float:
        return ctx.ranks.value(metric)

    compute.__name__ = metric
    return compute


def _weight_norm(ctx: MetricContext) -> float:
    """Norm of all parameters of the layer."""
    return float(parameter_norm(ctx.parameters))


def _gradient_norm(ctx: MetricContext) -> float:
    """Norm of the probe-loss gradient w.r.t. the layer's trainable parameters."""
    return float(gradient_norm(ctx.parameter_grads or []))


def _check_partition_length(ctx: MetricContext, units: int) -> None:
    """Raise ValueError when the partition does not give exactly one block id per unit of the layer."""
    assert ctx.block_ids is not None
    if ctx.block_ids.numel() != units:
        raise ValueError(
            f"partition[{ctx.name!r}] has {ctx.block_ids.numel()} block ids but layer {ctx.label!r} has "
            f"{units} units; pass one block id per output unit (channel for conv layers)"
        )


def _cloning_forward(ctx: MetricContext) -> float:
    """Cloning R^2 of the layer output over the partition's blocks."""
    _check_partition_length(ctx, ctx.output.shape[1])
    ids = ctx.block_ids.to(ctx.output.device)
    return cloning_r2(ctx.output, ids, legacy_std_ratio=ctx.config.cloning_legacy_std_ratio)


def _cloning_backward(ctx: MetricContext) -> float:
    """Cloning R^2 of ``dL/dh`` over the partition's blocks."""
    _check_partition_length(ctx, ctx.output.shape[1])
    if ctx.output_grad is None:
        return float("nan")
    ids = ctx.block_ids.to(ctx.output_grad.device)
    return cloning_r2(ctx.output_grad, ids, legacy_std_ratio=ctx.config.cloning_legacy_std_ratio)


def _output_layers(info: LayerInfo) -> bool:
    """Output metrics: activations and other modules, weight layers unless switched off in the config."""
    return info.kind != "parametric" or info.config.weight_layer_output_metrics


def _not_activation(info: LayerInfo) -> bool:
    """Parameter metrics: every kind but elementwise activations (a PReLU's slope is not a weight layer)."""
    return info.kind != "activation"


_ANY = ("activation", "parametric", "other")
_BUILTINS: tuple[MetricSpec, ...] = (
    MetricSpec("dead_fraction", _dead, ("activation",), description="units off on almost every probe sample"),
    MetricSpec("dormant_fraction", _dormant, ("activation",), description="ReDo tau-dormant units"),
    MetricSpec("frozen_fraction", _frozen, ("activation",), ("output", "pre_activation"),
               description="units whose activation derivative is ~0 on almost every sample"),
    MetricSpec("saturated_fraction", _saturated, ("activation",), ("output", "output_grad"),
               description="units whose gradient is tiny relative to their activity"),
    MetricSpec("duplicate_fraction", _duplicate, _output_layers, description="units duplicating an earlier one"),
    MetricSpec("duplicate_heads_fraction", _duplicate_heads, _reads_heads, ("output", "pre_activation"),
               description="attention heads (as units) whose output duplicates another head's"),
    *(MetricSpec(name, _rank(name), _output_layers, description=f"{name} of the layer's representation")
      for name in ("effective_rank", "stable_rank", "correlation_rank", "numerical_rank")),
    MetricSpec("weight_norm", _weight_norm, _not_activation, ("parameters",), description="norm of the parameters"),
    MetricSpec("gradient_norm", _gradient_norm, _not_activation, ("parameters", "parameter_grads"),
               description="norm of the probe-loss gradient w.r.t. the parameters"),
    MetricSpec("cloning_r2_forward", _cloning_forward, _ANY, ("output", "partition"),
               description="cloning R^2 of the output over the partition"),
    MetricSpec("cloning_r2_backward", _cloning_backward, _ANY, ("output", "output_grad", "partition"),
               description="cloning R^2 of dL/dh over the partition"),
)

#: Built-in per-layer metric names, in the order rows are written for one layer.
BUILTIN_NAMES: tuple[str, ...] = tuple(spec.name for spec in _BUILTINS)

_REGISTRY: dict[str, MetricSpec] = {spec.name: spec for spec in _BUILTINS}


def register_metric(spec: MetricSpec, *, replace: bool = False) -> MetricSpec:
    """Add a per-layer metric to every Monitor built afterwards (ValueError if the name is taken).

    ``replace=True`` swaps a user metric of the same name; built-ins cannot be replaced.
    """
    if not isinstance(spec, MetricSpec):
        raise ValueError(f"register_metric needs a MetricSpec, got {type(spec).__name__}")
    if spec.name in BUILTIN_NAMES:
        raise ValueError(f"metric {spec.name!r} is a built-in and cannot be replaced; pick another name")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"metric {spec.name!r} is already registered; pass replace=True to swap it")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_metric(name: str) -> None:
    """Remove a user metric from the registry (ValueError for built-ins and unknown names)."""
    if name in BUILTIN_NAMES:
        raise ValueError(f"metric {name!r} is a built-in and cannot be removed")
    if name not in _REGISTRY:
        raise ValueError(f"metric {name!r} is not registered; registered: {', '.join(_REGISTRY)}")
    del _REGISTRY[name]


def get_metric(name: str) -> MetricSpec:
    """The registered spec of a metric name (ValueError listing the names otherwise)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown metric {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def available_metrics() -> tuple[str, ...]:
    """Registered per-layer metric names (built-ins first, then user metrics in registration order)."""
    return tuple(_REGISTRY)


def resolve_specs(extra: Iterable[MetricSpec] = ()) -> dict[str, MetricSpec]:
    """The registry plus a Monitor's own ``extra_metrics`` (name clashes raise ValueError)."""
    specs = dict(_REGISTRY)
    for spec in extra:
        if not isinstance(spec, MetricSpec):
            raise ValueError(f"extra_metrics entries must be MetricSpec, got {type(spec).__name__}")
        if spec.name in specs:
            raise ValueError(f"extra metric {spec.name!r} clashes with a registered metric; rename it")
        specs[spec.name] = spec
    return specs
