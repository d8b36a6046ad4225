"""Perturbation methods: Shrink & Perturb (``shrink_perturb``, Ash & Adams 2020) and the paper's ``noisy_sgd``.

Both draw their noise from a private :class:`torch.Generator` (:class:`MethodGenerator`) whose state is in
the method's ``state_dict``, so a resumed run draws exactly the same noise. It is seeded at ``attach`` with
:meth:`Mitigation.method_seed`: from ``config.seed`` if set, else from the run's seed (which every benchmark
hands over), so different run seeds get different noise and the same seed the same noise in every process.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Literal

import torch
from torch import nn

from lopkit.configs import require
from lopkit.layer_types import TRANSPOSED_CONVS, WEIGHT_LAYERS
from lopkit.mitigations.base import Mitigation
from lopkit.mitigations.registry import register_method

__all__ = [
    "MethodGenerator",
    "NoisySGD",
    "ShrinkPerturb",
    "add_relative_gradient_noise_",
    "init_noise",
    "noise_scale",
    "randn_like",
    "shrink_perturb_",
    "weight_layers",
]

#: Layers shrink-and-perturb and the field's methods act on: ``nn.Linear`` and every torch convolution.
WEIGHT_LAYER_TYPES: tuple[type[nn.Module], ...] = WEIGHT_LAYERS + TRANSPOSED_CONVS


class MethodGenerator:
    """A private torch.Generator for one mitigation: created on first use from a given seed, saved in ``state_dict``."""

    def __init__(self, seed: int = 0):
        self.base_seed = int(seed)
        self.seed: int | None = None
        self._generator: torch.Generator | None = None

    def reset(self, seed: int | None = None) -> None:
        """Forget the current stream; the next draw starts again from ``seed`` (default: the seed given before)."""
        if seed is not None:
            self.base_seed = int(seed)
        self.seed, self._generator = None, None

    def get(self, device: torch.device | str = "cpu") -> torch.Generator:
        """The generator, created on ``device`` and seeded with the base seed on first use."""
        if self._generator is None:
            generator = torch.Generator(device=torch.device(device))
            generator.manual_seed(self.base_seed)
            self.seed, self._generator = self.base_seed, generator
        return self._generator

    def state_dict(self) -> dict:
        """Seed, device and generator state (None before the first draw)."""
        if self._generator is None:
            return {"seed": None, "device": None, "state": None}
        return {"seed": self.seed, "device": str(self._generator.device), "state": self._generator.get_state().cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (a generator saved on CUDA needs CUDA to resume)."""
        if not state or state.get("state") is None:
            self.reset()
            return
        generator = torch.Generator(device=torch.device(state["device"]))
        generator.set_state(state["state"])
        self.seed, self._generator = int(state["seed"]), generator


def randn_like(param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``param``, drawn on the generator's device and moved to ``param``'s."""
    noise = torch.randn(param.shape, generator=generator, device=generator.device, dtype=param.dtype)
    return noise.to(param.device)


def _rand_like(param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """U(0, 1) noise shaped like ``param``, drawn on the generator's device and moved to ``param``'s."""
    noise = torch.rand(param.shape, generator=generator, device=generator.device, dtype=param.dtype)
    return noise.to(param.device)


def _module_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-free model)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------- noisy SGD


def noise_scale(sigma0: float, decay: float, step: int) -> float:
    """``sigma_t = sigma0 * decay**t``, with ``0**0 = 1`` so ``decay = 0`` means noise on step 0 only."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return float(sigma0) * (1.0 if step == 0 else float(decay) ** step)


@torch.no_grad()
def add_relative_gradient_noise_(
    params: Iterable[torch.Tensor], sigma: float, generator: torch.Generator
) -> None:
    """In place ``g <- g + eps``, ``eps ~ N(0, sigma^2 ||g||^2 I)``, ``||g||`` being each tensor's own gradient norm."""
    if sigma == 0:
        return
    for param in params:
        grad = param.grad
        if grad is None:
            continue
        if grad.is_sparse:
            raise ValueError("noisy_sgd does not support sparse gradients")
        norm = torch.linalg.vector_norm(grad)
        grad.add_(randn_like(grad, generator) * (norm * sigma))


@register_method
class NoisySGD(Mitigation):
    """The paper's noisy SGD (section 5 / App. B.1.2): relative Gaussian gradient noise with a decaying scale.

    Before every optimizer step each parameter's gradient gets ``eps ~ N(0, sigma_t^2 ||g||^2 I)``, where
    ``||g||`` is that tensor's gradient norm and ``sigma_t = sigma0 * decay**t``. ``t`` counts the optimizer
    steps since :meth:`attach` (or since the last task start with ``restart_each_task``). Noise breaks the
    backward symmetry of cloned units, so clones can separate (escape the cloned-unit manifold).
    """

    name = "noisy_sgd"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``noisy_sgd``."""

        sigma0: float = 0.01
        """Initial noise scale relative to each gradient's norm (paper: 0.01)."""
        decay: float = 0.999
        """sigma_t = sigma0 * decay**t; paper figures: 0.999; 0: only the first step is noisy; 1: constant."""
        restart_each_task: bool = False
        """Restart t at 0 (full-strength noise again) at every task start."""
        seed: int | None = None
        """Seed of the private noise generator; None derives it from the run's seed."""

        def validate(self) -> None:
            """Raise ConfigError for a negative/non-finite sigma0 or a decay outside [0, 1]."""
            finite = math.isfinite(self.sigma0) and self.sigma0 >= 0
            require(finite, f"sigma0 must be a finite number >= 0, got {self.sigma0}")
            require(
                0.0 <= self.decay <= 1.0, f"decay must be in [0, 1] (0: first step only, 1: constant), got {self.decay}"
            )
            require(self.seed is None or self.seed >= 0, f"seed must be >= 0 or None, got {self.seed}")

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()
        self.noise = MethodGenerator()
        self.t = 0
        self._device: torch.device | None = None

    def sigma(self, t: int | None = None) -> float:
        """The relative noise scale used at noisy step ``t`` (default: the next step)."""
        return noise_scale(self.config.sigma0, self.config.decay, self.t if t is None else t)

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Start a fresh noise schedule (t = 0) and noise stream on the model's device."""
        self.t = 0
        self.noise.reset(self.method_seed(self.config.seed))
        self._device = _module_device(model)

    def on_task_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, task: int) -> None:
        """With ``restart_each_task``, restart the schedule at full strength."""
        if self.config.restart_each_task:
            self.t = 0

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Add the relative noise to every gradient of the model, then advance t."""
        sigma = self.sigma()
        if sigma > 0:
            generator = self.noise.get(self._device or _module_device(model))
            add_relative_gradient_noise_(model.parameters(), sigma, generator)
        self.t += 1

    def state_dict(self) -> dict:
        """Schedule position and generator state."""
        return {"t": self.t, "noise": self.noise.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.t = int(state.get("t", 0))
        self.noise.load_state_dict(state.get("noise", {}))


# ---------------------------------------------------------------------------------------------- shrink & perturb

NoiseKind = Literal["init", "kaiming"]


def weight_layers(model: nn.Module) -> list[nn.Module]:
    """Every ``nn.Linear`` and ``nn.ConvNd`` of the model, in module order."""
    return [m for m in model.modules() if isinstance(m, WEIGHT_LAYER_TYPES)]


def _fan_in(layer: nn.Module) -> int:
    """Number of inputs of each output unit (in_features, or in_channels/groups * kernel size)."""
    return int(layer.weight[0].numel())


def init_noise(layer: nn.Module, param: torch.Tensor, kind: NoiseKind, generator: torch.Generator) -> torch.Tensor:
    """A fresh draw shaped like ``param`` (weight or bias of ``layer``) from the layer's initial distribution.

    ``"init"``: PyTorch's default init of Linear/Conv, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (weights and biases).
    ``"kaiming"``: He-normal, ``N(0, 2/fan_in)`` (biases get the same law, so the noise scales with the layer).
    """
    fan_in = _fan_in(layer)
    if kind == "init":
        bound = 1.0 / math.sqrt(fan_in)
        return (_rand_like(param, generator) * 2.0 - 1.0) * bound
    if kind == "kaiming":
        return randn_like(param, generator) * math.sqrt(2.0 / fan_in)
    raise ValueError(f"unknown noise kind {kind!r}; choose 'init' or 'kaiming'")


@torch.no_grad()
def shrink_perturb_(
    model: nn.Module, shrink: float, sigma: float, noise: NoiseKind, generator: torch.Generator
) -> None:
    """In place ``theta <- shrink * theta + sigma * eps`` for every weight and bias of the Linear/Conv layers.

    ``eps`` is drawn per tensor from the layer's initial distribution (:func:`init_noise`), so the noise
    scales with each layer's fan-in. Other parameters (normalisation scale/offset) are left unchanged.
    """
    for layer in weight_layers(model):
        for param in (layer.weight, layer.bias):
            if param is None:
                continue
            if shrink != 1.0:
                param.mul_(shrink)
            if sigma != 0.0:
                param.add_(init_noise(layer, param, noise, generator), alpha=sigma)


# Literature defaults, by when the operation is applied.
#   step: Kumar et al. (2024, Tables 3-4) tuned per-step S&P with SGD and Adam: shrink p = 1 - 1e-4, sigma = 1e-2.
#   task: a strong shrink at each task boundary, as Ash & Adams (2020) apply it when new data arrive.
SHRINK_PERTURB_DEFAULTS: dict[str, tuple[float, float]] = {"step": (1.0 - 1e-4, 1e-2), "task": (0.4, 0.1)}


@register_method
class ShrinkPerturb(Mitigation):
    """Shrink & Perturb (Ash & Adams 2020): ``theta <- shrink * theta + sigma * eps``, ``eps`` drawn like the init.

    ``when="step"`` applies it after every ``every``-th optimizer step (the continual form of Kumar et al.
    2024); ``when="task"`` applies it at every ``every``-th task start (the warm-start form of Ash & Adams;
    the first task is skipped unless ``first_task``). ``shrink``/``sigma`` left at None take the literature
    default for the chosen ``when`` (see :data:`SHRINK_PERTURB_DEFAULTS`).
    """

    name = "shrink_perturb"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``shrink_perturb``."""

        shrink: float | None = None
        """Multiplier of the weights; None: 1 - 1e-4 per step, 0.4 per task."""
        sigma: float | None = None
        """Scale of the init-distributed noise; None: 1e-2 per step, 0.1 per task."""
        when: Literal["step", "task"] = "step"
        """Apply after optimizer steps or at task starts."""
        every: int = 1
        """Apply on every ``every``-th step (or task start)."""
        noise: Literal["init", "kaiming"] = "init"
        """Noise law: PyTorch's default init U(+-1/sqrt(fan_in)), or He-normal N(0, 2/fan_in)."""
        first_task: bool = False
        """when=task: also apply at the start of task 0 (e.g. to perturb a fresh clone)."""
        seed: int | None = None
        """Seed of the private noise generator; None derives it from the run's seed."""

        def validate(self) -> None:
            """Raise ConfigError for impossible values."""
            shrink, sigma = self.resolved()
            require(math.isfinite(shrink) and 0.0 < shrink <= 1.0, f"shrink must be in (0, 1], got {shrink}")
            require(math.isfinite(sigma) and sigma >= 0.0, f"sigma must be a finite number >= 0, got {sigma}")
            require(self.every >= 1, f"every must be a positive integer, got {self.every}")
            require(self.seed is None or self.seed >= 0, f"seed must be >= 0 or None, got {self.seed}")

        def resolved(self) -> tuple[float, float]:
            """(shrink, sigma) with None replaced by the default for ``when``."""
            if self.when not in SHRINK_PERTURB_DEFAULTS:
                require(False, f"when must be 'step' or 'task', got {self.when!r}")
            default_shrink, default_sigma = SHRINK_PERTURB_DEFAULTS[self.when]
            return (
                default_shrink if self.shrink is None else float(self.shrink),
                default_sigma if self.sigma is None else float(self.sigma),
            )

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()
        self.shrink, self.sigma = self.config.resolved()
        self.noise = MethodGenerator()
        self.events = 0
        self.applications = 0
        self._device: torch.device | None = None

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Reset the event counter and the noise stream."""
        self.events = 0
        self.applications = 0
        self.noise.reset(self.method_seed(self.config.seed))
        self._device = _module_device(model)

    def apply(self, model: nn.Module) -> None:
        """Shrink and perturb the model once, now."""
        generator = self.noise.get(self._device or _module_device(model))
        shrink_perturb_(model, self.shrink, self.sigma, self.config.noise, generator)
        self.applications += 1

    def _event(self, model: nn.Module) -> None:
        """Count one step/task event; apply on every ``every``-th."""
        self.events += 1
        if self.events % self.config.every == 0:
            self.apply(model)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """when=step: shrink and perturb after the update."""
        if self.config.when == "step":
            self._event(model)

    def on_task_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, task: int) -> None:
        """when=task: shrink and perturb at the task boundary (task 0 only with ``first_task``)."""
        if self.config.when == "task" and (task > 0 or self.config.first_task):
            self._event(model)

    def state_dict(self) -> dict:
        """Event counters and generator state."""
        return {"events": self.events, "applications": self.applications, "noise": self.noise.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.events = int(state.get("events", 0))
        self.applications = int(state.get("applications", 0))
        self.noise.load_state_dict(state.get("noise", {}))
