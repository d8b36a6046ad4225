"""Loss-term regularisers: plain L2 (``l2``) and L2 toward the initial parameters (``l2init``, Kumar et al. 2024).

Both add ``strength * sum_p ||p - anchor_p||^2`` to the training loss through :meth:`Mitigation.loss_term`
(``anchor = 0`` for ``l2``, ``anchor = theta_0`` recorded in :meth:`attach` for ``l2init``). The penalty is
the plain squared L2 norm, *summed* over the selected parameters (not averaged), as in Kumar et al., so its
gradient is ``2 * strength * (p - anchor)``. Because it is part of the loss, it is "coupled" L2: with Adam
it is rescaled by the second-moment estimate, exactly as in the L2 Init paper (it is not decoupled weight decay).

Which parameters are penalised: every trainable parameter by default; ``include_bias=False`` drops the
biases of weight layers and ``include_norm=False`` drops the affine parameters of normalisation layers.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from lopkit.configs import require
from lopkit.mitigations.base import Mitigation
from lopkit.mitigations.registry import register_method

__all__ = [
    "L2",
    "L2Init",
    "NORM_TYPES",
    "is_norm_module",
    "regularized_parameters",
    "squared_distance",
]

#: Module types whose parameters count as "normalisation parameters" (scale/offset).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def is_norm_module(module: nn.Module) -> bool:
    """True for normalisation layers (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm)."""
    return isinstance(module, NORM_TYPES)


def regularized_parameters(
    model: nn.Module, include_bias: bool = True, include_norm: bool = True
) -> list[tuple[str, nn.Parameter]]:
    """``(qualified name, parameter)`` of the trainable parameters a regulariser should penalise.

    ``include_norm=False`` skips every parameter of a normalisation layer; ``include_bias=False`` skips
    parameters named ``bias`` of the other layers. Shared parameters are listed once.
    """
    selected: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        norm = is_norm_module(module)
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            if norm and not include_norm:
                continue
            if not norm and param_name == "bias" and not include_bias:
                continue
            seen.add(id(param))
            selected.append((f"{module_name}.{param_name}" if module_name else param_name, param))
    return selected


def squared_distance(params: list[torch.Tensor], anchors: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``sum_i ||params_i - anchors_i||^2`` (``anchors=None`` means the origin), differentiable in ``params``."""
    if not params:
        return torch.zeros(())
    if anchors is None:
        terms = [p.pow(2).sum() for p in params]
    else:
        if len(anchors) != len(params):
            raise ValueError(f"got {len(params)} parameters but {len(anchors)} anchors; they must pair up")
        terms = [(p - a).pow(2).sum() for p, a in zip(params, anchors)]
    return torch.stack(terms).sum()


def _check_strength(strength: float) -> None:
    """Shared validation of the regularisation strength."""
    require(
        math.isfinite(strength) and strength >= 0,
        f"strength must be a finite number >= 0 (the lambda in lambda*||theta||^2), got {strength}",
    )


class _ParameterSelection:
    """Caches the penalised parameters of the last model seen (recomputed if another model is passed)."""

    def __init__(self, include_bias: bool, include_norm: bool):
        self.include_bias = include_bias
        self.include_norm = include_norm
        self._model_id: int | None = None
        self._named: list[tuple[str, nn.Parameter]] = []

    def named(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The selected ``(name, parameter)`` pairs of ``model``."""
        if self._model_id != id(model):
            self._named = regularized_parameters(model, self.include_bias, self.include_norm)
            self._model_id = id(model)
        return self._named


@register_method
class L2(Mitigation):
    """Plain L2 regularisation ``strength * ||theta||^2`` added to the loss (the weight-decay baseline)."""

    name = "l2"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``l2``."""

        strength: float = 1e-4
        """lambda in lambda * sum ||p||^2."""
        include_bias: bool = True
        """Penalise the biases of weight layers too."""
        include_norm: bool = True
        """Penalise the affine (scale/offset) parameters of normalisation layers too."""

        def validate(self) -> None:
            """Raise ConfigError for a negative or non-finite strength."""
            _check_strength(self.strength)

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()
        self._selection = _ParameterSelection(self.config.include_bias, self.config.include_norm)

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Select the penalised parameters once (cached for the following steps)."""
        self._selection.named(model)

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """``strength * sum_p ||p||^2`` over the selected parameters (None when strength is 0)."""
        if self.config.strength == 0:
            return None
        params = [p for _, p in self._selection.named(model)]
        return self.config.strength * squared_distance(params)


@register_method
class L2Init(L2):
    """L2 Init (Kumar et al. 2024): ``strength * ||theta - theta_0||^2``, pulling unused weights back to their init.

    ``theta_0`` is the model's parameters when :meth:`attach` is called; it is part of :meth:`state_dict`
    so a resumed run regularises toward the same point.
    """

    name = "l2init"

    @dataclasses.dataclass
    class Config(L2.Config):
        """Hyper-parameters of ``l2init`` (as ``l2``, with lambda in lambda * ||theta - theta_0||^2)."""

        strength: float = 1e-2
        """lambda in lambda * ||theta - theta_0||^2 (1e-2: best across problems in Kumar et al. 2024, App. A.2.5)."""

    def __init__(self, config: Config | None = None):
        super().__init__(config if config is not None else self.Config())
        self._initial: dict[str, torch.Tensor] | None = None
        self._anchors: list[torch.Tensor] | None = None
        self._anchors_for: int | None = None

    @torch.no_grad()
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Record ``theta_0``: a detached copy of every selected parameter now."""
        self._initial = {name: p.detach().clone() for name, p in self._selection.named(model)}
        self._anchors = None

    @property
    def initial_parameters(self) -> dict[str, torch.Tensor]:
        """The recorded ``theta_0`` (name -> tensor); raises if :meth:`attach` was never called."""
        if self._initial is None:
            raise RuntimeError("l2init has no initial parameters yet: call attach(model, optimizer) before training")
        return self._initial

    def _anchor_list(self, model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> list[torch.Tensor]:
        """``theta_0`` in the order of ``named``, on each parameter's device (cached per model)."""
        if self._anchors is None or self._anchors_for != id(model):
            initial = self.initial_parameters
            missing = [name for name, _ in named if name not in initial]
            if missing:
                raise ValueError(
                    f"l2init: parameters {missing[:5]} were not present when attach() recorded theta_0; "
                    "call attach() again after changing the model"
                )
            anchors = []
            for name, p in named:
                anchor = initial[name]
                if anchor.shape != p.shape:
                    raise ValueError(
                        f"l2init: parameter {name} has shape {tuple(p.shape)} but theta_0 has {tuple(anchor.shape)}; "
                        "call attach() again after changing the model"
                    )
                anchors.append(anchor.to(device=p.device, dtype=p.dtype))
            self._anchors, self._anchors_for = anchors, id(model)
        return self._anchors

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """``strength * sum_p ||p - p_0||^2`` over the selected parameters (None when strength is 0)."""
        if self.config.strength == 0:
            return None
        named = self._selection.named(model)
        anchors = self._anchor_list(model, named)
        return self.config.strength * squared_distance([p for _, p in named], anchors)

    def state_dict(self) -> dict:
        """``theta_0`` (on CPU), so a resumed run keeps the same anchor."""
        if self._initial is None:
            return {"initial": None}
        return {"initial": {name: t.detach().cpu().clone() for name, t in self._initial.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``theta_0`` saved by :meth:`state_dict`."""
        initial = state.get("initial")
        self._initial = None if initial is None else {name: t.detach().clone() for name, t in initial.items()}
        self._anchors = None
