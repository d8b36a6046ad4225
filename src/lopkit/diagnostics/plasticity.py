"""Plasticity metrics of the 2022-2025 literature (issue 17): plasticity probe, churn, feature norm, distance from
initialisation, GraMa gradient dormancy and active fraction.

Pure functions over tensors (and, for the probe, a deep copy of the model), plus the Monitor metrics built on
them. All are opt-in, so a default Monitor's rows and cost do not change: the cheap stateless ones
(``feature_norm``, ``active_fraction``, ``grama_dormant_fraction``, which needs a probe loss) go into the
registry of :mod:`lopkit.diagnostics.metric_registry` with :func:`register_plasticity_metrics` (every Monitor
built afterwards computes them) or into one Monitor with ``extra_metrics=PLASTICITY_METRICS``; the stateful ones
(``churn``, ``distance_from_init``) are per-Monitor factories, :func:`churn_metric` and
:func:`distance_from_init_metric`; the plasticity probe fits a copy of the network, so it is an explicit call
(:func:`plasticity_probe`), never part of a routine measurement.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from lopkit.diagnostics.activations import dormant_fraction
from lopkit.diagnostics.metric_registry import MetricContext, MetricSpec, register_metric
from lopkit.diagnostics.units import activation_derivative, to_float_unit_matrix
from lopkit.seeding import seeded_generator, stable_key

__all__ = [
    "plasticity_probe",
    "upgd_plasticity",
    "one_step_plasticity",
    "churn",
    "feature_norm",
    "active_fraction",
    "grama_dormant_fraction",
    "pre_activation_grad",
    "parameter_snapshot",
    "distance_from_init",
    "churn_metric",
    "distance_from_init_metric",
    "PLASTICITY_METRICS",
    "PLASTICITY_MEASURES",
    "register_plasticity_metrics",
]

_PROBE_KEY = stable_key("plasticity_probe")


# ---------------------------------------------------------------------------------------------- model copies


def _strip_hooks(model: nn.Module) -> None:
    """Remove every forward/backward hook of a copied model (other tools' statistics must not see its forwards)."""
    for module in model.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            table = getattr(module, name, None)
            if table is not None:
                table.clear()


def _training_copy(model: nn.Module, train_all: bool = True) -> nn.Module:
    """A hook-free deep copy of ``model`` in eval mode (no dropout, frozen norm statistics).

    ``train_all``: every parameter of the copy trains; otherwise each keeps its ``requires_grad`` (frozen stays frozen).
    """
    clone = copy.deepcopy(model)
    _strip_hooks(clone)
    clone.eval()
    if train_all:
        for p in clone.parameters():
            p.requires_grad_(True)
    return clone


def _run(model: nn.Module, x: Any) -> Tensor:
    """``model(x)`` for a tensor, a tuple of positional inputs or a mapping of keyword inputs; must give a tensor."""
    if isinstance(x, dict):
        out = model(**x)
    elif isinstance(x, (tuple, list)):
        out = model(*x)
    else:
        out = model(x)
    if not isinstance(out, Tensor):
        raise ValueError(f"the plasticity probe needs a model that returns a tensor, got {type(out).__name__}")
    return out


def _last_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """(parent module, attribute name, layer) of the last ``nn.Linear`` in module order (ValueError if none)."""
    found = None
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found = (parent, child_name, child)
    if found is None:
        raise ValueError("the fresh-head probe needs a model with an nn.Linear head; use target='random'")
    return found


@torch.no_grad()
def _fresh_linear(layer: nn.Linear, generator: torch.Generator) -> nn.Linear:
    """A new Linear shaped like ``layer`` with PyTorch's default law U(+-1/sqrt(fan_in)) drawn from ``generator``."""
    w = layer.weight
    fresh = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=w.device,
                      dtype=w.dtype)
    bound = 1.0 / math.sqrt(layer.in_features)
    fresh.weight.copy_((torch.rand(tuple(w.shape), generator=generator, dtype=torch.float64) * 2 - 1) * bound)
    if fresh.bias is not None:
        fresh.bias.copy_((torch.rand((layer.out_features,), generator=generator, dtype=torch.float64) * 2 - 1) * bound)
    return fresh


# ---------------------------------------------------------------------------------------------- plasticity probe


def plasticity_probe(
    model: nn.Module,
    x: Any,
    steps: int = 100,
    seed: int = 0,
    *,
    target: Literal["random", "head", "residual"] = "random",
    lr: float = 1e-3,
    optimizer: Literal["adam", "sgd"] = "adam",
    y: Tensor | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    train_all: bool = False,
) -> dict[str, float]:
    """How far a deep copy of ``model`` lowers a fresh loss on ``x`` in ``steps`` full-batch steps (model untouched).

    ``target="random"``: the copy regresses a fresh target ``y ~ N(0, 1)`` (one value per output entry, drawn from
    ``seed`` through :mod:`lopkit.seeding`) with the mean squared error; ``target="head"``: the same, after its
    last ``nn.Linear`` is replaced by a freshly drawn one (PyTorch's default law, from the same seed; the new head
    always trains); ``target="residual"``: the target is the copy's own output plus ``N(0, 1)`` noise, so the loss
    before fitting is ~1 whatever the scale of the outputs (the question is how far the network can move its
    function, not how far it must first shrink it). A given ``y`` (and ``loss_fn``, default MSE) replaces the drawn
    target. The copy is in eval mode, without hooks; by default each parameter keeps its ``requires_grad`` (frozen
    parameters stay frozen; ``train_all=True`` trains every one); Adam (or SGD) at ``lr``. No Monitor metric calls
    this probe (it fits a copy); ``lopkit diagnose`` calls it with the defaults (``train_all=False``) through
    :func:`lopkit.diagnostics.diagnose.probe_fit`. Returns ``loss_before``, ``loss_after``, ``drop`` = before -
    after, ``gain`` = 1 - after / before (the fraction of the loss removed; NaN when before is 0), ``loss_auc`` (the
    mean of the ``steps + 1`` losses along the fit, before each step and after the last), ``loss_constant`` (the loss
    of predicting each output's batch-mean target, the target's variance for MSE; with ``target="residual"`` the loss
    of the start output shifted by the mean noise, ~ the noise variance; NaN for a non-float target), ``fit``
    = 1 - after / loss_constant (the fraction of the target's variance the fitted copy explains, R^2: 1 a perfect
    fit, 0 no better than a constant, negative worse; it does not depend on the scale of the outputs before fitting,
    so it is what ``diagnose`` compares with a fresh copy's) and ``steps``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if target not in ("random", "head", "residual"):
        raise ValueError(f"target must be 'random', 'head' or 'residual', got {target!r}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    if not isinstance(train_all, bool):
        raise ValueError(f"train_all must be True or False, got {train_all!r}")
    generator = seeded_generator(seed, _PROBE_KEY)
    clone = _training_copy(model, train_all)
    if target == "head":
        parent, attr, layer = _last_linear(clone)
        setattr(parent, attr, _fresh_linear(layer, generator))
    loss_fn = loss_fn or nn.functional.mse_loss
    with torch.no_grad():
        out = _run(clone, x)
    start = out.detach() if target == "residual" else None  # the residual target's fit is judged around the start
    if y is None:
        noise = torch.randn(tuple(out.shape), generator=generator, dtype=torch.float64).to(out.device, out.dtype)
        y = out.detach() + noise if target == "residual" else noise
    params = [p for p in clone.parameters() if p.requires_grad]
    opt = None
    if params:
        opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    with torch.no_grad():
        before = float(loss_fn(_run(clone, x), y))
    losses = [before]  # the loss before each step (the first is ``before``), then the loss after the last
    for step in range(steps):
        if opt is None:  # nothing trains: the loss stays where it is
            losses.append(before)
            continue
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(_run(clone, x), y)
        if step > 0:
            losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
    if opt is not None and steps > 0:
        with torch.no_grad():
            losses.append(float(loss_fn(_run(clone, x), y)))
    after = losses[-1]
    gain = 1.0 - after / before if before != 0 else float("nan")
    constant = _constant_loss(y, out, loss_fn, start)
    fit = 1.0 - after / constant if constant > 0 else float("nan")
    return {"loss_before": before, "loss_after": after, "drop": before - after, "gain": gain,
            "loss_constant": constant, "fit": fit, "loss_auc": sum(losses) / len(losses), "steps": float(steps)}


def _constant_loss(y: Tensor, out: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor], start: Tensor | None = None,
                   ) -> float:
    """The loss of the best constant guess: each output's batch-mean target (the variance of ``y`` for MSE), or with
    ``start`` the start output shifted by each output's mean residual ``y - start``; NaN without a float ``y``."""
    if not (y.is_floating_point() and y.shape == out.shape and y.dim() >= 1 and y.shape[0] >= 2):
        return float("nan")
    offset = torch.zeros_like(y) if start is None else start
    with torch.no_grad():
        return float(loss_fn(offset + (y - offset).mean(dim=0, keepdim=True), y))


def upgd_plasticity(loss_before: float | Tensor, loss_after: float | Tensor, eps: float = 1e-12) -> float:
    """UPGD's sample plasticity ``max(1 - L_after / max(L_before, eps), 0)`` (Elsayed & Mahmood 2024), in [0, 1]."""
    before, after = float(loss_before), float(loss_after)
    return max(1.0 - after / max(before, eps), 0.0)


def one_step_plasticity(model: nn.Module, x: Any, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor],
                        lr: float) -> float:
    """UPGD's plasticity on the next batch: one SGD step of a copy on ``(x, y)``, then :func:`upgd_plasticity`."""
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    clone = _training_copy(model)
    loss = loss_fn(_run(clone, x), y)
    grads = torch.autograd.grad(loss, list(clone.parameters()), allow_unused=True)
    with torch.no_grad():
        for p, g in zip(clone.parameters(), grads):
            if g is not None:
                p.sub_(g, alpha=lr)
        after = loss_fn(_run(clone, x), y)
    return upgd_plasticity(loss.detach(), after)


# ---------------------------------------------------------------------------------------------- pure metrics


def churn(before: Tensor, after: Tensor) -> float:
    """Mean squared drift ``mean (after - before)^2`` of outputs on the same reference batch (C-CHAIN's churn)."""
    if before.shape != after.shape:
        raise ValueError(f"churn needs outputs of one shape, got {tuple(before.shape)} and {tuple(after.shape)}")
    return float((after.detach().double() - before.detach().double()).pow(2).mean())


def feature_norm(h: Tensor) -> float:
    """Mean over samples of the Euclidean norm of the feature vector ``||h(x)||_2`` (rows of a unit matrix)."""
    m = to_float_unit_matrix(h)
    return float(m.double().norm(dim=1).mean())


def active_fraction(h: Tensor) -> float:
    """Fraction of (sample, unit) entries with ``h > 0`` (how often a unit fires, averaged over units)."""
    m = to_float_unit_matrix(h)
    return float((m > 0).double().mean())


def grama_dormant_fraction(grad: Tensor, tau: float = 0.0) -> float:
    """GraMa (Liu et al. 2025): fraction of units with ``E|g_i| / mean_k E|g_k| <= tau`` for a ``(samples, units)``
    gradient matrix ``g``; the Monitor metric passes ``g = dL/dz``, the gradient at each unit's pre-activation."""
    return dormant_fraction(grad, tau=tau)


def pre_activation_grad(output_grad: Tensor, z: Tensor, activation: Any) -> Tensor:
    """``dL/dz = dL/dh * f'(z)`` per sample and unit, from ``dL/dh`` and the pre-activation ``z`` of ``h = f(z)``."""
    return output_grad * activation_derivative(z, activation).to(output_grad)


def _squared_distance(p: Tensor, start: Tensor) -> Tensor:
    """``||p - start||^2`` accumulated in float64 (the difference itself in the parameter's dtype)."""
    return torch.linalg.vector_norm(p.detach() - start.to(p.device), dtype=torch.float64).pow(2)


def parameter_snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Detached copies of every named parameter (e.g. at initialisation, for :func:`distance_from_init`)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def distance_from_init(model: nn.Module, init: dict[str, Tensor]) -> dict[str, float]:
    """``||theta_l - theta_l(0)||_2`` per module that owns parameters (weights and biases together), plus ``"total"``.

    ``init`` is a :func:`parameter_snapshot`; a parameter missing from it is skipped. The total is the norm over
    all parameters (the root of the sum of the squared per-module distances).
    """
    per_module: dict[str, float] = {}
    for module_name, module in model.named_modules():
        squares = []
        for param_name, p in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}" if module_name else param_name
            if key in init:
                squares.append(_squared_distance(p, init[key]))
        if squares:
            per_module[module_name or "model"] = float(torch.stack(squares).sum().sqrt())
    per_module["total"] = math.sqrt(sum(v * v for v in per_module.values()))
    return per_module


# ---------------------------------------------------------------------------------------------- Monitor metrics


def _feature_norm(ctx: MetricContext) -> float:
    return feature_norm(ctx.output)


def _active_fraction(ctx: MetricContext) -> float:
    return active_fraction(ctx.output)


def _grama(ctx: MetricContext) -> float:
    if ctx.output_grad is None or ctx.pre_activation is None or ctx.activation is None:
        return float("nan")
    grad = pre_activation_grad(ctx.output_grad, ctx.pre_activation, ctx.activation)
    return grama_dormant_fraction(grad, tau=ctx.config.dormant_tau)


def _output_layers(info: Any) -> bool:
    return info.kind != "parametric" or info.config.weight_layer_output_metrics


PLASTICITY_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("feature_norm", _feature_norm, _output_layers, description="mean L2 norm of a sample's features"),
    MetricSpec("active_fraction", _active_fraction, ("activation",), description="fraction of entries with h > 0"),
    MetricSpec("grama_dormant_fraction", _grama, ("activation",), ("output", "pre_activation", "output_grad"),
               description="GraMa gradient-dormant units (score of |dL/dz|, z the pre-activation, <= dormant_tau)"),
)
"""The cheap stateless plasticity metrics (opt-in: :func:`register_plasticity_metrics` or ``extra_metrics=``)."""


#: Every plasticity measure of this module: name -> (how it is used, what it measures).
PLASTICITY_MEASURES: dict[str, tuple[str, str]] = {
    **{spec.name: ("Monitor metric, opt-in", spec.description) for spec in PLASTICITY_METRICS},
    "churn": ("Monitor metric, opt-in (churn_metric())", "mean squared output drift on the probe between measurements"),
    "distance_from_init": ("Monitor metric, opt-in (distance_from_init_metric(model)); function",
                           "||theta - theta(0)|| per layer and in total"),
    "plasticity_probe": ("function", "loss drop and R^2 of a copy fitting a fresh random target, its own output plus "
                         "noise, or a fresh head, in N steps"),
    "upgd_plasticity": ("function (one_step_plasticity)", "UPGD's 1 - L_after / L_before on the next batch"),
}


def register_plasticity_metrics() -> tuple[str, ...]:
    """Register :data:`PLASTICITY_METRICS` for every Monitor built afterwards (idempotent); returns their names."""
    for spec in PLASTICITY_METRICS:
        register_metric(spec, replace=True)
    return tuple(spec.name for spec in PLASTICITY_METRICS)


def churn_metric(name: str = "churn") -> MetricSpec:
    """An opt-in Monitor metric: :func:`churn` of each layer's output since the previous measurement (NaN at first).

    The Monitor's probe batch is the fixed reference batch; the first measurement (or one whose output shape
    changed) only stores the outputs.
    """
    previous: dict[str, Tensor] = {}

    def compute(ctx: MetricContext) -> float:
        out = ctx.output.detach().clone()
        last = previous.get(ctx.label)
        previous[ctx.label] = out
        if last is None or last.shape != out.shape:
            return float("nan")
        return churn(last, out)

    return MetricSpec(name, compute, ("activation", "parametric", "other"),
                      description="mean squared output drift on the probe since the last measurement")


def distance_from_init_metric(model: nn.Module, name: str = "distance_from_init") -> MetricSpec:
    """An opt-in Monitor metric: ``||theta - theta(0)||`` of each weight layer, against a snapshot taken now."""
    init = {id(p): p.detach().clone() for p in model.parameters()}

    def compute(ctx: MetricContext) -> float:
        squares = [_squared_distance(p, init[id(p)]) for p in ctx.module.parameters() if id(p) in init]
        return float(torch.stack(squares).sum().sqrt()) if squares else float("nan")

    return MetricSpec(name, compute, lambda info: info.kind != "activation", ("parameters",),
                      description="distance of the layer's parameters from the snapshot at initialisation")
