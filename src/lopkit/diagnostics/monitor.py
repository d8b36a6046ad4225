"""Monitor: measure loss-of-plasticity diagnostics of a live model on a fixed probe batch.

The Monitor attaches forward hooks only while :meth:`Monitor.measure` runs, so the training steps in
between pay nothing. Each measurement runs the model in eval mode on the probe, never touches
``param.grad`` (it uses :func:`torch.autograd.grad`) and never updates BatchNorm running statistics.
Results are tidy rows ``{"step", "layer", "metric", "value"}`` that :mod:`pandas` reads directly.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lopkit.diagnostics.curvature import top_hessian_eigenvalue
from lopkit.diagnostics.errors import ConstantUnitWarning, LopkitWarning
from lopkit.diagnostics.metric_registry import (
    BUILTIN_NAMES,
    MODEL_METRICS,
    LayerInfo,
    MetricContext,
    MetricSpec,
    resolve_specs,
)
from lopkit.diagnostics.rank import RANK_METRIC_NAMES
from lopkit.diagnostics.units import all_finite, as_unit_matrix
from lopkit.layer_types import ACTIVATION_MODULE_PATHS, ACTIVATION_TYPES, WEIGHT_LAYERS
from lopkit.layer_types import is_activation as is_activation_module
from lopkit.layer_types import is_hf_conv1d, is_weight_layer, unit_activation, unit_pre_activation, unwrap_model

__all__ = [
    "ACTIVATION_MODULE_PATHS",
    "ACTIVATION_TYPES",
    "METRIC_NAMES",
    "MODEL_LAYER",
    "PARAMETRIC_TYPES",
    "WARNING_POLICIES",
    "Monitor",
    "MonitorConfig",
    "is_activation_module",
    "token_wise_layers",
]

#: Weight layers monitored by default (metrics on their outputs and on their parameters).
PARAMETRIC_TYPES = WEIGHT_LAYERS

#: Layer name used for whole-model rows (probe loss, top Hessian eigenvalue).
MODEL_LAYER = "model"

#: Every built-in metric name the Monitor can produce, in the order rows are written for one layer (user
#: metrics from :func:`~lopkit.diagnostics.metric_registry.register_metric` come after the per-layer ones).
METRIC_NAMES: tuple[str, ...] = (*BUILTIN_NAMES, *MODEL_METRICS)

#: What :attr:`MonitorConfig.warnings` may be: each distinct warning once per (layer, metric) and Monitor, every
#: time, never, or raised as an exception.
WARNING_POLICIES: tuple[str, ...] = ("once", "always", "ignore", "error")

_ROW_COLUMNS = ("step", "layer", "metric", "value")

#: Version of the layout of :meth:`Monitor.state_dict`.
STATE_VERSION = 1


def _check_positive_int(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is a positive int (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"MonitorConfig.{name} must be a positive integer, got {value!r}")


def _check_fraction(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is a real number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"MonitorConfig.{name} must be a number in [0, 1], got {value!r}")


def _check_non_negative(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is a finite real number >= 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(float(value))
        or float(value) < 0.0
    ):
        raise ValueError(f"MonitorConfig.{name} must be a finite number >= 0, got {value!r}")


@dataclass
class MonitorConfig:
    """Probe interval and metric thresholds of a :class:`Monitor` (defaults follow the paper, App. B.1.2)."""

    every: int = 100
    """Probe interval in steps for :meth:`Monitor.maybe_measure`."""
    dead_threshold: float = 1e-7
    """A sample counts as "off" for a unit when ``|h| < dead_threshold``."""
    dead_sample_fraction: float = 0.95
    """A unit is dead when it is off on more than this fraction of probe samples."""
    saturation_ratio: float = 1e-4
    """A sample counts as saturated when ``|dL/dh| / max(mean|h|, eps) < saturation_ratio``."""
    saturation_sample_fraction: float = 0.99
    """A unit is saturated when it is saturated on more than this fraction of probe samples."""
    frozen_eps: float = 0.01
    """A sample counts as frozen for a unit when ``|f'(z)| < frozen_eps``."""
    frozen_sample_fraction: float = 0.99
    """A unit is frozen when it is frozen on more than this fraction of probe samples."""
    dormant_tau: float = 0.0
    """ReDo threshold: a unit is dormant when its normalised score ``s_i <= dormant_tau``."""
    duplicate_threshold: float = 0.95
    """Cosine similarity above which two units count as duplicates (0.98 for bit-flipping)."""
    duplicate_centered: bool = False
    """Use Pearson (mean-centred) similarity for duplicates instead of raw cosine."""
    duplicate_absolute: bool = False
    """Count anti-correlated units as duplicates too (``|similarity| > threshold``)."""
    rank_max_samples: int = 1024
    """At most this many rows (samples, or sample x position for conv) feed the rank and duplicate metrics."""
    weight_layer_output_metrics: bool = True
    """Compute the duplicate and rank metrics on Linear/Conv outputs too (False cuts the cost of a measurement
    on an MLP by about 40 %; their norms and the activation modules' metrics are kept)."""
    cloning_legacy_std_ratio: bool = False
    """Use the authors' code's std-ratio cloning R^2 instead of the paper's variance ratio."""
    channels_last: bool = False
    """Treat the last axis of >2-D activation outputs as units (sequences ``(N, T, D)``)."""
    token_units: bool = True
    """With ``channels_last=False``: read a token-wise layer's ``(N, T, D)`` output as ``N*T`` samples of ``D``
    units anyway (see :func:`token_wise_layers`: activations fed by a Linear, LayerNorms, blocks ending in a
    Linear, and the modules a :class:`~lopkit.theory.partition.Partition` lists in its ``channels_last``), so a
    transformer gets feature units without configuration. False: axis 1 is the unit axis of every such layer."""
    hessian: bool = False
    """Opt in to the top Hessian eigenvalue of the probe loss (power iteration, costly)."""
    hessian_iterations: int = 20
    """Power-iteration steps for the top Hessian eigenvalue."""
    hessian_tol: float = 1e-3
    """Relative tolerance that stops the power iteration early."""
    seed: int = 0
    """Seed for the row subsample of the rank metrics and for the Hessian power iteration."""
    warnings: str = "once"
    """What to do with the Monitor's warnings (NaN metrics, uncalled layers, ...): ``"once"`` per layer and
    metric for the Monitor's life, ``"always"``, ``"ignore"``, or ``"error"`` (raise it as an exception)."""
    warn_constant_units: bool = True
    """Warn when the correlation rank drops constant units (False: dead units are an expected LoP state in a
    long run, and ``dead_fraction`` already counts them)."""
    slow_every: int = 5
    """Periodic schedule of the costly metrics: :meth:`Monitor.maybe_measure` computes the ``slow_metrics`` on
    the first measurement of the Monitor and on every ``slow_every``-th one after it (measurements counted from
    0, direct :meth:`Monitor.measure` calls included; 1: on every measurement). :meth:`Monitor.measure` always
    computes every chosen metric."""
    slow_metrics: tuple[str, ...] = ("duplicate_fraction", *RANK_METRIC_NAMES)
    """Metrics on the ``slow_every`` schedule. Default: the duplicate fraction (a float32 units x units product
    per layer) and the four rank metrics (one float64 Gram matrix and eigendecomposition per layer, shared),
    together about three quarters of a measurement on an MLP."""

    def __post_init__(self) -> None:
        """Validate every field and raise ValueError naming the bad one."""
        _check_positive_int("every", self.every)
        _check_positive_int("rank_max_samples", self.rank_max_samples)
        _check_positive_int("hessian_iterations", self.hessian_iterations)
        for name in (
            "dead_sample_fraction",
            "saturation_sample_fraction",
            "frozen_sample_fraction",
        ):
            _check_fraction(name, getattr(self, name))
        for name in ("dead_threshold", "saturation_ratio", "frozen_eps", "dormant_tau", "hessian_tol"):
            _check_non_negative(name, getattr(self, name))
        if (
            isinstance(self.duplicate_threshold, bool)
            or not isinstance(self.duplicate_threshold, (int, float))
            or not -1.0 <= float(self.duplicate_threshold) < 1.0
        ):
            raise ValueError(
                f"MonitorConfig.duplicate_threshold must be a similarity in [-1, 1), got {self.duplicate_threshold!r}"
            )
        for name in (
            "duplicate_centered",
            "duplicate_absolute",
            "weight_layer_output_metrics",
            "cloning_legacy_std_ratio",
            "channels_last",
            "token_units",
            "hessian",
            "warn_constant_units",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MonitorConfig.{name} must be True or False, got {getattr(self, name)!r}")
        _check_positive_int("slow_every", self.slow_every)
        if isinstance(self.slow_metrics, str) or not all(isinstance(m, str) for m in self.slow_metrics):
            raise ValueError(f"MonitorConfig.slow_metrics must be a tuple of metric names, got {self.slow_metrics!r}")
        self.slow_metrics = tuple(self.slow_metrics)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"MonitorConfig.seed must be an integer, got {self.seed!r}")
        if self.warnings not in WARNING_POLICIES:
            raise ValueError(f"MonitorConfig.warnings must be one of {WARNING_POLICIES}, got {self.warnings!r}")


@dataclass
class _Layer:
    """One monitored layer: its name, the module, its kind, the metrics computed on it and where it is read."""

    name: str
    module: nn.Module
    kind: str  # "activation", "parametric" or "other"
    metrics: tuple[str, ...]
    block_ids: Tensor | None = None
    hook_module: nn.Module | None = None
    """Module whose hook captures the layer (None: ``module`` itself, its output)."""
    hook_input: bool = False
    """Capture the input of ``hook_module`` instead of an output (activation applied as a function)."""
    pre_module: nn.Module | None = None
    """Module whose output is the pre-activation ``z`` (None: the input of ``module``)."""
    source: str = ""
    """What tensor is measured, in words (for :meth:`Monitor.describe`)."""
    units_last: bool = False
    """Token-wise layer: the last axis of its output holds the units (see :func:`token_wise_layers`)."""

    @property
    def target(self) -> nn.Module:
        """The module the capture hook is attached to."""
        return self.module if self.hook_module is None else self.hook_module


class FunctionalActivation(nn.Module):
    """Stand-in module for an activation a layer applies as a function (e.g. ``F.relu`` in a transformer layer).

    Never inserted into the model: the Monitor uses it as the measured layer's module (no parameters) and as the
    elementwise function whose derivative the frozen fraction needs.
    """

    def __init__(self, function: Callable[[Tensor], Tensor]) -> None:
        """Wrap ``function``."""
        super().__init__()
        self.function = function

    def forward(self, x: Tensor) -> Tensor:
        """Apply the wrapped function."""
        return self.function(x)

    def extra_repr(self) -> str:
        """The wrapped function's name."""
        return getattr(self.function, "__name__", repr(self.function))


@dataclass
class _Capture:
    """What the hooks saw during one call of a monitored module in the probe forward pass."""

    output: Tensor
    pre_activation: Tensor | None = None


@dataclass
class _ProbeResult:
    """Everything the probe pass produced: captures per layer, the loss, and requested gradients."""

    captures: dict[str, list[_Capture]] = field(default_factory=dict)
    loss: float | None = None
    output_grads: dict[tuple[str, int], Tensor | None] = field(default_factory=dict)
    parameter_grads: dict[str, list[Tensor]] = field(default_factory=dict)
    non_tensor: set[str] = field(default_factory=set)
    hessian_top: float | None = None


#: Words in a class name that mark a parameter-free leaf module as an elementwise activation (custom classes such
#: as ``MyGELU``, ``Swish`` or ``QuickGELUActivation``); gated units (``SwiGLU``, ``GEGLU``) are not elementwise.
_ACTIVATION_NAME = re.compile(r"relu|gelu|silu|swish|mish|tanh|sigmoid|softplus|activation", re.IGNORECASE)
_GATED_NAME = re.compile(r"glu", re.IGNORECASE)


def looks_like_activation(module: nn.Module) -> bool:
    """Whether a module of a custom class is an elementwise activation by its class name (a leaf, not gated)."""
    name = type(module).__name__
    if next(module.children(), None) is not None or isinstance(module, PARAMETRIC_TYPES):
        return False
    if type(module).__module__.startswith("lopkit."):  # lopkit's own activations declare it (is_activation_module)
        return False
    return bool(_ACTIVATION_NAME.search(name)) and not _GATED_NAME.search(name)


def _layer_kind(module: nn.Module, extra_activation_types: tuple[type[nn.Module], ...]) -> str:
    """Classify a module as an elementwise activation, a weight layer, or anything else."""
    if is_activation_module(module, extra_activation_types) or isinstance(module, FunctionalActivation):
        return "activation"
    if is_weight_layer(module):  # torch's Linear/Conv and Hugging Face's Conv1D (GPT-2)
        return "parametric"
    if looks_like_activation(module):
        return "activation"
    return "other"


def _functional_activation(module: nn.Module) -> tuple[Callable, nn.Linear, nn.Linear] | None:
    """``(function, linear_before, linear_after)`` of a layer applying its activation as a function, else None.

    Recognises the layout of torch's ``nn.TransformerEncoderLayer``/``DecoderLayer`` (``linear2(dropout(
    activation(linear1(x))))`` with ``activation`` a plain function such as ``F.relu``) and any module that
    follows it. An ``activation`` that is a module is found as a module of its own.
    """
    function = getattr(module, "activation", None)
    before, after = getattr(module, "linear1", None), getattr(module, "linear2", None)
    if callable(function) and not isinstance(function, nn.Module):
        if isinstance(before, nn.Linear) and isinstance(after, nn.Linear):
            return function, before, after
    return None


def _never_called_weights(model: nn.Module) -> dict[str, str]:
    """Weight layers that are only read as tensors, never called (``nn.MultiheadAttention.out_proj``) -> why."""
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and isinstance(getattr(module, "out_proj", None), nn.Linear):
            skipped[f"{name}.out_proj" if name else "out_proj"] = (
                "nn.MultiheadAttention passes its weights to F.multi_head_attention_forward; it is never called"
            )
    return skipped


_TOKEN_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))
_CHANNEL_NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


def token_wise_layers(model: nn.Module) -> set[str]:
    """Names of the modules whose outputs have their units on the last axis (token-wise layers, ``(N, T, D)``).

    A module is token-wise when it is a LayerNorm/RMSNorm, or, unless it is a BatchNorm/GroupNorm/InstanceNorm,
    when the last weight layer (Linear/Conv) that runs before its output, in ``named_modules`` order and counting
    the ones inside it, is an ``nn.Linear`` (an activation after ``fc1``, a transformer block ending in ``fc2``).
    A Linear acts on the last axis, so what follows it keeps its units there; a Conv puts them on axis 1.
    A module with a bool attribute ``token_wise`` decides for itself (lopkit's ViT patch embedding sets it).
    """
    named = list(model.named_modules())
    result: set[str] = set()
    last_weight: nn.Module | None = None
    ends: dict[str, int] = {}
    for index, (name, _) in enumerate(named):  # index of the last descendant of every module
        ends[name] = index
        prefix = name
        while prefix:
            prefix = prefix.rpartition(".")[0]
            ends[prefix] = index
    weight_before: list[nn.Module | None] = []
    for _, module in named:
        if is_weight_layer(module):
            last_weight = module
        weight_before.append(last_weight)
    for name, module in named:
        declared = getattr(module, "token_wise", None)
        if isinstance(declared, bool):  # a module may say it: ``token_wise = True`` (e.g. a patch embedding)
            if declared:
                result.add(name or MODEL_LAYER)
            continue
        if is_weight_layer(module) or isinstance(module, _CHANNEL_NORMS):
            continue
        before = weight_before[ends[name]]
        if isinstance(module, _TOKEN_NORMS) or isinstance(before, nn.Linear) or (before is not None
                                                                                and is_hf_conv1d(before)):
            result.add(name or MODEL_LAYER)
    return result


def _has_inplace_module(model: nn.Module) -> bool:
    """True when any submodule works in place (its output may overwrite a captured tensor)."""
    return any(getattr(m, "inplace", False) is True for m in model.modules())


def _tensor_or_none(output: Any) -> Tensor | None:
    """The module output if it is a tensor, else None (tuples and dicts are not monitored)."""
    return output if isinstance(output, Tensor) else None


def expected_probe_shape(model: nn.Module) -> tuple[str, int] | None:
    """``(description, ndim)`` of a batch for a model whose input goes straight into a Linear/Conv layer.

    Follows the first element of nested ``nn.Sequential`` containers; None for any other entry module (its
    ``forward`` may reshape the input, e.g. add a channel axis).
    """
    module = model
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[0]
    if isinstance(module, nn.Linear):
        return f"(N, {module.in_features})", 2
    if isinstance(module, nn.modules.conv._ConvNd):
        spatial = {1: "L", 2: "H, W", 3: "D, H, W"}.get(len(module.kernel_size), "...")
        return f"(N, {module.in_channels}, {spatial})", 2 + len(module.kernel_size)
    return None


def check_batched_probe(model: nn.Module, probe_inputs: Any) -> None:
    """ValueError naming the expected shape when a tensor probe lacks its batch axis (e.g. a 1-D sample for an MLP)."""
    if not isinstance(probe_inputs, Tensor):
        return
    expected = expected_probe_shape(model)
    if expected is None or probe_inputs.ndim >= expected[1]:
        return
    description, ndim = expected
    raise ValueError(
        f"the probe has shape {tuple(probe_inputs.shape)} but this model expects a batch of shape {description} "
        f"(N samples first, {ndim} axes); add the batch axis, e.g. probe.unsqueeze(0) for one sample (the rank "
        "and duplicate metrics need N >= 2)"
    )


def _run_model(model: nn.Module, probe_inputs: Any) -> Any:
    """Call the model on a tensor, a tuple/list of positional inputs or a dict of keyword inputs."""
    if isinstance(probe_inputs, Mapping):
        return model(**probe_inputs)
    if isinstance(probe_inputs, (tuple, list)):
        return model(*probe_inputs)
    return model(probe_inputs)


def _warn(message: str, category: type[LopkitWarning] = LopkitWarning) -> None:
    """Emit a LopkitWarning attributed to the first caller outside this module (the user's code)."""
    frame = sys._getframe(1)
    level = 2  # stacklevel 1 is this function, 2 its caller
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def _format_value(value: float) -> str:
    """Compact fixed-width rendering of one metric value for text tables."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


class Monitor:
    """Measure LoP diagnostics (dead/frozen/duplicate units, ranks, norms, cloning R^2) on a probe batch.

    Which metrics go where:

    - Activation modules (ReLU, GELU, Tanh, ... see :data:`ACTIVATION_TYPES`, and Hugging Face's
      ``GELUActivation`` & co., see :data:`ACTIVATION_MODULE_PATHS`): with ``h`` the module output
      and ``z`` its input (the pre-activation): ``dead_fraction``, ``dormant_fraction``, ``frozen_fraction``
      (derivative of the module itself at ``z``), ``duplicate_fraction``, the four rank metrics, and
      ``saturated_fraction`` (needs ``dL/dh``, so only when a probe loss is given). An activation that declares
      its unit map (:func:`lopkit.layer_types.splits_units`: lopkit's CReLU, ``2H`` output features from ``H``
      inputs) is measured with every output feature as a unit and ``z`` its per-unit pre-activation
      (CReLU: ``concat(z, -z)``, each unit a ReLU of it).
    - Linear and Conv1d/2d/3d modules: ``duplicate_fraction`` and the rank metrics on their outputs,
      ``weight_norm`` of their parameters and ``gradient_norm`` of the probe-loss gradient w.r.t. them.
    - Any other module named in ``layers`` (e.g. a residual block): the output metrics, plus the norms when it
      has parameters.
    - Layers in ``partition``: ``cloning_r2_forward`` on ``h`` and ``cloning_r2_backward`` on ``dL/dh``. With
      ``layers=None`` a partition layer outside the default selection (e.g. a custom block) is monitored too;
      with an explicit ``layers`` list every partition layer must be in it.
    - Layer ``"model"``: ``loss`` (probe loss) and, when ``config.hessian``, ``hessian_top_eigenvalue``.

    Conv outputs ``(N, C, *spatial)`` treat channels as units and every (sample, position) as a sample;
    token-wise layers (an activation fed by a Linear, a LayerNorm, a block ending in a Linear: see
    :func:`token_wise_layers`) read ``(N, T, D)`` outputs as ``N*T`` samples of ``D`` units by default
    (``config.token_units``), so a ViT or Hugging Face transformer needs no configuration; set
    ``config.channels_last=True`` to read every >2-D activation output that way (Linear outputs always use their
    last axis). Layers with an integer ``concat_heads`` attribute (an attention's output projection reading
    the concatenated heads) also get ``duplicate_heads_fraction`` (heads as units). Rank and duplicate metrics use at most
    ``config.rank_max_samples`` rows (a seeded random subset). A module called several times in one forward
    pass gives one layer per call, named ``"name#0"``, ``"name#1"``, ...

    A model wrapped in ``DistributedDataParallel``, ``DataParallel`` or ``torch.compile`` is measured through the
    module it wraps (:func:`lopkit.layer_types.unwrap_model`): layer names have no ``module.`` prefix, and the probe's
    backward never enters DDP, so measuring on rank 0 alone cannot hang the other ranks.

    Metrics that need a gradient are skipped when ``measure`` gets no ``probe_targets``/``loss_fn``. A layer
    whose output holds NaN/inf gets NaN for all its metrics (except ``weight_norm``) and one
    :class:`~lopkit.diagnostics.errors.LopkitWarning` naming it. Extra elementwise activation classes can be
    declared with ``activation_types``; a parameter-free leaf module of a custom class named like an activation
    (``MyGELU``, ``Swish``) counts as one too.

    Transformers: an activation a layer applies as a function (torch's ``nn.TransformerEncoderLayer`` calls
    ``F.relu``/``F.gelu`` inside ``forward``) is measured as a layer ``"<layer>.activation"``: its output is the
    input of the following Linear (``linear2``) and its pre-activation the output of ``linear1``. Weight layers
    that are never called as modules (``self_attn.out_proj``) are left out. :meth:`describe` lists every
    measured layer, its kind and the tensor it reads, and what was left out; the choice is also logged once
    (``logging`` at INFO, logger ``lopkit.monitor``). Padded tokens count as samples, except where torch's
    ``nn.TransformerEncoder`` fast path hands the layers nested tensors (padding mask, no gradients): then only
    the real tokens are measured.

    Metrics come from the registry (:mod:`lopkit.diagnostics.metric_registry`): built-ins and metrics added with
    :func:`~lopkit.diagnostics.metric_registry.register_metric`, plus this Monitor's ``extra_metrics``.

    Memory: every row is kept in :attr:`rows` by default; ``max_rows=N`` keeps only the latest ``N`` rows
    (``0``: none) and ``sink(rows)`` receives the rows of each measurement as they are made (to log or store
    them). :meth:`latest`, :meth:`summary` and :meth:`format_table` of the latest step work either way.
    Warnings follow ``config.warnings`` (see :data:`WARNING_POLICIES`).

    Cost: hooks exist only inside ``measure``; one measurement costs a probe forward/backward plus, per
    layer, one float32 unit-similarity product for duplicates and, for the four rank metrics, two float64 Gram
    products and one eigendecomposition (``probe x probe``) shared between them
    (:class:`~lopkit.diagnostics.rank.RankWorkspace`). Those products are about three quarters of a full
    measurement on an MLP, so :meth:`maybe_measure` computes the duplicate fraction and the four rank metrics
    (``config.slow_metrics``) only on every ``config.slow_every``-th (5th) measurement, the first included;
    the other metrics (dead, dormant, frozen, saturated fractions, norms, loss) come at every measurement, and
    :meth:`measure` always computes everything. On a 784-1000-1000-10 MLP with a 512 probe every 100 steps
    (batch 256) that brings the default Monitor from about 10 steps of training per measurement (+10 %) to
    about 4 on average (+4 %); ``benchmarks/monitor_overhead.py`` measures it (figures in
    ``benchmarks/README.md``). ``MonitorConfig(weight_layer_output_metrics=False)`` (no duplicate/rank
    metrics on Linear/Conv outputs) and ``rank_max_samples`` cut it further, ``metrics=`` / ``layers=`` too.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str | type[nn.Module]] | MonitorConfig | None = None,
        *,
        metrics: Iterable[str] | None = None,
        partition: Mapping[str, Tensor] | None = None,
        config: MonitorConfig | None = None,
        activation_types: Sequence[type[nn.Module]] = (),
        extra_metrics: Sequence[MetricSpec] = (),
        sink: Callable[[list[dict[str, Any]]], Any] | None = None,
        max_rows: int | None = None,
    ) -> None:
        """Pick the layers and metrics to monitor and validate the partition; attaches nothing yet."""
        if not isinstance(model, nn.Module):
            raise ValueError(f"Monitor needs a torch.nn.Module, got {type(model).__name__}")
        if isinstance(layers, MonitorConfig) and config is None:  # Monitor(model, MonitorConfig(...))
            layers, config = None, layers
        if config is None:
            config = MonitorConfig()
        if not isinstance(config, MonitorConfig):
            raise ValueError(f"config must be a MonitorConfig, got {type(config).__name__}")
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0):
            raise ValueError(f"max_rows must be None (keep every row) or an integer >= 0, got {max_rows!r}")
        if sink is not None and not callable(sink):
            raise ValueError(f"sink must be a callable taking a list of rows, got {type(sink).__name__}")
        self.model = unwrap_model(model)  # DDP / DataParallel / torch.compile: measure the user's own module
        self.config = config
        self.sink = sink
        self.max_rows = max_rows
        self._extra_activation_types = tuple(activation_types)
        self._specs: dict[str, MetricSpec] = resolve_specs(extra_metrics)
        self._explicit_metrics = metrics is not None
        self.metrics: frozenset[str] = self._validate_metrics(metrics)
        unknown_slow = [m for m in config.slow_metrics if m not in self._specs]
        if unknown_slow:
            raise ValueError(f"MonitorConfig.slow_metrics has unknown per-layer metric name(s) {unknown_slow}; "
                             f"valid names are: {', '.join(self._specs)}")
        self.skipped: dict[str, str] = {}
        self._functional_wanted: set[str] = set()
        modules = self._select_modules(layers)
        if layers is None and isinstance(partition, Mapping):
            modules = self._with_partition_layers(modules, partition)
        block_ids = self._validate_partition(partition, {name for name, _ in modules})
        self.layers: list[_Layer] = [self._make_layer(name, module, block_ids.get(name)) for name, module in modules]
        if layers is None or self._functional_wanted:
            self.layers = self._with_functional_activations(self.layers, None if layers is None else
                                                            self._functional_wanted)
        self._mark_token_wise(partition)
        self.rows: list[dict[str, Any]] = []
        self._last_rows: list[dict[str, Any]] = []
        self._last_step: int | None = None
        self._calls = 0
        self._warned_once: set[str] = set()
        found = [layer for layer in self.layers if layer.hook_input or (
            layer.kind == "activation" and looks_like_activation(layer.module)
            and not is_activation_module(layer.module, self._extra_activation_types))]
        if found or self.skipped:
            logging.getLogger("lopkit.monitor").info("Monitor chose:\n%s", self.describe())

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Every metric name this Monitor knows, in row order (per-layer ones, then the whole-model ones)."""
        return (*self._specs, *MODEL_METRICS)

    # ------------------------------------------------------------------ construction helpers
    def _validate_metrics(self, metrics: Iterable[str] | None) -> frozenset[str]:
        """The chosen metric names (all by default); unknown names raise ValueError listing valid ones."""
        valid = self.metric_names
        if metrics is None:
            return frozenset(valid)
        if isinstance(metrics, str):
            metrics = [metrics]
        chosen = list(metrics)
        unknown = [m for m in chosen if m not in valid]
        if unknown:
            raise ValueError(f"unknown metric name(s) {unknown}; valid names are: {', '.join(valid)}")
        if not chosen:
            raise ValueError(f"metrics is empty; pass None for all metrics or a subset of: {', '.join(valid)}")
        return frozenset(chosen)

    def _select_modules(self, layers: Sequence[str | type[nn.Module]] | None) -> list[tuple[str, nn.Module]]:
        """Resolve ``layers`` (None, names and/or module types) to (name, module) pairs in model order."""
        named = list(self.model.named_modules())
        if layers is None:
            self.skipped = _never_called_weights(self.model)
            selected = [(name, m) for name, m in named
                        if (is_weight_layer(m) or is_activation_module(m, self._extra_activation_types)
                            or looks_like_activation(m)) and (name or MODEL_LAYER) not in self.skipped]
            if not selected:
                raise ValueError(
                    f"{type(self.model).__name__} has no module to monitor by default (no elementwise activation "
                    "module such as nn.ReLU and no nn.Linear/nn.Conv layer). Pass layers=[...] with module names "
                    "from model.named_modules() or module types, e.g. Monitor(model, layers=['encoder.block1'])."
                )
            return [(name or MODEL_LAYER, m) for name, m in selected]
        if isinstance(layers, (str, type)):
            layers = [layers]
        by_name = dict(named)
        wanted_names: set[str] = set()
        wanted_types: list[type] = []
        for item in layers:
            if isinstance(item, str):
                if item not in by_name and item in self._functional_names():
                    self._functional_wanted.add(item)
                    continue
                if item not in by_name:
                    names = [n for n, _ in named if n] + sorted(self._functional_names())
                    available = ", ".join(repr(n) for n in names) or "(none)"
                    raise ValueError(
                        f"layer {item!r} is not a module of the model; available names from "
                        f"model.named_modules(): {available}"
                    )
                wanted_names.add(item)
            elif isinstance(item, type) and issubclass(item, nn.Module):
                wanted_types.append(item)
            else:
                raise ValueError(f"layers entries must be module names (str) or nn.Module subclasses, got {item!r}")
        selected = [
            (name, m)
            for name, m in named
            if name in wanted_names or (wanted_types and isinstance(m, tuple(wanted_types)))
        ]
        if not selected and not self._functional_wanted:
            raise ValueError(
                f"no module of {type(self.model).__name__} matches layers={list(layers)!r}; pass module names "
                "from model.named_modules() or module types that occur in the model."
            )
        return [(name or MODEL_LAYER, m) for name, m in selected]

    def _with_partition_layers(
        self, modules: list[tuple[str, nn.Module]], partition: Mapping[str, Tensor]
    ) -> list[tuple[str, nn.Module]]:
        """Default layer selection plus every module the partition names (in model order), so clones are measured."""
        chosen = {name for name, _ in modules}
        extra = {name for name in partition if isinstance(name, str) and name not in chosen}
        if not extra:
            return modules
        named = dict(self.model.named_modules())
        extra &= set(named)  # unknown names are reported by _validate_partition
        order = {name: i for i, name in enumerate(named)}
        merged = modules + [(name, named[name]) for name in extra]
        return sorted(merged, key=lambda item: order.get(item[0], -1))

    @staticmethod
    def _validate_partition(partition: Mapping[str, Tensor] | None, monitored: set[str]) -> dict[str, Tensor]:
        """Check that every partition layer is monitored and holds a 1-D integer block id per unit."""
        if partition is None:
            return {}
        if not isinstance(partition, Mapping):
            raise ValueError(f"partition must be a mapping of layer name -> block ids, got {type(partition).__name__}")
        checked: dict[str, Tensor] = {}
        for name, ids in partition.items():
            if name not in monitored:
                raise ValueError(
                    f"partition names layer {name!r}, which is not monitored; monitored layers: "
                    f"{', '.join(sorted(monitored))}. Add it to layers=[...] or fix the name."
                )
            ids_tensor = torch.as_tensor(ids)
            if ids_tensor.ndim != 1 or ids_tensor.dtype.is_floating_point or ids_tensor.dtype == torch.bool:
                raise ValueError(
                    f"partition[{name!r}] must be a 1-D integer tensor (one block id per unit), got shape "
                    f"{tuple(ids_tensor.shape)} and dtype {ids_tensor.dtype}"
                )
            checked[name] = ids_tensor.to(torch.long).cpu()
        return checked

    def _make_layer(self, name: str, module: nn.Module, block_ids: Tensor | None, **where: Any) -> _Layer:
        """Build the record of one monitored layer, keeping the chosen metrics that apply to it."""
        kind = _layer_kind(module, self._extra_activation_types)
        info = LayerInfo(name, module, kind, block_ids is not None, self.config)
        chosen = tuple(m for m, spec in self._specs.items() if m in self.metrics and spec.applies_to(info))
        if "source" not in where:
            how = "custom class, by its name" if kind == "activation" and looks_like_activation(module) and not (
                is_activation_module(module, self._extra_activation_types)) else type(module).__name__
            where["source"] = f"output of {name!r} ({how})"
        return _Layer(name, module, kind, chosen, block_ids, **where)

    def _mark_token_wise(self, partition: Mapping[str, Tensor] | None) -> None:
        """Set ``units_last`` on token-wise layers (``config.token_units``); a Partition's ``channels_last`` rules."""
        if not self.config.token_units:
            return
        token_wise = token_wise_layers(self.model)
        listed = getattr(partition, "channels_last", None)
        for layer in self.layers:
            if layer.kind == "parametric":
                continue
            if listed is not None and layer.name in partition:
                layer.units_last = layer.name in listed
            elif layer.hook_input:  # activation applied as a function: the input of the following weight layer
                layer.units_last = isinstance(layer.hook_module, nn.Linear)
            else:
                layer.units_last = layer.name in token_wise

    def _functional_names(self) -> set[str]:
        """Names of the layers :meth:`_with_functional_activations` can add (``"<layer>.activation"``)."""
        return {f"{name}.activation" if name else "activation" for name, module in self.model.named_modules()
                if _functional_activation(module) is not None}

    def _with_functional_activations(self, layers: list[_Layer], only: set[str] | None = None) -> list[_Layer]:
        """Add a layer for each activation applied as a function (see :func:`_functional_activation`), or for the
        ones named in ``only``."""
        result = list(layers)
        by_module = {id(module): name for name, module in self.model.named_modules()}
        found: list[tuple[int, _Layer]] = []
        order = {name: i for i, (name, _) in enumerate(self.model.named_modules())}
        for owner_name, owner in self.model.named_modules():
            hit = _functional_activation(owner)
            if hit is None:
                continue
            function, before, after = hit
            name = f"{owner_name}.activation" if owner_name else "activation"
            if only is not None and name not in only:
                continue
            source = (f"input of {by_module[id(after)]!r} = {getattr(function, '__name__', 'activation')}(output of "
                      f"{by_module[id(before)]!r}), a function called inside {type(owner).__name__}.forward")
            layer = self._make_layer(name, FunctionalActivation(function), None, hook_module=after, hook_input=True,
                                     pre_module=before, source=source)
            found.append((order[by_module[id(after)]], layer))
        for position, layer in found:  # just before the Linear whose input it is
            index = next((i for i, item in enumerate(result) if order.get(item.name, -1) >= position), len(result))
            result.insert(index, layer)
        return result

    # ------------------------------------------------------------------ measuring
    def maybe_measure(
        self,
        *args: Any,
        step: int | None = None,
        **kwargs: Any,
    ) -> list[dict[str, Any]] | None:
        """``maybe_measure(probe_inputs, probe_targets=None, loss_fn=None, *, step)``: :meth:`measure` when
        ``step % config.every == 0`` (returns the new rows), else nothing (returns None).

        Same argument order as :meth:`measure`. The earlier order ``maybe_measure(step, probe_inputs, ...)``
        still works (an int first argument without ``step=``) and gives a DeprecationWarning.
        """
        if step is None and args and isinstance(args[0], int) and not isinstance(args[0], bool):
            warnings.warn(
                "maybe_measure(step, probe_inputs, ...) is deprecated; call maybe_measure(probe_inputs, "
                "probe_targets, loss_fn, step=step), the argument order of measure()",
                DeprecationWarning,
                stacklevel=2,
            )
            step, args = args[0], args[1:]
        if step is None:
            raise ValueError("maybe_measure needs step=..., e.g. maybe_measure(probe_x, probe_y, loss_fn, step=step)")
        names = ("probe_inputs", "probe_targets", "loss_fn")
        if len(args) > len(names):
            raise ValueError(f"maybe_measure takes at most {len(names)} positional arguments, got {len(args)}")
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(f"maybe_measure got unexpected keyword argument(s) {unknown}; valid: {names}, step")
        bound = dict(zip(names, args))
        clash = sorted(set(bound) & set(kwargs))
        if clash:
            raise ValueError(f"maybe_measure got {clash} both by position and by keyword")
        bound.update(kwargs)
        if "probe_inputs" not in bound:
            raise ValueError("maybe_measure needs probe_inputs")
        if step % self.config.every != 0:
            return None
        skip = frozenset() if self._calls % self.config.slow_every == 0 else frozenset(self.config.slow_metrics)
        return self._measure(bound["probe_inputs"], bound.get("probe_targets"), bound.get("loss_fn"), step, skip)

    def measure(
        self,
        probe_inputs: Any,
        probe_targets: Any = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        step: int | None = None,
    ) -> list[dict[str, Any]]:
        """Run the probe through the model once and return (and store) one row per (layer, metric).

        ``loss_fn(model_output, probe_targets)`` must return a scalar. ``step`` defaults to the number of
        earlier ``measure`` calls on this Monitor. The rows also go to ``sink`` when one was given. Every chosen
        metric is computed (the ``config.slow_every`` schedule applies to :meth:`maybe_measure` only).
        """
        return self._measure(probe_inputs, probe_targets, loss_fn, step, frozenset())

    def _measure(
        self,
        probe_inputs: Any,
        probe_targets: Any,
        loss_fn: Callable[[Any, Any], Tensor] | None,
        step: int | None,
        skip: frozenset[str],
    ) -> list[dict[str, Any]]:
        """:meth:`measure` leaving out the metrics named in ``skip`` (the slow ones off their schedule)."""
        if (probe_targets is None) != (loss_fn is None):
            raise ValueError(
                "pass both probe_targets and loss_fn for gradient-based metrics (loss, saturated_fraction, "
                "gradient_norm, cloning_r2_backward), or neither"
            )
        check_batched_probe(self.model, probe_inputs)
        with_loss = loss_fn is not None
        if not with_loss:
            self._warn_skipped_loss_metrics()
        if step is None:
            step = self._calls
        self._calls += 1
        probe = self._probe(probe_inputs, probe_targets, loss_fn, with_loss)
        rows: list[dict[str, Any]] = []
        for layer in self.layers:
            calls = probe.captures.get(layer.name, [])
            if not calls and layer.name not in probe.non_tensor:
                self._warn_once(
                    f"not-called:{layer.name}",
                    f"layer {layer.name!r} was not called during the probe forward pass, so it has no metrics",
                )
                continue
            for index, capture in enumerate(calls):
                label = layer.name if len(calls) == 1 else f"{layer.name}#{index}"
                values = self._layer_values(layer, label, capture, probe, index, with_loss, skip)
                rows += [self._row(step, label, metric, value) for metric, value in values.items()]
        if probe.loss is not None and "loss" in self.metrics:
            rows.append(self._row(step, MODEL_LAYER, "loss", probe.loss))
        if probe.hessian_top is not None:
            rows.append(self._row(step, MODEL_LAYER, "hessian_top_eigenvalue", probe.hessian_top))
        self._keep(rows, int(step))
        return rows

    def _keep(self, rows: list[dict[str, Any]], step: int) -> None:
        """Store the rows of one measurement (within ``max_rows``) and hand them to the sink."""
        self._last_rows = rows
        self._last_step = step
        if self.max_rows is None:
            self.rows.extend(rows)
        elif self.max_rows > 0:
            self.rows.extend(rows)
            del self.rows[: max(0, len(self.rows) - self.max_rows)]
        if self.sink is not None:
            self.sink([dict(row) for row in rows])

    @staticmethod
    def _row(step: int, layer: str, metric: str, value: float) -> dict[str, Any]:
        """One tidy row with a float value."""
        return {"step": int(step), "layer": layer, "metric": metric, "value": float(value)}

    def _specs_of(self, layer: _Layer) -> list[MetricSpec]:
        """The registry entries of the layer's metrics."""
        return [self._specs[m] for m in layer.metrics]

    def _needs_output_grad(self, layer: _Layer) -> bool:
        """Whether the probe loss must be differentiated w.r.t. this layer's output."""
        return any("output_grad" in spec.needs for spec in self._specs_of(layer))

    def _needs_parameter_grads(self, layer: _Layer) -> bool:
        """Whether the probe loss must be differentiated w.r.t. this layer's parameters."""
        return any("parameter_grads" in spec.needs for spec in self._specs_of(layer))

    def _needs_pre_activation(self, layer: _Layer) -> bool:
        """Whether this layer needs its input ``z`` captured (derivative-based frozen fraction)."""
        return any("pre_activation" in spec.needs for spec in self._specs_of(layer))

    def _trainable_parameters(self, layer: _Layer) -> list[nn.Parameter]:
        """Parameters of the layer's module that receive gradients."""
        return [p for p in layer.module.parameters() if p.requires_grad]

    def _probe(self, probe_inputs: Any, probe_targets: Any, loss_fn: Callable | None, with_loss: bool) -> _ProbeResult:
        """Forward the probe in eval mode with temporary hooks; then take gradients and curvature if asked."""
        result = _ProbeResult()
        previous_modes = [(m, m.training) for m in self.model.modules()]
        try:
            self.model.eval()
            if with_loss:
                self._probe_with_loss(probe_inputs, probe_targets, loss_fn, result)
            else:
                with torch.no_grad():
                    self._forward_with_hooks(probe_inputs, result, track_grad=False)
        finally:
            for module, training in previous_modes:
                module.training = training
        return result

    def _forward_with_hooks(self, probe_inputs: Any, result: _ProbeResult, track_grad: bool) -> Any:
        """Run the model once with capture hooks attached, removing them before returning."""
        clone_outputs = _has_inplace_module(self.model)
        pending: dict[str, Tensor | None] = {}
        handles = []
        try:
            for layer in self.layers:
                result.captures[layer.name] = []
                if self._needs_pre_activation(layer):
                    if layer.pre_module is not None:
                        handles.append(layer.pre_module.register_forward_hook(self._pre_output_hook(layer, pending)))
                    else:
                        handles.append(layer.module.register_forward_pre_hook(
                            self._pre_activation_hook(layer, pending)))
                hook = self._capture_hook(layer, result, pending, track_grad, clone_outputs)
                if layer.hook_input:
                    handles.append(layer.target.register_forward_pre_hook(self._input_capture_hook(hook)))
                else:
                    handles.append(layer.target.register_forward_hook(hook))
            return _run_model(self.model, probe_inputs)
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _input_capture_hook(capture: Callable) -> Callable:
        """Pre-hook capturing a module's first input the way the capture hook captures an output."""

        def hook(module: nn.Module, args: tuple) -> Any:
            if not args:
                return None
            replacement = capture(module, args, args[0])
            return None if replacement is None else (replacement, *args[1:])

        return hook

    @staticmethod
    def _pre_output_hook(layer: _Layer, pending: dict[str, Tensor | None]) -> Callable:
        """Forward hook saving the output of the module before a functional activation (its ``z``)."""

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            pending[layer.name] = output.detach() if isinstance(output, Tensor) else None

        return hook

    def _pre_activation_hook(self, layer: _Layer, pending: dict[str, Tensor | None]) -> Callable:
        """Pre-hook saving a detached copy of the module input ``z`` (copied: in-place modules overwrite it)."""
        inplace = getattr(layer.module, "inplace", False) is True

        def hook(module: nn.Module, args: tuple) -> None:
            z = args[0] if args and isinstance(args[0], Tensor) else None
            if z is not None:
                z = z.detach().clone() if inplace else z.detach()
                z = unit_pre_activation(module, z)  # CReLU: concat(z, -z), one pre-activation per output unit
            pending[layer.name] = z

        return hook

    def _capture_hook(
        self,
        layer: _Layer,
        result: _ProbeResult,
        pending: dict[str, Tensor | None],
        track_grad: bool,
        clone_outputs: bool,
    ) -> Callable:
        """Forward hook saving the module output (with its graph when its gradient is needed)."""
        needs_grad = track_grad and self._needs_output_grad(layer)

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            tensor = _tensor_or_none(output)
            if tensor is None:
                result.non_tensor.add(layer.name)
                self._warn_once(
                    f"non-tensor:{layer.name}",
                    f"layer {layer.name!r} returns {type(output).__name__}, not a tensor; it is not monitored",
                )
                return None
            replacement = None
            if needs_grad and not tensor.requires_grad:
                # Nothing upstream needs gradients, so a fresh leaf loses no graph and lets us take dL/dh.
                tensor = tensor.detach().requires_grad_(True)
                replacement = tensor.clone() if clone_outputs else tensor
            elif clone_outputs:
                # A later in-place module would overwrite the captured tensor; hand it a copy instead.
                replacement = tensor.clone()
            saved = tensor if needs_grad else tensor.detach()
            result.captures[layer.name].append(_Capture(output=saved, pre_activation=pending.pop(layer.name, None)))
            return replacement

        return hook

    def _probe_with_loss(self, probe_inputs: Any, probe_targets: Any, loss_fn: Callable, result: _ProbeResult) -> None:
        """Forward with autograd on, take the requested gradients with ``autograd.grad`` (no ``.grad`` writes)."""
        with torch.enable_grad():
            outputs = self._forward_with_hooks(probe_inputs, result, track_grad=True)
            loss = loss_fn(outputs, probe_targets)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn(outputs, probe_targets) must return a scalar tensor (use a mean/sum reduction)")
        result.loss = float(loss.detach())
        grad_targets, slots = self._gradient_targets(result)
        if grad_targets and loss.requires_grad:
            grads = torch.autograd.grad(loss, grad_targets, allow_unused=True)
            self._distribute_gradients(grads, grad_targets, slots, result)
        if self.config.hessian and "hessian_top_eigenvalue" in self.metrics:
            result.hessian_top = self._hessian_top(probe_inputs, probe_targets, loss_fn)

    def _gradient_targets(self, result: _ProbeResult) -> tuple[list[Tensor], list[tuple[str, Any]]]:
        """Tensors to differentiate (captured outputs, then unique parameters) and where each result goes."""
        targets: list[Tensor] = []
        slots: list[tuple[str, Any]] = []
        for layer in self.layers:
            if not self._needs_output_grad(layer):
                continue
            for index, capture in enumerate(result.captures.get(layer.name, [])):
                if capture.output.requires_grad:
                    targets.append(capture.output)
                    slots.append(("output", (layer.name, index)))
        seen: dict[int, int] = {}
        for layer in self.layers:
            if not self._needs_parameter_grads(layer):
                continue
            for param in self._trainable_parameters(layer):
                if id(param) not in seen:
                    seen[id(param)] = len(targets)
                    targets.append(param)
                    slots.append(("parameter", id(param)))
        return targets, slots

    def _distribute_gradients(
        self, grads: Sequence[Tensor | None], targets: list[Tensor], slots: list[tuple[str, Any]], result: _ProbeResult
    ) -> None:
        """File the gradients by layer output and by layer parameters (unused parameters get zeros)."""
        by_param: dict[int, Tensor] = {}
        for grad, target, (kind, key) in zip(grads, targets, slots):
            if kind == "output":
                result.output_grads[key] = None if grad is None else grad.detach()
            else:
                by_param[key] = torch.zeros_like(target) if grad is None else grad.detach()
        for layer in self.layers:
            if self._needs_parameter_grads(layer):
                result.parameter_grads[layer.name] = [by_param[id(p)] for p in self._trainable_parameters(layer)]

    def _hessian_top(self, probe_inputs: Any, probe_targets: Any, loss_fn: Callable) -> float:
        """Top Hessian eigenvalue of the probe loss w.r.t. all trainable parameters (model still in eval mode)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            return float("nan")

        def probe_loss() -> Tensor:
            return loss_fn(_run_model(self.model, probe_inputs), probe_targets)

        with torch.enable_grad():
            return float(
                top_hessian_eigenvalue(
                    probe_loss,
                    params,
                    iterations=self.config.hessian_iterations,
                    tol=self.config.hessian_tol,
                    seed=self.config.seed,
                )
            )

    # ------------------------------------------------------------------ per-layer metrics
    def _unit_matrix(self, layer: _Layer, tensor: Tensor) -> Tensor:
        """The ``(samples, units)`` view of a layer output (Linear: last axis; conv: channels)."""
        if tensor.is_nested:  # nn.TransformerEncoder with a padding mask: real tokens only, features as units
            tensor = torch.cat([part.reshape(-1, part.shape[-1]) for part in tensor.unbind()])
        if tensor.ndim < 2:
            raise ValueError(
                f"layer {layer.name!r} produced an output of shape {tuple(tensor.shape)}, with no batch axis: the "
                "probe must be a batch with the samples on the first axis (e.g. (N, features) for an MLP); add "
                "the batch axis, e.g. probe.unsqueeze(0) for one sample"
            )
        if layer.kind == "parametric" and isinstance(layer.module, nn.Linear):
            return tensor.reshape(-1, tensor.shape[-1]) if tensor.ndim > 2 else tensor
        if layer.kind == "parametric":
            return as_unit_matrix(tensor)
        return as_unit_matrix(tensor, channels_last=self.config.channels_last or layer.units_last)

    def _layer_values(
        self, layer: _Layer, label: str, capture: _Capture, probe: _ProbeResult, index: int, with_loss: bool,
        skip: frozenset[str] = frozenset(),
    ) -> dict[str, float]:
        """Compute the chosen metrics of one layer call (but those in ``skip``); NaN everywhere if its output is not
        finite."""
        specs = [spec for spec in self._specs_of(layer) if (with_loss or not spec.needs_loss) and spec.name not in skip]
        if not self._trainable_parameters(layer):  # frozen module: no parameter gradient to report
            specs = [spec for spec in specs if "parameter_grads" not in spec.needs]
        values: dict[str, float] = {}
        output = capture.output.detach()
        h = self._unit_matrix(layer, output)
        ctx = MetricContext(label, layer.name, layer.module, layer.kind, self.config, h, block_ids=layer.block_ids,
                            activation=unit_activation(layer.module) if layer.kind == "activation" else None)
        if not all_finite(h):
            self._warn_once(
                f"non-finite:{label}",
                f"layer {label!r}: its output on the probe contains NaN or inf, so its metrics are NaN. "
                "Check the probe inputs and the model for divergence (lower the learning rate, clip gradients).",
            )
            for spec in specs:
                values[spec.name] = float(spec.fn(ctx)) if spec.output_free else float("nan")
            return values
        if any("pre_activation" in spec.needs for spec in specs) and capture.pre_activation is not None:
            ctx.pre_activation = self._unit_matrix(layer, capture.pre_activation)
        if with_loss and self._needs_output_grad(layer):
            raw_grad = probe.output_grads.get((layer.name, index))
            grad = None if raw_grad is None else self._unit_matrix(layer, raw_grad)
            if grad is None:
                grad = torch.zeros_like(h)  # the loss does not depend on this output
            elif not all_finite(grad):
                self._warn_once(
                    f"non-finite-grad:{label}",
                    f"layer {label!r}: the gradient of the probe loss w.r.t. its output contains NaN or inf, "
                    "so its gradient-based metrics are NaN.",
                )
                grad = None
            ctx.output_grad = grad
        if with_loss:
            ctx.parameter_grads = probe.parameter_grads.get(layer.name, [])
        for spec in specs:
            if "pre_activation" in spec.needs and ctx.pre_activation is None:
                values[spec.name] = float("nan")
            elif "output_grad" in spec.needs and ctx.output_grad is None:
                values[spec.name] = float("nan")
            else:
                values[spec.name] = self._with_layer_warnings(label, spec.name, lambda: spec.fn(ctx))
        return values

    def _with_layer_warnings(self, label: str, metric: str, compute: Callable[[], Any]) -> float:
        """Run a metric, re-emitting its LopkitWarnings prefixed with the layer and metric (per the policy)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = compute()
        for item in caught:
            if issubclass(item.category, ConstantUnitWarning) and not self.config.warn_constant_units:
                continue
            if issubclass(item.category, LopkitWarning):
                self._warn_once(f"metric:{label}:{metric}", f"layer {label!r}, {metric}: {item.message}",
                                item.category)
            else:
                warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
        return float(value)

    def _warn_once(self, key: str, message: str, category: type[LopkitWarning] = LopkitWarning) -> None:
        """Emit a LopkitWarning per ``config.warnings``: once per ``key`` for this Monitor, always, never, or raise."""
        policy = self.config.warnings
        if policy == "ignore":
            return
        if policy == "error":
            raise category(message)
        if policy == "always" or key not in self._warned_once:
            self._warned_once.add(key)
            _warn(message, category)

    def _warn_skipped_loss_metrics(self) -> None:
        """Warn once when the user asked for gradient metrics explicitly but measures without a loss."""
        loss_metrics = {name for name, spec in self._specs.items() if spec.needs_loss} | set(MODEL_METRICS)
        requested = sorted(self.metrics & loss_metrics) if self._explicit_metrics else []
        if requested:
            self._warn_once(
                "no-loss",
                f"metrics {requested} need a probe loss; pass probe_targets and loss_fn to measure() to get them",
            )

    # ------------------------------------------------------------------ results
    def to_dataframe(self) -> Any:
        """All rows so far as a pandas DataFrame with columns step, layer, metric, value."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=list(_ROW_COLUMNS))

    @property
    def latest_step(self) -> int | None:
        """Step of the most recent measurement, or None before the first one."""
        return self.rows[-1]["step"] if self.rows else self._last_step

    def _rows_at(self, step: int | None) -> list[dict[str, Any]]:
        """Rows of the given step (latest when None); ValueError if that step was never measured."""
        if step is None:
            step = self.latest_step
            if step is None:
                return []
        selected = [r for r in self.rows if r["step"] == step]
        if not selected and step == self._last_step:  # rows not kept (max_rows): the latest measurement still is
            selected = list(self._last_rows)
        if not selected:
            measured = sorted({r["step"] for r in self.rows})
            raise ValueError(f"no measurement at step {step}; measured steps: {measured}")
        return selected

    def summary(self, step: int | None = None) -> Any:
        """Layers x metrics DataFrame of one step (latest by default), layers and metrics in monitor order."""
        import pandas as pd

        rows = self._rows_at(step)
        if not rows:
            return pd.DataFrame()
        frame = pd.DataFrame(rows, columns=list(_ROW_COLUMNS))
        table = frame.pivot_table(index="layer", columns="metric", values="value", aggfunc="last", dropna=False)
        layer_order = list(dict.fromkeys(r["layer"] for r in rows))
        metric_order = [m for m in self.metric_names if m in table.columns]
        table = table.reindex(index=layer_order, columns=metric_order)
        table.columns.name = None
        return table

    def latest(self) -> dict[str, float]:
        """Values of the latest measurement as a flat ``{"layer/metric": value}`` dict (handy for loggers)."""
        return {f"{r['layer']}/{r['metric']}": r["value"] for r in self._rows_at(None)}

    def format_table(self, step: int | None = None) -> str:
        """Readable fixed-width text table (layers x metrics) of one step (latest by default); "-" = not measured."""
        table = self.summary(step)
        if table.empty:
            return "(no measurements yet)"
        shown_step = self.latest_step if step is None else step
        measured = {(r["layer"], r["metric"]) for r in self._rows_at(step)}
        header = ["layer", *table.columns]
        body = [
            [str(layer), *(_format_value(table.at[layer, m]) if (layer, m) in measured else "-" for m in table.columns)]
            for layer in table.index
        ]
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

        def fmt(line: list[str]) -> str:
            cells = [line[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(line[1:], widths[1:])]
            return "  ".join(cells).rstrip()

        rule = "-" * len(fmt(header))
        return "\n".join([f"step {shown_step}", fmt(header), rule, *(fmt(line) for line in body)])

    def reset(self) -> None:
        """Forget all rows and restart the internal step counter."""
        self.rows.clear()
        self._last_rows = []
        self._last_step = None
        self._calls = 0
        self._warned_once.clear()

    # ------------------------------------------------------------------ state and description
    def state_dict(self) -> dict[str, Any]:
        """The Monitor's run state (plain Python values, JSON-safe): kept rows, latest measurement, step counter,
        warnings already given and the subsample seed. The config, layers and metrics are not part of it."""
        return {
            "version": STATE_VERSION,
            "rows": [dict(row) for row in self.rows],
            "last_rows": [dict(row) for row in self._last_rows],
            "last_step": self._last_step,
            "calls": self._calls,
            "warned": sorted(self._warned_once),
            "seed": self.config.seed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (ValueError for another layout or another seed)."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            found = state.get("version") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"unknown Monitor state version {found!r}; expected {STATE_VERSION}")
        if state["seed"] != self.config.seed:
            raise ValueError(
                f"the saved Monitor used MonitorConfig(seed={state['seed']}) but this one has seed={self.config.seed}; "
                "build the Monitor with the saved seed so the rank subsample stays the same"
            )
        rows = [dict(row) for row in state["rows"]]
        if self.max_rows is not None:
            rows = rows[max(0, len(rows) - self.max_rows):]
        self.rows = rows
        self._last_rows = [dict(row) for row in state["last_rows"]]
        self._last_step = None if state["last_step"] is None else int(state["last_step"])
        self._calls = int(state["calls"])
        self._warned_once = set(state["warned"])

    def describe(self) -> str:
        """One line per measured layer: its name, kind, the tensor it reads and its metrics; then what was left out."""
        lines = []
        for layer in self.layers:
            metrics = ", ".join(layer.metrics) if layer.metrics else "(no chosen metric applies)"
            lines.append(f"{layer.name}: {layer.kind}; measures the {layer.source}; metrics: {metrics}")
        for name, why in self.skipped.items():
            lines.append(f"{name}: not measured ({why})")
        return "\n".join(lines)
