"""More methods of the 2024-2026 plasticity literature (issue 17): DASH, SWR, TRAC and CCBP.

- ``dash`` (Shin et al., NeurIPS 2024): at a warm start, shrink each weight block by its cosine alignment with the
  negative gradient of the new data.
- ``swr`` (Hernandez-Garcia et al., CoLLAs 2025): selective weight reinitialisation, re-drawing the individual
  weights of lowest utility.
- ``trac`` (Muppidi et al., NeurIPS 2024): a parameter-free wrapper that scales the base optimizer's offset from
  the initial weights by a factor tuned online (discounted erfi potentials).
- ``ccbp`` (ICLR 2026 submission): continuous continual backprop, a partial, utility-scaled reset of every
  hidden unit instead of CBP's full reset of a few.
- ``optimizer_reset`` (Asadi et al., NeurIPS 2023): forget the whole optimizer state at task starts.
- ``leaky_relu``: every ``nn.ReLU`` of the model becomes an ``nn.LeakyReLU`` (a method in the field's peer testbed).

Each is a :class:`~lopkit.mitigations.base.Mitigation` with a validated ``Config`` dataclass, registered by name,
with its whole state in ``state_dict()`` so a resumed run continues exactly. Random draws come from a private
generator seeded with :meth:`Mitigation.method_seed` (the run's seed through :mod:`lopkit.seeding`). The docs page
of each (``docs/methods/<name>.md``) cites the paper and states every choice made here.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Literal

import numpy as np
import torch
from scipy.special import erfi
from torch import nn

from lopkit.configs import ConfigError, require
from lopkit.mitigations.base import Mitigation
from lopkit.mitigations.layers import INIT_SCHEMES, UnitGroup, _sample, _weight_scale, activation_gain
from lopkit.mitigations.layers import outgoing_weight_mask, resolve_unit_groups
from lopkit.mitigations.perturbation import MethodGenerator, weight_layers
from lopkit.mitigations.registry import register_method

__all__ = [
    "DASH",
    "SWR",
    "TRAC",
    "CCBP",
    "OptimizerReset",
    "LeakyReLUSwap",
    "dash_shrink_factors",
    "swr_select",
    "trac_scale",
    "ccbp_reset_proportion",
]


def _check_seed(seed: int | None) -> None:
    require(seed is None or seed >= 0, f"seed must be >= 0 or None, got {seed}")


def _cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity along the last axis, each norm clamped at ``eps`` (0 for a zero vector)."""
    dot = (a * b).sum(dim=-1)
    return dot / (a.norm(dim=-1).clamp(min=eps) * b.norm(dim=-1).clamp(min=eps))


def _layers(model: nn.Module, include_output: bool) -> list[nn.Module]:
    layers = weight_layers(model)
    return layers if include_output else layers[:-1]


@torch.no_grad()
def _scale_state_entries(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, factor: torch.Tensor) -> None:
    """Multiply every optimizer-state tensor shaped like ``param`` by ``factor`` (broadcast); step counters are kept."""
    if optimizer is None:
        return
    for value in (optimizer.state.get(param) or {}).values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.mul_(factor.to(device=value.device, dtype=value.dtype))


# ---------------------------------------------------------------------------------------------- DASH


def dash_shrink_factors(weight: torch.Tensor, negative_gradient: torch.Tensor, lam: float) -> torch.Tensor:
    """DASH's factors ``clamp(cos(-g, w), lam, 1)`` per block: per row of a Linear weight, per ``(out, in)`` kernel
    of a conv weight, one factor for a 1-D bias. The result broadcasts against ``weight`` after ``unsqueeze(-1)``
    for conv kernels (shape ``(out, in)``), rows (``(out,)``) or a bias (``()``)."""
    if weight.dim() == 1:
        cos = _cosine(negative_gradient.reshape(1, -1), weight.reshape(1, -1))[0]
    elif weight.dim() == 2:
        cos = _cosine(negative_gradient, weight)
    else:
        shape = weight.shape[:2] + (-1,)
        cos = _cosine(negative_gradient.reshape(shape), weight.reshape(shape))
    return cos.clamp(min=lam, max=1.0)


@torch.no_grad()
def _apply_shrink(param: torch.Tensor, factors: torch.Tensor) -> None:
    """``param *= factors`` with DASH's blocks (see :func:`dash_shrink_factors`)."""
    if param.dim() <= 1:
        param.mul_(factors)
    elif param.dim() == 2:
        param.mul_(factors.unsqueeze(1))
    else:
        param.mul_(factors.reshape(factors.shape + (1,) * (param.dim() - 2)))


@register_method
class DASH(Mitigation):
    """DASH (Shin et al. 2024): at a warm start, ``w <- w * clamp(cos(-g_ema, w), lam, 1)`` per weight block.

    ``g_ema`` is the EMA ``g <- (1 - alpha) g + alpha (-grad)`` of the gradients of the first ``collect_steps``
    training batches of a new task (from 0); right after the last of them is collected (before its optimizer
    step), every Linear/Conv weight is shrunk per row (conv: per ``(out, in)`` kernel) and every bias as one block.
    Blocks that already point along the new data's descent direction keep their size; the rest shrink to ``lam``.
    """

    name = "dash"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``dash``."""

        alpha: float = 0.3
        """EMA weight of the newest negative gradient (the authors' code default)."""
        lam: float = 0.3
        """Smallest shrink factor lambda: factors are clamp(cos, lam, 1) (the authors' code default)."""
        collect_steps: int = 1
        """Training batches of the new task whose gradients enter the EMA before the shrink."""
        first_task: bool = False
        """Also shrink at the start of task 0 (a cold start has nothing to forget: off by default)."""
        include_output: bool = True
        """Also shrink the last Linear/Conv layer (the authors shrink every Linear/Conv layer)."""
        reset_optimizer: bool = False
        """Forget the optimizer state of the shrunk parameters (the paper starts each stage with a fresh one)."""

        def validate(self) -> None:
            """Raise ConfigError for impossible values."""
            require(0.0 < self.alpha <= 1.0, f"alpha must be in (0, 1], got {self.alpha}")
            require(0.0 <= self.lam <= 1.0, f"lam must be in [0, 1], got {self.lam}")
            require(self.collect_steps >= 1, f"collect_steps must be a positive integer, got {self.collect_steps}")

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()
        self.pending = 0
        self.ema: dict[str, torch.Tensor] = {}
        self.shrinks = 0
        self.last_factors: dict[str, torch.Tensor] = {}

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to collect yet."""
        self.pending, self.ema, self.shrinks = 0, {}, 0

    def _named(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        ids = {id(p) for layer in _layers(model, self.config.include_output) for p in (layer.weight, layer.bias)
               if p is not None}  # fmt: skip
        return [(name, p) for name, p in model.named_parameters() if id(p) in ids]

    def on_task_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, task: int) -> None:
        """Start collecting the new task's gradients (task 0 only with ``first_task``)."""
        if task > 0 or self.config.first_task:
            self.pending = self.config.collect_steps
            self.ema = {}

    @torch.no_grad()
    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Add this batch's negative gradient to the EMA; shrink after the last collected batch."""
        if self.pending <= 0:
            return
        alpha = self.config.alpha
        for name, p in self._named(model):
            if p.grad is None:
                continue
            ema = self.ema.get(name)
            if ema is None:
                ema = torch.zeros_like(p, dtype=torch.float64)
            self.ema[name] = ema.mul(1 - alpha).add(-p.grad.double(), alpha=alpha)
        self.pending -= 1
        if self.pending == 0:
            self.shrink(model, optimizer)

    @torch.no_grad()
    def shrink(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Shrink every selected parameter with a collected gradient EMA by its DASH factors."""
        self.last_factors = {}
        params = []
        for name, p in self._named(model):
            if name not in self.ema:
                continue
            factors = dash_shrink_factors(p.detach().double(), self.ema[name].to(p.device), self.config.lam)
            _apply_shrink(p, factors.to(p.dtype))
            self.last_factors[name] = factors.cpu()
            params.append(p)
        if self.config.reset_optimizer and optimizer is not None:
            for p in params:
                optimizer.state.pop(p, None)
        self.ema = {}
        self.shrinks += 1

    def state_dict(self) -> dict:
        """Collection counter, the gradient EMA (CPU) and the number of shrinks."""
        return {"pending": self.pending, "ema": {k: v.cpu().clone() for k, v in self.ema.items()},
                "shrinks": self.shrinks}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.pending = int(state.get("pending", 0))
        self.ema = {k: v.clone() for k, v in state.get("ema", {}).items()}
        self.shrinks = int(state.get("shrinks", 0))


# ---------------------------------------------------------------------------------------------- SWR


def swr_select(utility: torch.Tensor, method: str, rate: float, generator: torch.Generator) -> torch.Tensor:
    """The weights SWR re-draws: a bool mask shaped like ``utility``.

    ``proportional``: the ``floor(n * rate)`` entries of lowest utility, plus one more with probability equal to the
    fractional part of ``n * rate`` (drawn from ``generator``); ties go to the earlier entry. ``threshold``: the
    entries with ``utility <= rate * mean(utility)``.
    """
    flat = utility.detach().reshape(-1).double().cpu()
    if method == "threshold":
        return (flat <= rate * flat.mean()).reshape(utility.shape)
    expected = flat.numel() * rate
    count = int(math.floor(expected))
    if float(torch.rand((), generator=generator, dtype=torch.float64)) < expected - count:
        count += 1
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if count:
        mask[torch.argsort(flat, stable=True)[:count]] = True
    return mask.reshape(utility.shape)


@register_method
class SWR(Mitigation):
    """Selective weight reinitialisation (Hernandez-Garcia et al. 2025): re-draw the least useful single weights.

    Every step each Linear/Conv weight and bias keeps a utility trace ``u <- decay*u + (1-decay)*|w * grad|``
    (``utility=gradient``) or ``|w|`` (``magnitude``). After every ``every``-th step, in each parameter tensor the
    weights chosen by :func:`swr_select` get a fresh draw from the layer's initial law (or its mean, 0), a
    utility of 0 and zeroed optimizer-state entries.
    """

    name = "swr"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``swr``."""

        utility: Literal["gradient", "magnitude"] = "gradient"
        """|w * grad| (a first-order estimate of the loss change if the weight were removed) or |w|."""
        selection: Literal["proportional", "threshold"] = "proportional"
        """Re-draw a fraction ``rate`` of each tensor (lowest utility), or every weight with u <= rate * mean(u)."""
        rate: float = 0.001
        """Fraction of each tensor re-drawn per event (proportional) or the threshold factor (threshold)."""
        every: int = 10
        """Re-draw after every ``every``-th optimizer step."""
        decay: float = 0.99
        """EMA coefficient of the utility trace (0: the current step's utility only)."""
        reinit: Literal["resample", "mean"] = "resample"
        """New value: a fresh draw from the initial law, or its mean (0)."""
        init: str = "default"
        """Initial law of the weights (one of lopkit's init schemes); biases use PyTorch's U(+-1/sqrt(fan_in))."""
        include_output: bool = True
        """Also re-draw weights of the last Linear/Conv layer."""
        reset_optimizer: bool = True
        """Zero the optimizer-state entries (moments) of the re-drawn weights."""
        seed: int | None = None
        """Seed of the generator of the selection and the new weights; None derives it from the run's seed."""

        def validate(self) -> None:
            """Raise ConfigError for impossible values."""
            require(self.utility in ("gradient", "magnitude"),
                    f"utility must be gradient or magnitude, got {self.utility!r}")
            require(self.selection in ("proportional", "threshold"),
                    f"selection must be proportional or threshold, got {self.selection!r}")
            require(math.isfinite(self.rate) and self.rate >= 0, f"rate must be a finite number >= 0, got {self.rate}")
            require(self.selection == "threshold" or self.rate <= 1,
                    f"rate must be <= 1 with selection=proportional, got {self.rate}")
            require(self.every >= 1, f"every must be a positive integer, got {self.every}")
            require(0.0 <= self.decay < 1.0, f"decay must be in [0, 1), got {self.decay}")
            require(self.reinit in ("resample", "mean"), f"reinit must be resample or mean, got {self.reinit!r}")
            require(self.init in INIT_SCHEMES, f"init must be one of {', '.join(INIT_SCHEMES)}, got {self.init!r}")
            _check_seed(self.seed)

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()
        self.generator = MethodGenerator()
        self.utilities: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.total_replaced = 0
        self._params: list[tuple[str, torch.Tensor, nn.Module, float, str]] = []

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Zero utilities, a fresh generator; note each parameter's layer and its init scale."""
        self.generator.reset(self.method_seed(self.config.seed))
        groups = {}
        try:
            groups = {id(g.incoming): g for g in resolve_unit_groups(model, None)}
        except ValueError:
            pass
        ids = {}
        for layer in _layers(model, self.config.include_output):
            group = groups.get(id(layer))
            gain = activation_gain(group.activation if group is not None else None)
            ids[id(layer.weight)] = (layer, _weight_scale(layer.weight, self.config.init, gain), "weight")
            if layer.bias is not None:
                ids[id(layer.bias)] = (layer, 1.0 / math.sqrt(layer.weight[0].numel()), "bias")
        self._params = [(name, p, *ids[id(p)]) for name, p in model.named_parameters() if id(p) in ids]
        self.utilities = {name: torch.zeros_like(p, dtype=torch.float64) for name, p, *_ in self._params}
        self.steps = self.total_replaced = 0

    @torch.no_grad()
    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Update the utility traces from the current weights and gradients."""
        decay = self.config.decay
        for name, p, *_ in self._params:
            if self.config.utility == "gradient":
                if p.grad is None:
                    continue
                value = (p.detach().double() * p.grad.double()).abs()
            else:
                value = p.detach().double().abs()
            self.utilities[name].mul_(decay).add_(value, alpha=1 - decay)

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """After every ``every``-th step, re-draw the selected weights of each tensor."""
        self.steps += 1
        if self.steps % self.config.every:
            return
        generator = self.generator.get("cpu")
        scheme = self.config.init
        for name, p, _layer, scale, kind in self._params:
            utility = self.utilities[name]
            mask = swr_select(utility, self.config.selection, self.config.rate, generator)
            count = int(mask.sum())
            if count == 0:
                continue
            if self.config.reinit == "resample":
                law = scheme if kind == "weight" else "default"
                fresh = _sample((count,), law, scale, generator)
            else:
                fresh = torch.zeros(count, dtype=torch.float64)
            device_mask = mask.to(p.device)
            p[device_mask] = fresh.to(device=p.device, dtype=p.dtype)
            utility[mask.to(utility.device)] = 0.0
            if self.config.reset_optimizer:
                _scale_state_entries(optimizer, p, (~device_mask).to(p.dtype))
            self.total_replaced += count

    def state_dict(self) -> dict:
        """Utility traces (CPU), counters and the generator."""
        return {"utilities": {k: v.cpu().clone() for k, v in self.utilities.items()}, "steps": self.steps,
                "total_replaced": self.total_replaced, "generator": self.generator.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (after :meth:`attach`)."""
        for name, value in state.get("utilities", {}).items():
            device = self.utilities[name].device if name in self.utilities else value.device
            self.utilities[name] = value.clone().to(device)
        self.steps = int(state.get("steps", 0))
        self.total_replaced = int(state.get("total_replaced", 0))
        self.generator.load_state_dict(state.get("generator", {}))


# ---------------------------------------------------------------------------------------------- TRAC


def trac_scale(sigma: np.ndarray, variance: np.ndarray, s_init: float, eps: float) -> np.ndarray:
    """TRAC's per-beta scales ``s_init / erfi(1/sqrt 2) * erfi(sigma / (sqrt(2 variance) + eps))`` (float64)."""
    return s_init / erfi(1.0 / math.sqrt(2.0)) * erfi(sigma / (math.sqrt(2.0) * np.sqrt(variance) + eps))


@register_method
class TRAC(Mitigation):
    """TRAC (Muppidi et al. 2024): ``theta = theta_ref + max(S, 0) * Delta``, ``S`` tuned online without parameters.

    ``theta_ref`` are the weights at ``attach``; ``Delta`` is the base optimizer's own offset from them, kept
    explicitly: each step adds the base optimizer's update to it. With ``h = <Delta, g>`` (all trainable parameters,
    ``Delta`` before the update, ``g`` the gradient at the current weights) and for each ``beta_i = 1 - 10^-i``,
    ``i = 1..betas``: ``v_i <- beta_i^2 v_i + h^2``, ``sigma_i <- beta_i sigma_i - h``,
    ``s_i = s_init / erfi(1/sqrt 2) * erfi(sigma_i / (sqrt(2 v_i) + eps))`` and ``S = sum_i s_i``. A change another
    method makes to the weights between two steps is kept as a shift of ``theta_ref``.
    """

    name = "trac"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``trac``."""

        betas: int = 6
        """Number of discount factors beta_i = 1 - 10^-i, i = 1..betas (the authors' 0.9 ... 0.999999)."""
        s_init: float = 1e-8
        """s_prev of the authors' code: the scale of the erfi potentials (and of the first steps)."""
        eps: float = 1e-8
        """Added to sqrt(2 v) in the erfi argument."""

        def validate(self) -> None:
            """Raise ConfigError for impossible values."""
            require(1 <= self.betas <= 15, f"betas must be an integer in [1, 15], got {self.betas}")
            require(math.isfinite(self.s_init) and self.s_init > 0,
                    f"s_init must be a finite number > 0, got {self.s_init}")
            require(math.isfinite(self.eps) and self.eps > 0, f"eps must be a finite number > 0, got {self.eps}")

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()
        self.betas = np.array([1.0 - 10.0 ** -(i + 1) for i in range(self.config.betas)], dtype=np.float64)
        self.reset_tuner()
        self.reference: dict[str, torch.Tensor] = {}
        self.delta: dict[str, torch.Tensor] = {}
        self.written: dict[str, torch.Tensor] = {}
        self._before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def reset_tuner(self) -> None:
        """The tuner's start: s = 0, v = 0, sigma = 1e-8 per beta (as the authors' code), no step yet."""
        count = len(self.betas)
        self.s = np.zeros(count)
        self.variance = np.zeros(count)
        self.sigma = np.full(count, 1e-8)
        self.steps = 0

    @property
    def scale(self) -> float:
        """The current total scale ``S = sum_i s_i``."""
        return float(self.s.sum())

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Remember the reference weights, ``Delta = 0``, and restart the tuner."""
        self.reference = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        self.delta = {name: torch.zeros_like(value) for name, value in self.reference.items()}
        self.written = {}
        self.reset_tuner()

    @torch.no_grad()
    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Fold outside changes into ``theta_ref``; record each parameter's value and gradient before the base step."""
        self._before = {}
        for name, p in model.named_parameters():
            if name not in self.reference:
                continue
            if name in self.written:
                self.reference[name] += p.detach() - self.written[name]
            if p.grad is not None:
                self._before[name] = (p.detach().clone(), p.grad.detach().clone())

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Update the tuner with ``h = <Delta, g>``, add the base update to ``Delta``, set the weights."""
        if not self._before:
            return
        named = dict(model.named_parameters())
        h = 0.0
        for name, (before, grad) in self._before.items():
            delta = self.delta[name]
            h += float((delta.double() * grad.double()).sum())
            delta += named[name].detach() - before
        self.variance = self.betas**2 * self.variance + h * h
        self.sigma = self.betas * self.sigma - h
        self.s = trac_scale(self.sigma, self.variance, self.config.s_init, self.config.eps)
        if not np.all(np.isfinite(self.s)):
            raise FloatingPointError(f"trac: the scale became non-finite at step {self.steps + 1} (h = {h})")
        scale = max(self.scale, 0.0)
        for name, p in named.items():
            if name in self.reference:
                p.copy_(self.reference[name] + self.delta[name] * scale)
                self.written[name] = p.detach().clone()
        self._before = {}
        self.steps += 1

    def state_dict(self) -> dict:
        """Reference, offset and last written weights (CPU), the tuner's arrays (float64 tensors) and the step count."""
        cpu = lambda tensors: {k: v.cpu().clone() for k, v in tensors.items()}  # noqa: E731
        arrays = {key: torch.from_numpy(getattr(self, key).copy()) for key in ("s", "variance", "sigma")}
        return {"reference": cpu(self.reference), "delta": cpu(self.delta), "written": cpu(self.written), **arrays,
                "steps": self.steps}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (after :meth:`attach`)."""
        if not state:
            return
        devices = {name: value.device for name, value in self.reference.items()}
        for key in ("reference", "delta", "written"):
            setattr(self, key, {name: value.clone().to(devices.get(name, value.device))
                                for name, value in state[key].items()})  # fmt: skip
        for key in ("s", "variance", "sigma"):
            value = state[key]
            setattr(self, key, np.array(value.numpy() if isinstance(value, torch.Tensor) else value, dtype=np.float64))
        self.steps = int(state["steps"])


# ---------------------------------------------------------------------------------------------- CCBP


def ccbp_reset_proportion(utility: torch.Tensor, rate: float, threshold: float, steepness: float) -> torch.Tensor:
    """``rate * (1 - clip(1 - exp(-steepness * (u - threshold)), 0, 1))``: ``rate`` at or below the threshold, fading
    to 0 as the utility rises above it."""
    transformed = (1.0 - torch.exp(-steepness * (utility - threshold))).clamp(0.0, 1.0)
    return rate * (1.0 - transformed)


@register_method
class CCBP(Mitigation):
    """Continuous continual backprop (ICLR 2026 submission): every hidden unit is partly reset, by its utility.

    Per hidden unit ``i`` (incoming Linear row / conv filter), before every step ``u_i <- decay*u_i + (1-decay) *
    s_i`` with ``s_i = m_i / (mean_k m_k + 1e-8)``, ``m_i`` the mean ``|dL/dW_in|`` over the unit's incoming weights
    (``u`` starts at 1). After every ``every``-th step, with ``p_i`` = :func:`ccbp_reset_proportion`, the incoming
    weights move to ``(1 - p_i) W_in[i] + p_i W_fresh[i]`` (a fresh draw), the outgoing weights reading the unit to
    ``(1 - p_i) W_out[:, i]``, the unit's optimizer-state entries are scaled by ``1 - p_i``, and every ``u`` goes
    back to 1. Biases and norm parameters are kept; the output layer has no unit group, so it is only read.
    """

    name = "ccbp"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``ccbp``."""

        rate: float = 0.5
        """Largest fraction p of a unit moved to a fresh draw per event (replacement_rate of the reference code)."""
        decay: float = 0.9
        """EMA coefficient of the utility."""
        every: int = 100
        """Partial reset after every ``every``-th optimizer step."""
        threshold: float = 0.95
        """Utility (mean 1 by normalisation) at and below which a unit gets the full rate."""
        steepness: float = 16.0
        """How fast p falls to 0 as the utility rises above the threshold."""
        init: str = "kaiming_uniform"
        """Law of the fresh draw (the reference code's he_uniform; one of lopkit's init schemes)."""
        reset_optimizer: bool = True
        """Scale the optimizer-state entries (moments) of each unit by 1 - p_i."""
        seed: int | None = None
        """Seed of the generator of the fresh draws; None derives it from the run's seed."""

        def validate(self) -> None:
            """Raise ConfigError for impossible values."""
            require(0.0 <= self.rate <= 1.0, f"rate must be in [0, 1], got {self.rate}")
            require(0.0 <= self.decay < 1.0, f"decay must be in [0, 1), got {self.decay}")
            require(self.every >= 1, f"every must be a positive integer, got {self.every}")
            require(math.isfinite(self.threshold), f"threshold must be finite, got {self.threshold}")
            require(math.isfinite(self.steepness) and self.steepness > 0,
                    f"steepness must be a finite number > 0, got {self.steepness}")
            require(self.init in INIT_SCHEMES, f"init must be one of {', '.join(INIT_SCHEMES)}, got {self.init!r}")
            _check_seed(self.seed)

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()
        self.generator = MethodGenerator()
        self.groups: list[UnitGroup] = []
        self.utilities: list[torch.Tensor] = []
        self.steps = 0
        self.events = 0
        self.total_replaced = 0
        self.last_proportions: list[torch.Tensor] = []

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Find the hidden unit groups; utilities start at 1; a fresh generator."""
        try:
            self.groups = resolve_unit_groups(model, None)
        except ValueError as err:
            raise ConfigError(f"ccbp needs hidden unit groups (Linear/Conv -> activation -> Linear/Conv): {err}")
        self.utilities = [torch.ones(g.num_units, dtype=torch.float64) for g in self.groups]
        self.generator.reset(self.method_seed(self.config.seed))
        self.steps = self.events = self.total_replaced = 0

    @torch.no_grad()
    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Update each unit's utility from the gradient of its incoming weights."""
        decay = self.config.decay
        for index, group in enumerate(self.groups):
            grad = group.incoming.weight.grad
            if grad is None:
                continue
            m = grad.detach().double().abs().reshape(grad.shape[0], -1).mean(dim=1).cpu()
            score = m / (m.mean() + 1e-8)
            self.utilities[index].mul_(decay).add_(score, alpha=1 - decay)

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """After every ``every``-th step, partly reset every hidden unit by its proportion p_i."""
        self.steps += 1
        if self.steps % self.config.every:
            return
        generator = self.generator.get("cpu")
        self.last_proportions = []
        for index, group in enumerate(self.groups):
            p = ccbp_reset_proportion(self.utilities[index], self.config.rate, self.config.threshold,
                                      self.config.steepness)  # fmt: skip
            self.last_proportions.append(p.clone())
            self.total_replaced += int((p > 0).sum())  # units moved (partly) toward a fresh draw
            weight = group.incoming.weight
            scale = _weight_scale(weight, self.config.init, activation_gain(group.activation))
            fresh = _sample(tuple(weight.shape), self.config.init, scale, generator)
            rows = p.reshape((-1,) + (1,) * (weight.dim() - 1))
            keep_rows = (1.0 - rows).to(device=weight.device, dtype=weight.dtype)
            weight.mul_(keep_rows).add_((rows * fresh).to(device=weight.device, dtype=weight.dtype))
            if self.config.reset_optimizer:
                _scale_state_entries(optimizer, weight, keep_rows)
            if group.outgoing is not None:
                keep_out = self._outgoing_keep(group, 1.0 - p).to(group.outgoing.weight)
                group.outgoing.weight.mul_(keep_out)
                if self.config.reset_optimizer:
                    _scale_state_entries(optimizer, group.outgoing.weight, keep_out)
            self.utilities[index].fill_(1.0)
        self.events += 1

    @staticmethod
    def _outgoing_keep(group: UnitGroup, keep: torch.Tensor) -> torch.Tensor:
        """A factor shaped like ``outgoing.weight``: each entry reading unit ``i`` gets ``keep[i]``."""
        out = group.outgoing
        shape = tuple(out.weight.shape)
        if isinstance(out, nn.Linear):
            return keep.repeat_interleave(group.outgoing_block).reshape(1, -1).expand(shape)
        if out.groups == 1:
            return keep.reshape((1, -1) + (1,) * (len(shape) - 2)).expand(shape)
        result = torch.ones(shape, dtype=torch.float64)  # grouped conv: one unit at a time
        for unit in range(group.num_units):
            mask = torch.zeros(group.num_units, dtype=torch.bool)
            mask[unit] = True
            result[outgoing_weight_mask(group, mask).cpu()] = float(keep[unit])
        return result

    def state_dict(self) -> dict:
        """Utilities, counters and the generator."""
        return {"utilities": [u.clone() for u in self.utilities], "steps": self.steps, "events": self.events,
                "total_replaced": self.total_replaced, "generator": self.generator.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (after :meth:`attach`)."""
        if not state:
            return
        saved = state["utilities"]
        if len(saved) != len(self.groups):
            raise ValueError(f"ccbp: saved state has {len(saved)} unit groups, the model has {len(self.groups)}")
        self.utilities = [u.clone().double() for u in saved]
        self.steps, self.events = int(state["steps"]), int(state["events"])
        self.total_replaced = int(state.get("total_replaced", 0))
        self.generator.load_state_dict(state.get("generator", {}))


# ---------------------------------------------------------------------------------------------- optimizer reset


@register_method
class OptimizerReset(Mitigation):
    """Optimizer reset (Asadi et al. 2023): delete every parameter's optimizer state (moments, step counters).

    At every task start after the first and, with ``every > 0``, after every ``every``-th optimizer step. Adam then
    restarts its bias correction, so the first steps after a reset have size about ``lr`` per coordinate.
    """

    name = "optimizer_reset"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``optimizer_reset``."""

        at_task_start: bool = True
        """Reset at every task start (task 0 excepted)."""
        every: int = 0
        """Also reset after every ``every``-th optimizer step; 0 disables the step schedule."""

        def validate(self) -> None:
            """Raise ConfigError for impossible values."""
            require(self.every >= 0, f"every must be >= 0 (0: no step schedule), got {self.every}")

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()
        self.steps = 0
        self.resets = 0

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Restart the counters."""
        self.steps = self.resets = 0

    def reset(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Delete the optimizer's whole per-parameter state now."""
        if optimizer is not None:
            optimizer.state.clear()
        self.resets += 1

    def on_task_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, task: int) -> None:
        """Reset at every task start after the first (with ``at_task_start``)."""
        if self.config.at_task_start and task > 0:
            self.reset(optimizer)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Reset after every ``every``-th step."""
        self.steps += 1
        if self.config.every and self.steps % self.config.every == 0:
            self.reset(optimizer)

    def state_dict(self) -> dict:
        """The counters (the method is deterministic)."""
        return {"steps": self.steps, "resets": self.resets}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.steps = int(state.get("steps", 0))
        self.resets = int(state.get("resets", 0))


# ---------------------------------------------------------------------------------------------- leaky ReLU


@register_method
class LeakyReLUSwap(Mitigation):
    """Leaky ReLU: a copy of the model with every ``nn.ReLU`` replaced by ``nn.LeakyReLU(negative_slope)``.

    A leaky unit always passes a gradient, so it cannot die; weights and their initialisation are kept.
    """

    name = "leaky_relu"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``leaky_relu``."""

        negative_slope: float = 0.01
        """Slope for negative inputs (PyTorch's default)."""

        def validate(self) -> None:
            """Raise ConfigError for a slope outside (0, 1)."""
            require(0.0 < self.negative_slope < 1.0, f"negative_slope must be in (0, 1), got {self.negative_slope}")

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` with its ReLU modules swapped (ConfigError if it has none)."""
        model = copy.deepcopy(model)
        swapped = 0
        for parent in model.modules():
            for child_name, child in list(parent.named_children()):
                if type(child) is nn.ReLU:
                    setattr(parent, child_name, nn.LeakyReLU(self.config.negative_slope))
                    swapped += 1
        if swapped == 0:
            raise ConfigError("leaky_relu: the model has no nn.ReLU module to replace (its activation is not ReLU)")
        return model
