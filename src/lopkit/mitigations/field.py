"""Methods of the 2022-2025 plasticity literature (issue 17): proper Adam, Parseval and spectral regularisation,
periodic full/layer/head resets, Hare & Tortoise, UPGD, InFeR, C-CHAIN, plasticity injection, FIRE, ReGraMa and SNR.

Each is a :class:`~lopkit.mitigations.base.Mitigation` with a validated ``Config`` dataclass, registered by name
(``proper_adam``, ``parseval``, ``spectral``, ``reset``, ``hare_tortoise``, ``upgd``, ``infer``, ``cchain``,
``injection``, ``fire``, ``regrama``, ``snr``), with its whole state in ``state_dict()`` so a resumed run continues
exactly. Every random draw comes from the method's private generator seeded with :meth:`Mitigation.method_seed`
(the run's seed through :mod:`lopkit.seeding`).
The docs page of each (``docs/methods/<name>.md``) cites the paper and states every choice made here.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Literal

import torch
from torch import nn

from lopkit.configs import ConfigError, require
from lopkit.diagnostics.activations import dormant_scores
from lopkit.mitigations.base import Mitigation
from lopkit.mitigations.distributed import gather_over_ranks
from lopkit.mitigations.layers import INIT_SCHEMES, UnitGroup, find_unit_groups, reinit_incoming
from lopkit.mitigations.perturbation import MethodGenerator, weight_layers
from lopkit.mitigations.perturbation import randn_like as _randn_like
from lopkit.mitigations.registry import register_method
from lopkit.mitigations.regularizers import is_norm_module
from lopkit.mitigations.resets import ReDo, ReDoConfig, UnitMethod

__all__ = [
    "ProperAdam",
    "Parseval",
    "Spectral",
    "PeriodicReset",
    "HareTortoise",
    "UPGD",
    "InFeR",
    "CChain",
    "PlasticityInjection",
    "FIRE",
    "ReGraMa",
    "ReGraMaConfig",
    "GRAMA_GRADIENTS",
    "grama_scores",
    "grama_weight_magnitude",
    "SelfNormalizedResets",
    "snr_reset_mask",
    "newton_schulz",
    "parseval_penalty",
    "power_iteration",
    "spectral_penalty",
    "upgd_gate",
    "weight_matrix",
    "reset_layers_",
    "clear_optimizer_state",
]


def _check_seed(seed: int | None) -> None:
    require(seed is None or seed >= 0, f"seed must be >= 0 or None, got {seed}")


def _check_finite_nonnegative(name: str, value: float) -> None:
    require(math.isfinite(value) and value >= 0, f"{name} must be a finite number >= 0, got {value}")


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The weight of a Linear/Conv layer as an ``(out, fan_in)`` matrix (one row per output unit or filter)."""
    return layer.weight.reshape(layer.weight.shape[0], -1)


def _selected_layers(model: nn.Module, include_output: bool) -> list[nn.Module]:
    """The model's Linear/Conv layers in module order, without the last one unless ``include_output``."""
    layers = weight_layers(model)
    return layers if include_output else layers[:-1]


def clear_optimizer_state(optimizer: torch.optim.Optimizer | None, params: list[torch.Tensor]) -> None:
    """Forget the optimizer's whole state (moments, step counter) of ``params``: they restart as fresh parameters."""
    if optimizer is None:
        return
    for param in params:
        optimizer.state.pop(param, None)


# ---------------------------------------------------------------------------------------------- proper Adam


@register_method
class ProperAdam(Mitigation):
    """The "proper Adam" of Dohare et al. 2024): Adam with ``beta1 = beta2``, set on the optimizer at ``attach``."""

    name = "proper_adam"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``proper_adam``."""

        beta: float = 0.99
        """The common value of beta1 and beta2 (0.99: our reading of Dohare et al. 2024)."""

        def validate(self) -> None:
            """Raise ConfigError for a beta outside [0, 1)."""
            require(math.isfinite(self.beta) and 0.0 <= self.beta < 1.0, f"beta must be in [0, 1), got {self.beta}")

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Set ``betas = (beta, beta)`` on every parameter group; ConfigError if the optimizer has no betas."""
        groups = getattr(optimizer, "param_groups", None) or []
        if not groups or any("betas" not in group for group in groups):
            raise ConfigError(
                f"proper_adam sets Adam's betas, but the optimizer is {type(optimizer).__name__}, which has none; "
                "use it with an Adam-family optimizer (e.g. a benchmark with optimizer=adam)"
            )
        for group in groups:
            group["betas"] = (self.config.beta, self.config.beta)
        if "betas" in getattr(optimizer, "defaults", {}):  # groups added later (infer, injection heads) inherit them
            optimizer.defaults["betas"] = (self.config.beta, self.config.beta)


# ---------------------------------------------------------------------------------------------- Parseval


def parseval_penalty(weights: list[torch.Tensor], scale: float) -> torch.Tensor:
    """``sum_l ||W_l W_l^T - scale * I||_F^2`` over ``(out, fan_in)`` matrices (gradient ``4 (W W^T - sI) W``)."""
    if not weights:
        return torch.zeros(())
    terms = []
    for w in weights:
        gram = w @ w.transpose(0, 1)
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        terms.append((gram - scale * eye).pow(2).sum())
    return torch.stack(terms).sum()


@register_method
class Parseval(Mitigation):
    """Parseval regularisation (Chung et al. 2024): ``strength * sum_l ||W_l W_l^T - s I||_F^2`` added to the loss."""

    name = "parseval"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``parseval``."""

        strength: float = 1e-3
        """lambda in lambda * sum_l ||W W^T - s I||_F^2."""
        scale: float = 1.0
        """s: the rows of each W are pushed to be orthogonal with squared norm s."""
        include_output: bool = False
        """Also regularise the last Linear/Conv layer (the output head)."""

        def validate(self) -> None:
            """Raise ConfigError for a negative or non-finite strength or scale."""
            _check_finite_nonnegative("strength", self.strength)
            _check_finite_nonnegative("scale", self.scale)

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """``strength * sum_l ||W_l W_l^T - s I||_F^2`` over the selected layers (None when strength is 0)."""
        if self.config.strength == 0:
            return None
        layers = _selected_layers(model, self.config.include_output)
        return self.config.strength * parseval_penalty([weight_matrix(m) for m in layers], self.config.scale)


# ---------------------------------------------------------------------------------------------- spectral


@torch.no_grad()
def power_iteration(w: torch.Tensor, u: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``iterations`` steps of ``v = W^T u/|.|, u = W v/|.|`` from ``u``; returns the unit vectors ``(u, v)``."""
    w = w.detach()
    for _ in range(iterations):
        v = torch.nn.functional.normalize(w.transpose(0, 1) @ u, dim=0)
        u = torch.nn.functional.normalize(w @ v, dim=0)
    return u, v


def spectral_penalty(sigmas: list[torch.Tensor], power: float) -> torch.Tensor:
    """``sum_l (sigma_l^power - 1)^2`` (differentiable in the sigmas)."""
    if not sigmas:
        return torch.zeros(())
    return torch.stack([(s.pow(power) - 1.0).pow(2) for s in sigmas]).sum()


@register_method
class Spectral(Mitigation):
    """Spectral regularisation (Lewandowski et al. 2025): ``strength * sum_l (sigma_max(W_l)^k - 1)^2``.

    ``sigma_max`` is estimated by power iteration with a persistent left vector ``u`` per layer (kept in
    ``state_dict``), as ``u^T W v`` with ``u, v`` held constant, so its gradient is ``u v^T``.
    """

    name = "spectral"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``spectral``."""

        strength: float = 1e-4
        """lambda in lambda * sum_l (sigma_max(W_l)^k - 1)^2."""
        power: float = 2.0
        """k: the exponent of sigma_max in the penalty."""
        iterations: int = 1
        """Power-iteration steps per training step (the vectors persist, so one step keeps tracking sigma_max)."""
        include_output: bool = True
        """Also regularise the last Linear/Conv layer (the output head)."""
        seed: int | None = None
        """Seed of the generator of the initial power-iteration vectors; None derives it from the run's seed."""

        def validate(self) -> None:
            """Raise ConfigError for impossible values."""
            _check_finite_nonnegative("strength", self.strength)
            finite = math.isfinite(self.power) and self.power > 0
            require(finite, f"power must be a finite number > 0, got {self.power}")
            require(self.iterations >= 1, f"iterations must be a positive integer, got {self.iterations}")
            _check_seed(self.seed)

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()
        self.generator = MethodGenerator()
        self.vectors: list[torch.Tensor] | None = None
        self.last_sigmas: list[float] = []

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Draw a random unit vector ``u`` per layer from the method's generator."""
        self.generator.reset(self.method_seed(self.config.seed))
        generator = self.generator.get("cpu")
        self.vectors = []
        for layer in _selected_layers(model, self.config.include_output):
            u = torch.randn(layer.weight.shape[0], generator=generator, dtype=torch.float64)
            self.vectors.append(u / u.norm())

    def sigmas(self, model: nn.Module) -> list[torch.Tensor]:
        """Differentiable ``sigma_max`` estimates ``u^T W v`` of the selected layers, advancing the power iteration."""
        if self.vectors is None:
            raise RuntimeError("spectral has no power-iteration vectors yet: call attach(model, optimizer) first")
        layers = _selected_layers(model, self.config.include_output)
        if len(layers) != len(self.vectors):
            raise ValueError(
                f"spectral: the model has {len(layers)} regularised layers, attach() saw {len(self.vectors)}; "
                "call attach() again after changing the model"
            )
        sigmas = []
        for i, layer in enumerate(layers):
            w = weight_matrix(layer)
            u0 = self.vectors[i].to(device=w.device, dtype=w.dtype)
            u, v = power_iteration(w, u0, self.config.iterations)
            self.vectors[i] = u.detach().to(device="cpu", dtype=torch.float64)
            sigmas.append(u @ w @ v)
        self.last_sigmas = [float(s.detach()) for s in sigmas]
        return sigmas

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """``strength * sum_l (sigma_l^k - 1)^2`` (None when strength is 0)."""
        if self.config.strength == 0:
            return None
        return self.config.strength * spectral_penalty(self.sigmas(model), self.config.power)

    def state_dict(self) -> dict:
        """The persistent power-iteration vectors and the generator."""
        vectors = None if self.vectors is None else [u.clone() for u in self.vectors]
        return {"vectors": vectors, "generator": self.generator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        vectors = state.get("vectors")
        self.vectors = None if vectors is None else [u.clone() for u in vectors]
        self.generator.load_state_dict(state.get("generator", {}))


# ---------------------------------------------------------------------------------------------- periodic resets


def _unit_group_of(model: nn.Module) -> dict[int, UnitGroup]:
    """id(incoming layer) -> its unit group (for the activation gain and the norm), empty for non-Sequential models."""
    try:
        return {id(g.incoming): g for g in find_unit_groups(model)}
    except ValueError:
        return {}


@torch.no_grad()
def reset_layers_(
    model: nn.Module, layers: list[nn.Module], generator: torch.Generator, init: str, bias: str
) -> tuple[list[torch.Tensor], int]:
    """Re-draw every weight and bias of ``layers`` (and reset their per-unit norm layer); returns (params, units).

    Weights follow ``init`` (see :func:`lopkit.mitigations.layers.reinit_incoming`, gain from the activation
    that follows the layer), biases ``bias``; a norm layer right after a reset layer gets weight 1, bias 0 and
    fresh running statistics.
    """
    groups = _unit_group_of(model)
    params: list[torch.Tensor] = []
    units = 0
    for layer in layers:
        group = groups.get(id(layer)) or UnitGroup(incoming=layer, outgoing=None)
        units += reinit_incoming(group, torch.ones(group.num_units, dtype=torch.bool), generator, init=init, bias=bias)
        params += [p for p in (layer.weight, layer.bias) if p is not None]
        if group.norm is not None:
            _reset_norm(group.norm)
            params += [p for p in group.norm.parameters(recurse=False)]
    return params, units


def _reset_norm(norm: nn.Module) -> None:
    """A fresh normalisation layer: affine weight 1, bias 0, running statistics reset (no randomness)."""
    if hasattr(norm, "reset_parameters"):
        norm.reset_parameters()


@register_method
class PeriodicReset(Mitigation):
    """Full, layer or head resets (Nikishin et al. 2022): periodic re-initialisation plus an optimizer-state reset.

    ``scope=head`` resets the last Linear/Conv layer, ``scope=layers`` the last ``layers`` of them, ``scope=full``
    all of them (and every normalisation layer). Every ``every`` optimizer steps (0: never) and, with
    ``at_task_start``, at every task start after the first.
    """

    name = "reset"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``reset``."""

        scope: Literal["full", "layers", "head"] = "head"
        """What is reset: every weight layer, the last ``layers`` weight layers, or the last one."""
        layers: int = 1
        """scope=layers: how many of the last Linear/Conv layers are reset."""
        every: int = 1000
        """Reset after every ``every``-th optimizer step; 0 disables the step schedule."""
        at_task_start: bool = False
        """Also reset at every task start (task 0 excepted)."""
        init: str = "default"
        """Law of the new weights: one of lopkit's init schemes (default: PyTorch's U(+-1/sqrt(fan_in)))."""
        bias_init: Literal["zero", "default"] = "default"
        """New biases: zero, or PyTorch's default U(+-1/sqrt(fan_in)) (a fresh network's biases)."""
        reset_optimizer: bool = True
        """Forget the optimizer state (moments and step count) of the reset parameters."""
        seed: int | None = None
        """Seed of the generator of the new weights; None derives it from the run's seed."""

        def validate(self) -> None:
            """Raise ConfigError for impossible values."""
            require(self.scope in ("full", "layers", "head"), f"scope must be full, layers or head, got {self.scope!r}")
            require(self.layers >= 1, f"layers must be a positive integer, got {self.layers}")
            require(self.every >= 0, f"every must be >= 0 (0: no step schedule), got {self.every}")
            require(self.init in INIT_SCHEMES, f"init must be one of {', '.join(INIT_SCHEMES)}, got {self.init!r}")
            require(self.bias_init in ("zero", "default"), f"bias_init must be zero or default, got {self.bias_init!r}")
            _check_seed(self.seed)

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()
        self.generator = MethodGenerator()
        self.steps = 0
        self.resets = 0
        self.total_replaced = 0

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Restart the step counter and the generator; ConfigError if the model has too few weight layers."""
        count = len(weight_layers(model))
        needed = self.config.layers if self.config.scope == "layers" else 1
        if count < needed:
            raise ConfigError(
                f"reset: scope={self.config.scope} needs {needed} Linear/Conv layers, the model has {count}"
            )
        self.steps = self.resets = self.total_replaced = 0
        self.generator.reset(self.method_seed(self.config.seed))

    def target_layers(self, model: nn.Module) -> list[nn.Module]:
        """The Linear/Conv layers this scope resets, in module order."""
        layers = weight_layers(model)
        if self.config.scope == "full":
            return layers
        return layers[-(self.config.layers if self.config.scope == "layers" else 1):]

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Reset the scope now (and, for scope=full, every normalisation layer), with its optimizer state."""
        generator = self.generator.get("cpu")
        layers = self.target_layers(model)
        params, units = reset_layers_(model, layers, generator, self.config.init, self.config.bias_init)
        if self.config.scope == "full":
            for module in model.modules():
                if is_norm_module(module):
                    _reset_norm(module)
                    params += list(module.parameters(recurse=False))
        if self.config.reset_optimizer:
            clear_optimizer_state(optimizer, params)
        self.resets += 1
        self.total_replaced += units

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Reset after every ``every``-th step."""
        self.steps += 1
        if self.config.every and self.steps % self.config.every == 0:
            self.apply(model, optimizer)

    def on_task_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, task: int) -> None:
        """With ``at_task_start``, reset at every task boundary after the first task."""
        if self.config.at_task_start and task > 0:
            self.apply(model, optimizer)

    def state_dict(self) -> dict:
        """Counters and generator state."""
        return {"steps": self.steps, "resets": self.resets, "total_replaced": self.total_replaced,
                "generator": self.generator.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.steps = int(state.get("steps", 0))
        self.resets = int(state.get("resets", 0))
        self.total_replaced = int(state.get("total_replaced", 0))
        self.generator.load_state_dict(state.get("generator", {}))


# ---------------------------------------------------------------------------------------------- Hare & Tortoise


@register_method
class HareTortoise(Mitigation):
    """Hare & Tortoise (Lee et al. 2024): a slow EMA copy (tortoise) of the trained net (hare); the hare is reset to it.

    After every step ``theta_T <- tau * theta_T + (1 - tau) * theta_H``; after every ``every``-th step (and, with
    ``at_task_start``, at each task start after the first) ``theta_H <- theta_T``.
    """

    name = "hare_tortoise"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``hare_tortoise``."""

        tau: float = 0.999
        """EMA coefficient of the tortoise: theta_T <- tau*theta_T + (1-tau)*theta_H."""
        every: int = 1000
        """Reset the hare to the tortoise after every ``every``-th step; 0 disables the step schedule."""
        at_task_start: bool = False
        """Also reset the hare at every task start (task 0 excepted)."""
        reset_optimizer: bool = True
        """Forget the optimizer state (moments and step count) of the hare at each reset."""

        def validate(self) -> None:
            """Raise ConfigError for impossible values."""
            require(math.isfinite(self.tau) and 0.0 <= self.tau < 1.0, f"tau must be in [0, 1), got {self.tau}")
            require(self.every >= 0, f"every must be >= 0 (0: no step schedule), got {self.every}")

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()
        self.tortoise: dict[str, torch.Tensor] | None = None
        self.steps = 0
        self.resets = 0

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The tortoise starts as a copy of the hare's parameters."""
        self.tortoise = {name: p.detach().clone() for name, p in model.named_parameters()}
        self.steps = self.resets = 0

    def _require(self) -> dict[str, torch.Tensor]:
        if self.tortoise is None:
            raise RuntimeError("hare_tortoise has no tortoise yet: call attach(model, optimizer) first")
        return self.tortoise

    @torch.no_grad()
    def reset_hare(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Copy the tortoise into the hare (and forget the hare's optimizer state if configured)."""
        tortoise = self._require()
        params = []
        for name, p in model.named_parameters():
            p.copy_(tortoise[name].to(device=p.device, dtype=p.dtype))
            params.append(p)
        if self.config.reset_optimizer:
            clear_optimizer_state(optimizer, params)
        self.resets += 1

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Update the tortoise; reset the hare to it after every ``every``-th step."""
        tortoise = self._require()
        for name, p in model.named_parameters():
            if tortoise[name].device != p.device:  # a state loaded on the CPU (map_location) follows the model
                tortoise[name] = tortoise[name].to(p.device)
            tortoise[name].mul_(self.config.tau).add_(p.detach(), alpha=1 - self.config.tau)
        self.steps += 1
        if self.config.every and self.steps % self.config.every == 0:
            self.reset_hare(model, optimizer)

    def on_task_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, task: int) -> None:
        """With ``at_task_start``, reset the hare at every task boundary after the first task."""
        if self.config.at_task_start and task > 0:
            self.reset_hare(model, optimizer)

    def state_dict(self) -> dict:
        """The tortoise's parameters (CPU) and the counters."""
        tortoise = None if self.tortoise is None else {k: v.detach().cpu().clone() for k, v in self.tortoise.items()}
        return {"tortoise": tortoise, "steps": self.steps, "resets": self.resets}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        tortoise = state.get("tortoise")
        self.tortoise = None if tortoise is None else {k: v.detach().clone() for k, v in tortoise.items()}
        self.steps = int(state.get("steps", 0))
        self.resets = int(state.get("resets", 0))


# ---------------------------------------------------------------------------------------------- UPGD


def upgd_gate(corrected_utilities: list[torch.Tensor]) -> list[torch.Tensor]:
    """``sigmoid(u / max u)`` with the max over every weight of the network (UPGD's global scaling; 0 if max is 0)."""
    if not corrected_utilities:
        return []
    top = torch.stack([u.max() for u in corrected_utilities]).max()
    if float(top) == 0.0:
        return [torch.sigmoid(torch.zeros_like(u)) for u in corrected_utilities]
    return [torch.sigmoid(u / top) for u in corrected_utilities]


@register_method
class UPGD(Mitigation):
    """Utility-based perturbed gradient descent (Elsayed & Mahmood 2024), global first-order utility.

    Before each step, every gradient ``g`` of a weight ``w`` is replaced by ``(g + xi) * (1 - s)`` (plus
    ``weight_decay * w``), where ``u <- beta*u + (1-beta)*(-g*w)``, ``s = sigmoid(u_hat / max u_hat)`` with the
    bias-corrected ``u_hat = u / (1 - beta^t)`` and ``xi ~ N(0, sigma^2)``. With plain SGD at learning rate
    ``alpha`` the optimizer's step is then exactly UPGD's ``w <- w - alpha (g + xi)(1 - s)``.
    """

    name = "upgd"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``upgd``."""

        sigma: float = 1e-3
        """Std of the Gaussian perturbation xi added to each gradient entry."""
        beta_utility: float = 0.999
        """EMA coefficient of the utility trace."""
        weight_decay: float = 0.0
        """Coupled weight decay added to the gated gradient (w <- w - alpha*(gated + wd*w))."""
        seed: int | None = None
        """Seed of the noise generator; None derives it from the run's seed."""

        def validate(self) -> None:
            """Raise ConfigError for impossible values."""
            _check_finite_nonnegative("sigma", self.sigma)
            _check_finite_nonnegative("weight_decay", self.weight_decay)
            require(0.0 <= self.beta_utility < 1.0, f"beta_utility must be in [0, 1), got {self.beta_utility}")
            _check_seed(self.seed)

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()
        self.noise = MethodGenerator()
        self.utilities: dict[str, torch.Tensor] = {}
        self.t = 0

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Zero utility traces, t = 0, a fresh noise stream."""
        self.utilities = {name: torch.zeros_like(p, memory_format=torch.contiguous_format).detach()
                          for name, p in model.named_parameters() if p.requires_grad}  # fmt: skip
        self.t = 0
        self.noise.reset(self.method_seed(self.config.seed))

    @torch.no_grad()
    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Update the utilities from this step's gradients and replace each gradient by UPGD's gated, noisy one."""
        named = [(name, p) for name, p in model.named_parameters() if p.grad is not None and name in self.utilities]
        if not named:
            return
        self.t += 1
        beta = self.config.beta_utility
        correction = 1.0 - beta**self.t
        corrected = []
        for name, p in named:
            trace = self.utilities[name]
            trace.mul_(beta).add_(-p.grad * p, alpha=1 - beta)
            corrected.append(trace / correction)
        gates = upgd_gate(corrected)
        generator = self.noise.get("cpu") if self.config.sigma > 0 else None
        for (name, p), gate in zip(named, gates):
            update = p.grad.clone()
            if generator is not None:
                update.add_(_randn_like(p.grad, generator), alpha=self.config.sigma)
            update.mul_(1.0 - gate)
            if self.config.weight_decay:
                update.add_(p, alpha=self.config.weight_decay)
            p.grad.copy_(update)

    def state_dict(self) -> dict:
        """Utility traces (CPU), t and the noise generator."""
        return {"utilities": {k: v.detach().cpu().clone() for k, v in self.utilities.items()}, "t": self.t,
                "noise": self.noise.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (onto the devices of the attached model's traces)."""
        saved = state.get("utilities", {})
        for name, value in saved.items():
            device = self.utilities[name].device if name in self.utilities else value.device
            self.utilities[name] = value.detach().clone().to(device)
        self.t = int(state.get("t", 0))
        self.noise.load_state_dict(state.get("noise", {}))


# ---------------------------------------------------------------------------------------------- InFeR


def _strip_hooks(model: nn.Module) -> None:
    """Remove every forward hook of a copied model (other methods' statistics must not see the copy's forwards)."""
    for module in model.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
        for name in ("_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            table = getattr(module, name, None)
            if table is not None:
                table.clear()


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``module.state_dict()``."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class _InputCapture:
    """Forward pre-hooks recording the model's last training input and the features entering its last layer."""

    def __init__(self, model: nn.Module, last: nn.Module):
        self.inputs: tuple | None = None
        self.features: torch.Tensor | None = None
        self._handles = [
            model.register_forward_pre_hook(self._on_input),
            last.register_forward_pre_hook(self._on_features),
        ]
        self._model = model

    def _on_input(self, module: nn.Module, args: tuple) -> None:
        if module.training:
            self.inputs = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)

    def _on_features(self, module: nn.Module, args: tuple) -> None:
        if self._model.training:
            self.features = args[0]

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


@register_method
class InFeR(Mitigation):
    """InFeR (Lyle et al. 2022): linear heads on the features keep regressing the initial network's head outputs.

    ``loss = strength * mean_{batch, heads} (H phi_theta(x) - scale * H_0 phi_0(x))^2``: ``phi`` are the features
    entering the model's last Linear layer, ``H`` the trainable auxiliary heads (added to the optimizer as a new
    parameter group, initialised as ``H_0``), ``phi_0, H_0`` the network and heads at ``attach``, frozen.
    """

    needs_autograd_step = True  # reads the training step's graph or trains parameters outside the model

    name = "infer"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``infer``."""

        heads: int = 10
        """Number of auxiliary linear outputs k."""
        strength: float = 0.1
        """Weight of the auxiliary regression loss."""
        target_scale: float = 1.0
        """Multiplier of the frozen initial outputs (the regression target)."""
        seed: int | None = None
        """Seed of the auxiliary heads' initial weights; None derives it from the run's seed."""

        def validate(self) -> None:
            """Raise ConfigError for impossible values."""
            require(self.heads >= 1, f"heads must be a positive integer, got {self.heads}")
            _check_finite_nonnegative("strength", self.strength)
            require(math.isfinite(self.target_scale), f"target_scale must be finite, got {self.target_scale}")
            _check_seed(self.seed)

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()
        self.generator = MethodGenerator()
        self.head: nn.Linear | None = None
        self.initial_head: nn.Linear | None = None
        self.frozen: nn.Module | None = None
        self._frozen_last: nn.Module | None = None
        self._capture: _InputCapture | None = None
        self._frozen_features: torch.Tensor | None = None

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Freeze a copy of the network, build the heads (seeded) and add them to the optimizer."""
        if self._capture is not None:
            self._capture.remove()
        layers = weight_layers(model)
        if not layers or not isinstance(layers[-1], nn.Linear):
            raise ConfigError("infer needs a model whose last weight layer is an nn.Linear (its input: the features)")
        last = layers[-1]
        self.frozen = copy.deepcopy(model)
        _strip_hooks(self.frozen)
        self.frozen.eval()
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        self._frozen_last = weight_layers(self.frozen)[-1]
        self._frozen_last.register_forward_pre_hook(self._on_frozen_features)
        self.generator.reset(self.method_seed(self.config.seed))
        generator = self.generator.get("cpu")
        width = last.in_features
        bound = 1.0 / math.sqrt(width)  # PyTorch's default Linear law, drawn from the method's generator
        weight = (torch.rand((self.config.heads, width), generator=generator, dtype=torch.float64) * 2 - 1) * bound
        bias = (torch.rand((self.config.heads,), generator=generator, dtype=torch.float64) * 2 - 1) * bound
        device, dtype = last.weight.device, last.weight.dtype
        self.head = nn.Linear(width, self.config.heads, device=device, dtype=dtype)
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)
        self.initial_head = copy.deepcopy(self.head).requires_grad_(False)
        if optimizer is not None:
            optimizer.add_param_group({"params": list(self.head.parameters())})
        self._capture = _InputCapture(model, last)

    def _on_frozen_features(self, module: nn.Module, args: tuple) -> None:
        self._frozen_features = args[0]

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """The auxiliary regression loss on the last training batch (None before any training forward)."""
        if self._capture is None or self.head is None:
            raise RuntimeError("infer has no heads yet: call attach(model, optimizer) before training")
        if self.config.strength == 0 or self._capture.inputs is None or self._capture.features is None:
            return None
        with torch.no_grad():
            self.frozen(*self._capture.inputs)
            target = self.config.target_scale * self.initial_head(self._frozen_features)
        prediction = self.head(self._capture.features)
        self._capture.inputs = self._capture.features = self._frozen_features = None
        return self.config.strength * (prediction - target).pow(2).mean()

    def state_dict(self) -> dict:
        """The frozen network, both heads (CPU) and the generator."""
        if self.head is None:
            return {}
        cpu = _cpu_state
        return {"frozen": cpu(self.frozen), "head": cpu(self.head), "initial_head": cpu(self.initial_head),
                "generator": self.generator.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (after :meth:`attach`, which built the modules)."""
        if not state:
            return
        if self.head is None:
            raise RuntimeError("infer: call attach(model, optimizer) before load_state_dict")
        self.frozen.load_state_dict(state["frozen"])
        with torch.no_grad():
            for module, key in ((self.head, "head"), (self.initial_head, "initial_head")):
                for name, value in module.state_dict().items():
                    value.copy_(state[key][name])
        self.generator.load_state_dict(state.get("generator", {}))


# ---------------------------------------------------------------------------------------------- C-CHAIN


def _hook_free_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without forward hooks, in eval mode and without gradients (a functional template)."""
    template = copy.deepcopy(model)
    _strip_hooks(template)
    template.eval()
    for p in template.parameters():
        p.requires_grad_(False)
    return template


@register_method
class CChain(Mitigation):
    """C-CHAIN (Tang et al. 2025), supervised port: penalise the churn of the last update on a reference batch.

    ``loss = strength * mean (f_theta(x_ref) - f_theta-(x_ref))^2``: ``theta-`` are the parameters before the last
    optimizer step (snapshot in ``before_step``), ``x_ref`` the inputs of the current training batch (which did
    not take part in the last update). Both outputs come from a hook-free copy of the network in eval mode
    (``torch.func.functional_call``), so other methods' statistics never see the reference forwards.
    """

    needs_autograd_step = True  # reads the training step's graph or trains parameters outside the model

    name = "cchain"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``cchain``."""

        strength: float = 0.1
        """lambda: weight of the churn-reduction loss (fixed; see the docs page for the paper's adaptive one)."""

        def validate(self) -> None:
            """Raise ConfigError for a negative or non-finite strength."""
            _check_finite_nonnegative("strength", self.strength)

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()
        self.previous: dict[str, torch.Tensor] | None = None
        self.last_churn: float = float("nan")
        self._template: nn.Module | None = None
        self._capture: _InputCapture | None = None

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Build the functional template and the input capture; no snapshot yet (no churn on the first step)."""
        if self._capture is not None:
            self._capture.remove()
        self._template = _hook_free_copy(model)
        layers = weight_layers(model)
        self._capture = _InputCapture(model, layers[-1] if layers else model)
        self.previous = None

    def on_task_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, task: int) -> None:
        """Forget the snapshot: the task change (e.g. a head reset) is not churn to undo."""
        self.previous = None

    @torch.no_grad()
    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Snapshot the parameters the coming update starts from (theta-)."""
        self.previous = {name: p.detach().clone() for name, p in model.named_parameters()}

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """``strength * mean (f_theta(x_ref) - f_theta-(x_ref))^2`` (None on a first step or before a forward)."""
        if self._capture is None:
            raise RuntimeError("cchain: call attach(model, optimizer) before training")
        inputs, self._capture.inputs = self._capture.inputs, None
        if self.config.strength == 0 or self.previous is None or inputs is None:
            return None
        buffers, params = dict(model.named_buffers()), dict(model.named_parameters())
        current = torch.func.functional_call(self._template, {**params, **buffers}, inputs)
        # a snapshot loaded on the CPU (map_location) follows the parameters' device
        previous = {k: v.to(params[k].device) if k in params else v for k, v in self.previous.items()}
        with torch.no_grad():
            before = torch.func.functional_call(self._template, {**previous, **buffers}, inputs)
        churn = (current - before).pow(2).mean()
        self.last_churn = float(churn.detach())
        return self.config.strength * churn

    def state_dict(self) -> dict:
        """The snapshot theta- (CPU)."""
        previous = None if self.previous is None else {k: v.detach().cpu().clone() for k, v in self.previous.items()}
        return {"previous": previous}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        previous = state.get("previous")
        self.previous = None if previous is None else {k: v.detach().clone() for k, v in previous.items()}


# ---------------------------------------------------------------------------------------------- plasticity injection


def _default_linear_draw(layer: nn.Linear, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias drawn from PyTorch's default Linear law U(+-1/sqrt(fan_in)) with ``generator`` (float64, CPU)."""
    bound = 1.0 / math.sqrt(layer.in_features)
    weight = (torch.rand(tuple(layer.weight.shape), generator=generator, dtype=torch.float64) * 2 - 1) * bound
    if layer.bias is None:
        return weight, None
    return weight, (torch.rand((layer.out_features,), generator=generator, dtype=torch.float64) * 2 - 1) * bound


@register_method
class PlasticityInjection(Mitigation):
    """Plasticity injection (Nikishin et al. 2023): freeze the head, add a fresh head minus a frozen copy of it.

    After the injection the output is ``h_frozen(phi) + h_new(phi) - h_new0(phi)``: unchanged at that moment
    (``h_new = h_new0``), while all further learning of the head goes through the fresh ``h_new``.
    """

    needs_autograd_step = True  # reads the training step's graph or trains parameters outside the model

    name = "injection"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``injection``."""

        when: Literal["task", "step"] = "task"
        """Inject at the start of task ``at``, or after optimizer step number ``at``."""
        at: int = 1
        """The task index (when=task) or the number of optimizer steps (when=step) at which to inject, once."""
        reset_optimizer: bool = True
        """Forget the optimizer state of the frozen head."""
        seed: int | None = None
        """Seed of the new head's weights; None derives it from the run's seed."""

        def validate(self) -> None:
            """Raise ConfigError for impossible values."""
            require(self.when in ("task", "step"), f"when must be task or step, got {self.when!r}")
            require(self.at >= 1, f"at must be a positive integer (task index or step count), got {self.at}")
            _check_seed(self.seed)

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()
        self.generator = MethodGenerator()
        self.injected = False
        self.steps = 0
        self.head: nn.Linear | None = None
        self.new: nn.Linear | None = None
        self.new0: nn.Linear | None = None
        self._handle = None

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Build the (not yet active) new head, add it to the optimizer and hook the model's last Linear layer."""
        if self._handle is not None:
            self._handle.remove()
        layers = weight_layers(model)
        if not layers or not isinstance(layers[-1], nn.Linear):
            raise ConfigError("injection needs a model whose last weight layer is an nn.Linear (the head)")
        self.head = layers[-1]
        w = self.head.weight
        self.new = nn.Linear(self.head.in_features, self.head.out_features, bias=self.head.bias is not None,
                             device=w.device, dtype=w.dtype)  # fmt: skip
        self.new.requires_grad_(False)  # no gradient, so the optimizer skips it until the injection
        self.new0 = copy.deepcopy(self.new)
        if optimizer is not None:
            optimizer.add_param_group({"params": list(self.new.parameters())})
        self._handle = self.head.register_forward_hook(self._add_injected)
        self.generator.reset(self.method_seed(self.config.seed))
        self.injected, self.steps = False, 0

    def _add_injected(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self.injected:
            return None
        return output + self.new(args[0]) - self.new0(args[0])

    @torch.no_grad()
    def inject(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Inject now: draw the new head (= its frozen copy), start training it and freeze the old head."""
        weight, bias = _default_linear_draw(self.new, self.generator.get("cpu"))
        for module in (self.new, self.new0):
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
        self.new.requires_grad_(True)
        self.head.requires_grad_(False)
        if self.config.reset_optimizer:
            clear_optimizer_state(optimizer, list(self.head.parameters()))
        self.injected = True

    def on_task_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, task: int) -> None:
        """when=task: inject at the start of task ``at``."""
        if self.config.when == "task" and task == self.config.at and not self.injected:
            self.inject(optimizer)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """when=step: inject after the ``at``-th optimizer step."""
        self.steps += 1
        if self.config.when == "step" and self.steps == self.config.at and not self.injected:
            self.inject(optimizer)

    def state_dict(self) -> dict:
        """Whether injected, the step counter, both new heads (CPU) and the generator."""
        if self.new is None:
            return {}
        return {"injected": self.injected, "steps": self.steps, "new": _cpu_state(self.new),
                "new0": _cpu_state(self.new0), "generator": self.generator.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (after :meth:`attach`), including which head trains."""
        if not state:
            return
        if self.new is None:
            raise RuntimeError("injection: call attach(model, optimizer) before load_state_dict")
        with torch.no_grad():
            for module, key in ((self.new, "new"), (self.new0, "new0")):
                for name, value in module.state_dict().items():
                    value.copy_(state[key][name])
        self.injected, self.steps = bool(state["injected"]), int(state["steps"])
        self.new.requires_grad_(self.injected)
        self.head.requires_grad_(not self.injected)
        self.generator.load_state_dict(state.get("generator", {}))


# ---------------------------------------------------------------------------------------------- FIRE


def newton_schulz(w: torch.Tensor, iterations: int) -> torch.Tensor:
    """``iterations`` cubic Newton-Schulz steps ``X <- 1.5 X - 0.5 X X^T X`` from ``X = W / ||W||_F``.

    The singular values of X (all <= 1 after the scaling) go to 1 and the singular vectors stay: the limit is the
    orthogonal polar factor ``U V^T`` of W, the (semi-)orthogonal matrix nearest to W in Frobenius norm. Zero
    singular values stay 0. Computed in float64 on the smaller Gram side.
    """
    x = w.detach().to(torch.float64)
    transpose = x.shape[0] > x.shape[1]
    if transpose:
        x = x.transpose(0, 1)
    norm = torch.linalg.matrix_norm(x)
    if float(norm) == 0.0:
        return torch.zeros_like(w)
    x = x / norm
    for _ in range(iterations):
        x = 1.5 * x - 0.5 * (x @ x.transpose(0, 1)) @ x
    if transpose:
        x = x.transpose(0, 1)
    return x.to(dtype=w.dtype)


@register_method
class FIRE(Mitigation):
    """FIRE (Han et al. 2026): at a task boundary, replace each weight by its Newton-Schulz orthogonalisation.

    ``W <- scale * NS(W)``, NS the cubic Newton-Schulz iteration (:func:`newton_schulz`), for each selected
    Linear/Conv weight (conv filters as ``(out, in * k...)`` matrices); biases are kept.
    """

    name = "fire"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``fire``."""

        iterations: int = 30
        """Newton-Schulz steps (the singular values converge to 1 from any positive start; small ones need more)."""
        scale: float = 1.0
        """Every non-zero singular value of the new weight (1: an isometry on the weight's range)."""
        include_output: bool = False
        """Also orthogonalise the last Linear/Conv layer (the output head)."""
        first_task: bool = False
        """Also apply at the start of task 0."""
        reset_optimizer: bool = True
        """Forget the optimizer state of the orthogonalised weights."""

        def validate(self) -> None:
            """Raise ConfigError for impossible values."""
            require(self.iterations >= 1, f"iterations must be a positive integer, got {self.iterations}")
            finite = math.isfinite(self.scale) and self.scale > 0
            require(finite, f"scale must be a finite number > 0, got {self.scale}")

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()
        self.applications = 0

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Reset the counter."""
        self.applications = 0

    @torch.no_grad()
    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Orthogonalise the selected weights now."""
        params = []
        for layer in _selected_layers(model, self.config.include_output):
            matrix = newton_schulz(weight_matrix(layer), self.config.iterations) * self.config.scale
            layer.weight.copy_(matrix.reshape(layer.weight.shape))
            params.append(layer.weight)
        if self.config.reset_optimizer:
            clear_optimizer_state(optimizer, params)
        self.applications += 1

    def on_task_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, task: int) -> None:
        """Apply at every task start (task 0 only with ``first_task``)."""
        if task > 0 or self.config.first_task:
            self.apply(model, optimizer)

    def state_dict(self) -> dict:
        """The application counter (FIRE is deterministic)."""
        return {"applications": self.applications}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.applications = int(state.get("applications", 0))


# ---------------------------------------------------------------------------------------------- ReGraMa

#: What GraMa's gradient magnitude is taken of (``ReGraMaConfig.gradient``).
GRAMA_GRADIENTS: tuple[str, ...] = ("weights", "pre_activation", "post_activation")


def grama_weight_magnitude(weight_grad: torch.Tensor) -> torch.Tensor:
    """Per unit, the mean of ``|dL/dW|`` over its incoming weights (Linear row / conv filter ``i``), in float64.

    The numerator of GraMa's score as the authors' code computes it (Liu et al. 2025, ``GradientReDo``:
    ``weight.grad.abs().mean(dim=1)``, conv filters over ``(in, *kernel)``).
    """
    g = weight_grad.detach().abs().double()
    return g.reshape(g.shape[0], -1).mean(dim=1)


def grama_scores(magnitudes: torch.Tensor) -> torch.Tensor:
    """GraMa scores ``G_i = m_i / mean_k m_k`` of one layer's per-unit gradient magnitudes (0 everywhere if all are 0)."""
    return dormant_scores(magnitudes.reshape(1, -1))


@dataclasses.dataclass
class ReGraMaConfig(ReDoConfig):
    """ReGraMa hyper-parameters: the paper's tau (0.01) and period (1000 steps), scored on the current batch."""

    tau: float = 0.01
    """GraMa threshold: a unit with score <= tau is reset (the paper's recommended 0.01; its MLP-SAC runs used 0)."""
    window_steps: int = 1
    """Steps before each check whose gradients are scored (1: the batch of the check step, as the paper)."""
    gradient: str = "weights"
    """What the gradient magnitude is taken of: ``weights`` (the unit's incoming weights, the authors' code),
    ``pre_activation`` (the unit's input to its activation, dL/dz) or ``post_activation`` (its output, dL/dh,
    the paper's Eq. 2 read literally; a dead ReLU unit still gets a non-zero dL/dh)."""

    def validate(self) -> None:
        """Raise ConfigError for impossible values."""
        super().validate()
        require(self.gradient in GRAMA_GRADIENTS,
                f"gradient must be one of {', '.join(GRAMA_GRADIENTS)}, got {self.gradient!r}")  # fmt: skip


@register_method
class ReGraMa(ReDo):
    """ReGraMa (Liu et al. 2025): ReDo's periodic recycling, with dormancy measured on gradients (GraMa).

    Every ``every`` steps, each hidden unit gets the score ``G_i = m_i / mean_k m_k`` (:func:`grama_scores`) of its
    gradient magnitude ``m_i`` over the last ``window_steps`` training steps, and units with ``G_i <= tau`` are reset
    as in ``redo`` (fresh incoming weights, zero outgoing weights, zeroed optimizer state). ``m_i`` follows
    ``config.gradient``: ``weights`` (default, the authors' code): the mean ``|dL/dW_ij|`` over the unit's incoming
    weights (:func:`grama_weight_magnitude`), read from ``weight.grad`` after each step in the window and averaged
    over those steps; ``pre_activation`` / ``post_activation``: the mean over samples of ``|dL/dz_i|`` / ``|dL/dh_i|``,
    read by tensor hooks on the training forwards. A dead ReLU unit has zero weight and pre-activation gradients,
    but not a zero ``dL/dh``, so only the first two find the dead units ReDo finds (the paper's Sec. 4.2 claim).
    """

    needs_autograd_step = True  # reads the training step's graph or trains parameters outside the model

    name = "regrama"
    Config = ReGraMaConfig

    def _new_group_state(self, group: UnitGroup) -> dict:
        state = super()._new_group_state(group)
        state["sum_abs_grad"] = torch.zeros_like(state["sum_abs"])
        state["grad_count"] = 0  # steps (weights) or samples (pre/post_activation) summed into sum_abs_grad
        return state

    def _after_attach(self) -> None:
        super()._after_attach()
        self._grad_handles = []
        if self.config.gradient != "weights":
            pre = self.config.gradient == "pre_activation"
            self._grad_handles = [
                (group.pre_activation_module if pre else group.output_module).register_forward_hook(
                    self._make_grad_hook(index))
                for index, group in enumerate(self.groups)
            ]  # fmt: skip

    def detach(self) -> None:
        """Remove the forward hooks and the gradient hooks."""
        super().detach()
        for handle in getattr(self, "_grad_handles", []):
            handle.remove()
        self._grad_handles = []

    def _make_grad_hook(self, index: int):
        group = self.groups[index]

        def hook(module: nn.Module, _inputs, output) -> None:
            capturing = self.capture is not None and self.capture.enabled
            if module.training and capturing and isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda grad: self._on_gradient(index, group.to_unit_matrix(grad.detach())))

        return hook

    def _on_gradient(self, index: int, g: torch.Tensor) -> None:
        state = self.stats[index]
        state["sum_abs_grad"] += g.double().abs().sum(dim=0).to(state["sum_abs_grad"].device)
        state["grad_count"] += g.shape[0]

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """In the window, add each unit's incoming-weight gradient magnitude (``gradient=weights``); then as ``redo``."""
        self._require_attached()
        if self.config.gradient == "weights" and self._in_window(step):
            for index, group in enumerate(self.groups):
                grad = group.incoming.weight.grad
                if grad is None:  # the layer took no part in this step's loss: no evidence either way
                    continue
                state = self.stats[index]
                state["sum_abs_grad"] += grama_weight_magnitude(grad).to(state["sum_abs_grad"].device)
                state["grad_count"] += 1
        super().after_step(model, optimizer, step)

    def scores(self, index: int) -> torch.Tensor:
        """GraMa scores of group ``index`` on the gradients collected so far (NaN without data)."""
        state = self.stats[index]
        if state["grad_count"] == 0:
            return torch.full((self.groups[index].num_units,), float("nan"), dtype=torch.float64)
        return grama_scores(state["sum_abs_grad"] / state["grad_count"]).cpu()

    def dormant_mask(self, index: int) -> torch.Tensor:
        """Gradient-dormant (GraMa) units of group ``index``: score <= tau (none without data)."""
        return self.scores(index) <= self.config.tau  # NaN compares False


# ---------------------------------------------------------------------------------------------- SNR


def snr_reset_mask(fires: torch.Tensor, samples: torch.Tensor, silent: torch.Tensor, threshold: float,
                   maturity: int) -> torch.Tensor:  # fmt: skip
    """Units whose current silent run is implausible under their own firing rate: ``(1 - p)^a < threshold``.

    ``p = fires / samples`` since the unit's last reset, ``a`` the number of samples since it last fired; only
    units with ``samples >= maturity`` are tested; a mature unit that never fired (p = 0) is always reset.
    """
    mature = samples >= maturity
    rate = fires / samples.clamp(min=1)
    never = mature & (fires == 0)
    log_plausibility = silent * torch.log1p(-rate.clamp(max=1.0))
    return never | (mature & (fires > 0) & (log_plausibility < math.log(threshold)))


@dataclasses.dataclass
class SNRConfig:
    """Hyper-parameters of ``snr``."""

    threshold: float = 1e-4
    """eta: reset when the probability (1-p)^a of the current silent run, under the unit's own rate p, is < eta."""
    maturity: int = 1000
    """Samples a unit must have seen since its last reset before it is tested."""
    init: str = "default"
    """Law of the new incoming weights (one of lopkit's init schemes)."""
    bias_init: str = "zero"
    """New biases: zero or default."""
    reset_optimizer: bool = True
    """Zero the reset units' optimizer-state entries."""
    seed: int | None = None
    """Seed of the generator of the new weights; None derives it from the run's seed."""

    def validate(self) -> None:
        """Raise ConfigError for impossible values."""
        require(0.0 < self.threshold < 1.0, f"threshold must be in (0, 1), got {self.threshold}")
        require(self.maturity >= 1, f"maturity must be a positive number of samples, got {self.maturity}")
        require(self.init in INIT_SCHEMES, f"init must be one of {', '.join(INIT_SCHEMES)}, got {self.init!r}")
        require(self.bias_init in ("zero", "default"), f"bias_init must be zero or default, got {self.bias_init!r}")
        _check_seed(self.seed)


def combine_snr_steps(state: dict, parts: torch.Tensor) -> dict:
    """SNR's record after one step whose batches, one per rank, are read as one batch in rank order.

    ``state`` holds the record before the step (``fires``, ``samples``, ``silent`` per unit); ``parts[r]`` stacks
    rank ``r``'s record of the step alone (its fires, samples and trailing silent run, which equals its samples when
    the unit never fired). The silent run ends at the last rank where the unit fired.
    """
    fires = state["fires"] + parts[:, 0].sum(dim=0)
    samples = state["samples"] + parts[:, 1].sum(dim=0)
    silent = state["silent"].clone()
    for rank_fires, rank_samples, rank_silent in parts:
        silent = torch.where(rank_fires > 0, rank_silent, silent + rank_samples)
    return {**state, "fires": fires, "samples": samples, "silent": silent}


@register_method
class SelfNormalizedResets(UnitMethod):
    """Self-normalised resets (Farias & Jozefiak 2025): reset a unit whose silence is implausible given its own rate.

    Per unit, since its last reset: samples seen, samples on which it fired (``h > 0``) and the length ``a`` of
    its current run of silent samples. After every step, a mature unit is reset when ``(1 - p)^a < threshold``
    (:func:`snr_reset_mask`), as in ``redo`` (fresh incoming weights, zero outgoing weights, zeroed optimizer state),
    and its statistics restart. Under DDP the ranks' batches of a step are read as one global batch in rank order
    (:func:`combine_snr_steps`), so every rank takes the same decision.
    """

    name = "snr"
    Config = SNRConfig

    def _new_group_state(self, group: UnitGroup) -> dict:
        units, device = group.num_units, group.incoming.weight.device
        zeros = lambda: torch.zeros(units, dtype=torch.float64, device=device)  # noqa: E731
        return {"fires": zeros(), "samples": zeros(), "silent": zeros()}

    @torch.no_grad()
    def _on_activation(self, index: int, kind: str, m: torch.Tensor) -> None:
        if self._rank_group is not None:  # DDP: this step's record, combined over the ranks in after_step
            if self._step_record[index] is None:
                self._step_record[index] = self._new_group_state(self.groups[index])
            state = self._step_record[index]
        else:
            state = self.stats[index]
        fired = m > 0
        batch = m.shape[0]
        positions = torch.arange(1, batch + 1, device=m.device, dtype=torch.float64).unsqueeze(1)
        last = (positions * fired).amax(dim=0).to(state["silent"].device)  # 1-based, 0 if silent on the whole batch
        any_fired = fired.any(dim=0).to(state["silent"].device)
        state["silent"] = torch.where(any_fired, batch - last, state["silent"] + batch)
        state["fires"] += fired.sum(dim=0).to(state["fires"])
        state["samples"] += batch

    def reset_mask(self, index: int) -> torch.Tensor:
        """The units of group ``index`` that fail the test now."""
        state = self.stats[index]
        mask = snr_reset_mask(state["fires"], state["samples"], state["silent"], self.config.threshold,
                              self.config.maturity)  # fmt: skip
        return mask.cpu()

    def _after_attach(self) -> None:
        self._step_record: list[dict | None] = [None] * len(self.groups)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Test every unit and reset those that fail; their statistics restart from zero."""
        self._require_attached()
        for index in range(len(self.groups)):
            if self._rank_group is not None:
                record, self._step_record[index] = self._step_record[index], None
                if record is None:
                    record = self._new_group_state(self.groups[index])  # every rank must join the gather
                parts = gather_over_ranks(torch.stack([record["fires"], record["samples"], record["silent"]]),
                                          self._rank_group)
                self.stats[index] = combine_snr_steps(self.stats[index], parts)
            mask = self.reset_mask(index)
            if not bool(mask.any()):
                continue
            self._reset_units(index, mask, optimizer)
            state = self.stats[index]
            for key in ("fires", "samples", "silent"):
                state[key][mask.to(state[key].device)] = 0.0
            self.events += 1
