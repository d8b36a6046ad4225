"""Architectural mitigations: insert LayerNorm / BatchNorm / Dropout, swap activations for CReLU, Normalize-and-Project.

All of them act in :meth:`Mitigation.prepare_model` on ``nn.Sequential`` MLP/CNN models (nested Sequentials
allowed) and return a *new* model (the input is deep-copied first and left untouched). The hidden layers are
the unit groups of :func:`lopkit.mitigations.layers.find_unit_groups`: a Linear/Conv layer, an optional norm
before the activation, the activation, and the next Linear/Conv layer that reads the units. The output layer
is never changed, so the prepared model takes the same inputs and returns outputs of the same shape.

- ``layernorm`` / ``batchnorm``: a norm right after each hidden weight layer, before its activation
  (LayerNorm for Linear outputs, GroupNorm(1, C) for conv outputs; BatchNorm1d/2d/3d). A hidden layer that
  already has a norm there gets no second one.
- ``dropout``: ``nn.Dropout(p)`` right after the activation of each hidden fully-connected layer (conv
  layers too with ``include_conv``), unless a dropout is already there.
- ``crelu``: each hidden activation becomes CReLU(x) = concat(relu(x), relu(-x)), which doubles the
  features, so the next weight layer is rebuilt with twice the inputs (``halve_width`` halves the hidden
  widths first).
- ``nap``: Normalize-and-Project (Lyle et al. 2024): the LayerNorm insertion of ``layernorm`` plus, after
  every optimizer step, each normalised hidden layer's weight is rescaled to its initial Frobenius norm.

New modules are named after the layer they follow when the Sequential has named children (``fc1`` ->
``norm1``, ``act1`` -> ``drop1``); a Sequential with numbered children is renumbered.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lopkit.configs import require
from lopkit.diagnostics.errors import warn
from lopkit.mitigations.base import Mitigation
from lopkit.mitigations.layers import UnitGroup, find_unit_groups
from lopkit.mitigations.perturbation import MethodGenerator
from lopkit.mitigations.registry import register_method

__all__ = [
    "BatchNormInsertion",
    "CReLU",
    "CReLUActivation",
    "DropoutInsertion",
    "LayerNormInsertion",
    "NormalizeAndProject",
    "batch_norm_for",
    "hidden_groups",
    "insert_after",
    "insert_norms",
    "joint_norm",
    "layer_norm_for",
    "project_to_norm_",
    "replace_module",
]

_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


# ---------------------------------------------------------------------------------------------- CReLU module


class CReLU(nn.Module):
    """Concatenated ReLU: ``concat(relu(x), relu(-x))`` along ``dim`` (Shang et al. 2016), so no unit is ever dead."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Twice as many features as the input along ``dim``."""
        return torch.cat((F.relu(x), F.relu(-x)), dim=self.dim)

    def unit_pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-activation of each of the ``2H`` output units, ``concat(x, -x)``: the output is its ReLU.

        Unit ``j < H`` is ``relu(x_j)``, unit ``H + j`` is ``relu(-x_j)``; the Monitor measures every output
        feature as a unit (:func:`lopkit.layer_types.splits_units`)."""
        return torch.cat((x, -x), dim=self.dim)

    @staticmethod
    def unit_activation(u: torch.Tensor) -> torch.Tensor:
        """The elementwise function of each output unit: ReLU of :meth:`unit_pre_activation`."""
        return torch.relu(u)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


# ---------------------------------------------------------------------------------------------- model surgery


def hidden_groups(model: nn.Module, method: str) -> list[UnitGroup]:
    """The hidden unit groups of ``model``; a ValueError naming ``method`` if the model is not a usable Sequential."""
    try:
        groups = find_unit_groups(model)
    except ValueError as err:
        raise ValueError(f"{method}: {err}") from None
    if not groups:
        raise ValueError(
            f"{method}: found no hidden layer in {type(model).__name__} (expected an nn.Sequential of "
            "Linear/Conv -> [norm] -> activation -> Linear/Conv ...); there is nothing to modify"
        )
    return groups


def _parents(model: nn.Module) -> dict[int, tuple[nn.Sequential, str]]:
    """id(child) -> (parent Sequential, child name) for every direct child of every Sequential in the model."""
    parents: dict[int, tuple[nn.Sequential, str]] = {}
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            for name, child in module.named_children():
                parents[id(child)] = (module, name)
    return parents


def _set_children(parent: nn.Sequential, items: list[tuple[str | None, nn.Module]]) -> None:
    """Replace the children of ``parent`` by ``items`` (a Sequential with numbered children is renumbered)."""
    numbered = all(name is None or name.isdigit() for name, _ in items)
    for name in list(parent._modules):
        delattr(parent, name)
    if numbered:
        for index, (_, module) in enumerate(items):
            parent.add_module(str(index), module)
        return
    for name, module in items:
        assert name is not None
        parent.add_module(name, module)


def _fresh_name(anchor: str, kind: str, taken: set[str]) -> str:
    """``fc1`` + ``norm`` -> ``norm1`` (or ``fc1_norm``, ``fc1_norm_2`` ... when taken or unnumbered)."""
    match = re.search(r"(\d+)$", anchor)
    candidates = ([f"{kind}{match.group(1)}"] if match else []) + [f"{anchor}_{kind}"]
    for candidate in candidates:
        if candidate not in taken:
            return candidate
    index = 2
    while f"{anchor}_{kind}_{index}" in taken:
        index += 1
    return f"{anchor}_{kind}_{index}"


def insert_after(model: nn.Module, anchor: nn.Module, new: nn.Module, kind: str) -> None:
    """Insert ``new`` right after ``anchor`` inside the Sequential holding ``anchor`` (named ``kind`` + index)."""
    parents = _parents(model)
    if id(anchor) not in parents:
        raise ValueError(f"cannot insert after {type(anchor).__name__}: it is not a direct child of an nn.Sequential")
    parent, anchor_name = parents[id(anchor)]
    items: list[tuple[str | None, nn.Module]] = []
    numbered = all(name.isdigit() for name in parent._modules)
    for name, child in parent.named_children():
        items.append((name, child))
        if child is anchor:
            items.append((None if numbered else _fresh_name(anchor_name, kind, set(parent._modules)), new))
    _set_children(parent, items)


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` where ``old`` is (same name in the same Sequential)."""
    parents = _parents(model)
    if id(old) not in parents:
        raise ValueError(f"cannot replace {type(old).__name__}: it is not a direct child of an nn.Sequential")
    parent, name = parents[id(old)]
    setattr(parent, name, new)


def _leaves(model: nn.Module) -> list[nn.Module]:
    """Leaf modules of nested Sequentials in execution order."""
    result: list[nn.Module] = []
    for child in model.children():
        if isinstance(child, nn.Sequential):
            result += _leaves(child)
        else:
            result.append(child)
    return result


def _between(model: nn.Module, first: nn.Module, last: nn.Module | None) -> list[nn.Module]:
    """Leaf modules strictly after ``first`` and before ``last`` (or to the end)."""
    leaves = _leaves(model)
    ids = [id(m) for m in leaves]
    start = ids.index(id(first)) + 1
    stop = ids.index(id(last)) if last is not None and id(last) in ids else len(leaves)
    return leaves[start:stop]


def _like(module: nn.Module, reference: nn.Module) -> nn.Module:
    """``module`` moved to the device and floating dtype of ``reference``'s weight."""
    weight = reference.weight
    return module.to(device=weight.device, dtype=weight.dtype)


def layer_norm_for(layer: nn.Module, affine: bool = True) -> nn.Module:
    """LayerNorm over a Linear output's features; GroupNorm(1, C) (per sample, over C and space) for a conv output."""
    if isinstance(layer, nn.Linear):
        return _like(nn.LayerNorm(layer.out_features, elementwise_affine=affine), layer)
    return _like(nn.GroupNorm(1, layer.out_channels, affine=affine), layer)


def batch_norm_for(layer: nn.Module, affine: bool = True) -> nn.Module:
    """BatchNorm1d for Linear and Conv1d outputs, BatchNorm2d/3d for Conv2d/3d outputs."""
    if isinstance(layer, nn.Linear):
        return _like(nn.BatchNorm1d(layer.out_features, affine=affine), layer)
    kind = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}[type(layer)]
    return _like(kind(layer.out_channels, affine=affine), layer)


def _norm_family(module: nn.Module) -> str:
    """'batch' for BatchNorm, 'layer' for LayerNorm/GroupNorm, else the class name."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batch"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return "layer"
    return type(module).__name__


def insert_norms(model: nn.Module, factory: Callable[[nn.Module], nn.Module], family: str, method: str) -> int:
    """Insert ``factory(incoming)`` after each hidden weight layer that has no norm yet; returns how many were added."""
    added = 0
    for group in hidden_groups(model, method):
        if group.norm is not None:
            if _norm_family(group.norm) != family:
                warn(
                    f"{method}: hidden layer {group.name!r} already has a {type(group.norm).__name__}; "
                    "no second normalisation layer was inserted",
                    stacklevel=4,
                )
            continue
        insert_after(model, group.incoming, factory(group.incoming), "norm")
        added += 1
    return added


def _check_affine(affine: bool) -> None:
    require(isinstance(affine, bool), f"affine must be true or false, got {affine!r}")


# ---------------------------------------------------------------------------------------------- norms


class _NormInsertion(Mitigation):
    """Shared body of the norm insertions: a validated ``affine`` flag and a deep copy with norms inserted."""

    name = "norm"
    norm_kind = "layer"  # "layer" or "batch": which norm ``insert_norms`` builds

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of a norm insertion (``layernorm``, ``batchnorm``)."""

        affine: bool = True
        """Learnable per-unit scale and offset."""

        def validate(self) -> None:
            """Raise ConfigError for a non-boolean affine."""
            _check_affine(self.affine)

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()

    def _norm_for(self, layer: nn.Module) -> nn.Module:
        """The norm module to place after ``layer``."""
        make = layer_norm_for if self.norm_kind == "layer" else batch_norm_for
        return make(layer, self.config.affine)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with the norm after each hidden Linear/Conv."""
        model = copy.deepcopy(model)
        insert_norms(model, self._norm_for, self.norm_kind, self.name)
        return model


@register_method
class LayerNormInsertion(_NormInsertion):
    """Insert LayerNorm (GroupNorm(1, C) for conv) before every hidden activation: the paper's main *prevention*."""

    name = "layernorm"
    norm_kind = "layer"


@register_method
class BatchNormInsertion(_NormInsertion):
    """Insert BatchNorm before every hidden activation (BatchNorm1d for Linear, BatchNorm2d for Conv2d)."""

    name = "batchnorm"
    norm_kind = "batch"


# ---------------------------------------------------------------------------------------------- dropout


@register_method
class DropoutInsertion(Mitigation):
    """Insert ``nn.Dropout(p)`` after the activation of every hidden fully-connected layer (conv too if asked)."""

    name = "dropout"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``dropout``."""

        p: float = 0.1
        """Drop probability (the paper's figure setting)."""
        include_conv: bool = False
        """Also after conv activations (the paper's CNN has dropout in its fully-connected part only)."""

        def validate(self) -> None:
            """Raise ConfigError unless 0 < p < 1."""
            require(math.isfinite(self.p) and 0.0 < self.p < 1.0, f"p must be a probability in (0, 1), got {self.p}")

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with Dropout(p) after each hidden activation that has none."""
        model = copy.deepcopy(model)
        added = 0
        for group in hidden_groups(model, self.name):
            if group.is_conv and not self.config.include_conv:
                continue
            anchor = group.activation or group.norm or group.incoming
            if any(isinstance(m, _DROPOUT_TYPES) for m in _between(model, anchor, group.outgoing)):
                continue
            insert_after(model, anchor, nn.Dropout(self.config.p), "drop")
            added += 1
        if added == 0:
            warn(
                "dropout: no dropout layer was inserted (no hidden fully-connected layer without dropout; "
                "set include_conv=true to add dropout after conv activations)",
                stacklevel=3,
            )
        return model


# ---------------------------------------------------------------------------------------------- CReLU


def _resized_weight_layer(
    old: nn.Module, in_size: int, out_size: int, generator: torch.Generator
) -> nn.Module:
    """A fresh Linear/Conv like ``old`` with new input/output sizes, initialised with ``old``'s fan-in law.

    Weights and biases are drawn from a uniform law whose std is ``old``'s std times
    ``sqrt(old fan_in / new fan_in)``: for PyTorch's default init this is exactly U(+-1/sqrt(new fan_in));
    for Kaiming/Xavier inits the variance follows the same rule; all-zero biases stay zero.
    """
    if isinstance(old, nn.Linear):
        new = nn.Linear(in_size, out_size, bias=old.bias is not None)
    else:
        if old.groups != 1:
            raise ValueError(f"crelu cannot resize grouped convolutions (groups={old.groups})")
        new = type(old)(
            in_size, out_size, old.kernel_size, stride=old.stride, padding=old.padding, dilation=old.dilation,
            bias=old.bias is not None, padding_mode=old.padding_mode,
        )  # fmt: skip
    old_fan_in = old.weight[0].numel()
    new_fan_in = new.weight[0].numel()
    ratio = math.sqrt(old_fan_in / new_fan_in)
    with torch.no_grad():
        for name in ("weight", "bias"):
            old_param, new_param = getattr(old, name), getattr(new, name)
            if old_param is None:
                continue
            std = float(old_param.detach().double().std()) if old_param.numel() > 1 else 0.0
            bound = math.sqrt(3.0) * std * ratio
            sample = (torch.rand(new_param.shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            new_param.copy_(sample)
    return new.to(device=old.weight.device, dtype=old.weight.dtype)


def _resized_norm(norm: nn.Module, units: int) -> nn.Module:
    """A fresh norm layer like ``norm`` for ``units`` units."""
    if isinstance(norm, nn.LayerNorm):
        new = nn.LayerNorm(units, eps=norm.eps, elementwise_affine=norm.elementwise_affine)
    elif isinstance(norm, nn.GroupNorm):
        if units % norm.num_groups:
            raise ValueError(f"crelu: GroupNorm with {norm.num_groups} groups cannot hold {units} channels")
        new = nn.GroupNorm(norm.num_groups, units, eps=norm.eps, affine=norm.affine)
    elif isinstance(norm, nn.modules.batchnorm._NormBase):
        new = type(norm)(units, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                         track_running_stats=norm.track_running_stats)  # fmt: skip
    else:
        raise ValueError(f"crelu: cannot resize a {type(norm).__name__}")
    tensors = [t for t in (*norm.parameters(), *norm.buffers()) if t.is_floating_point()]
    return new.to(device=tensors[0].device, dtype=tensors[0].dtype) if tensors else new


@register_method
class CReLUActivation(Mitigation):
    """Replace every hidden activation by CReLU = concat(relu(x), relu(-x)) and widen the next layer's input.

    CReLU doubles each hidden layer's features, so the weight layer that reads them gets twice the inputs and
    is rebuilt with a fresh initialisation. ``halve_width`` first halves each hidden width (ceil(w/2)) so that
    every layer after the first reads as many features as before.
    """

    name = "crelu"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``crelu``."""

        halve_width: bool = False
        """Halve every hidden width so the layers after the first keep their input dimension."""
        seed: int | None = None
        """Seed of the generator for the rebuilt layers; None derives it from the run's seed."""

        def validate(self) -> None:
            """Raise ConfigError for a negative seed."""
            require(self.seed is None or self.seed >= 0, f"seed must be >= 0 or None, got {self.seed}")

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()
        self.init = MethodGenerator()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with CReLU hidden activations and resized weight layers (same input/output shapes)."""
        model = copy.deepcopy(model)
        groups = [g for g in hidden_groups(model, self.name) if self._usable(g)]
        if not groups:
            raise ValueError("crelu: no hidden layer has an activation to replace")
        new_units = {id(g): math.ceil(g.num_units / 2) if self.config.halve_width else g.num_units for g in groups}
        sizes: dict[int, list[int]] = {}  # id(weight layer) -> [in, out]
        layers: dict[int, nn.Module] = {}
        for group in groups:
            for layer in (group.incoming, group.outgoing):
                layers[id(layer)] = layer
                sizes.setdefault(id(layer), [_in_size(layer), _out_size(layer)])
            if self.config.halve_width:
                sizes[id(group.incoming)][1] = new_units[id(group)]
            sizes[id(group.outgoing)][0] = 2 * new_units[id(group)] * group.outgoing_block
        self.init.reset(self.method_seed(self.config.seed))
        generator = self.init.get("cpu")
        for key, layer in layers.items():
            in_size, out_size = sizes[key]
            if (in_size, out_size) != (_in_size(layer), _out_size(layer)):
                replace_module(model, layer, _resized_weight_layer(layer, in_size, out_size, generator))
        for group in groups:
            if group.norm is not None and self.config.halve_width:
                replace_module(model, group.norm, _resized_norm(group.norm, new_units[id(group)]))
            replace_module(model, group.activation, CReLU(dim=1 if group.is_conv else -1))
        return model

    def _usable(self, group: UnitGroup) -> bool:
        """Groups with an activation; warns when that activation is not a ReLU (CReLU is ReLU-based)."""
        if group.activation is None:
            warn(f"crelu: hidden layer {group.name!r} has no activation; left unchanged", stacklevel=5)
            return False
        if not isinstance(group.activation, nn.ReLU):
            warn(
                f"crelu: hidden layer {group.name!r} uses {type(group.activation).__name__}; it is replaced by "
                "CReLU, which is built from ReLU",
                stacklevel=5,
            )
        return True

    def state_dict(self) -> dict:
        """The generator used for the rebuilt layers (for the record; prepare_model runs once)."""
        return {"init": self.init.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.init.load_state_dict(state.get("init", {}))


def _in_size(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _out_size(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


# ---------------------------------------------------------------------------------------------- NaP


def joint_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm of several tensors seen as one vector."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach()) for p in params]))


@torch.no_grad()
def project_to_norm_(params: Sequence[torch.Tensor], target_norm: float) -> None:
    """In place rescale of ``params`` (jointly) so their joint Euclidean norm is ``target_norm`` (no-op at norm 0)."""
    norm = joint_norm(params)
    if float(norm) > 0:
        factor = target_norm / norm
        for param in params:
            param.mul_(factor)


@register_method
class NormalizeAndProject(Mitigation):
    """Normalize-and-Project (Lyle et al. 2024): LayerNorm before each hidden activation + weight-norm projection.

    ``prepare_model`` inserts the norms exactly as ``layernorm`` does (none is added where one exists).
    ``attach`` records, for every hidden layer followed by a norm (inserted or already there), the Frobenius
    norm of its weight, and ``after_step`` rescales each such weight back to that norm after every optimizer
    step. The following norm makes the layer (almost) scale-invariant, so the projection barely changes the
    function and mainly pins the effective learning rate. The bias is not projected by default; as the norm
    is invariant to scaling weight *and* bias together, ``with_bias`` projects the pair jointly and is then
    exactly function-preserving (up to the norm's epsilon). The output layer and (unless ``project_affine``)
    the norm layers' scale/offset are left free.
    """

    name = "nap"

    @dataclasses.dataclass
    class Config:
        """Hyper-parameters of ``nap``."""

        affine: bool = True
        """Learnable scale and offset in the inserted norms."""
        with_bias: bool = False
        """Project each hidden (weight, bias) pair jointly instead of the weight alone (exactly function-preserving)."""
        project_affine: bool = False
        """Also project each norm's scale vector to its initial norm (the offset starts at 0 and stays free)."""

        def validate(self) -> None:
            """Raise ConfigError for non-boolean options."""
            _check_affine(self.affine)
            for key in ("with_bias", "project_affine"):
                value = getattr(self, key)
                require(isinstance(value, bool), f"{key} must be true or false, got {value!r}")

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()
        self.initial_norms: dict[str, float] = {}
        self._targets: list[tuple[str, list[nn.Parameter]]] = []

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with LayerNorm/GroupNorm(1, C) before each hidden activation (as ``layernorm``)."""
        model = copy.deepcopy(model)
        insert_norms(model, lambda layer: layer_norm_for(layer, self.config.affine), "layer", self.name)
        return model

    def projected_parameters(self, model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
        """(key, parameters projected together) for every projection; keys join parameter names with '+'."""
        names = {id(p): n for n, p in model.named_parameters()}
        chosen: list[tuple[str, list[nn.Parameter]]] = []
        for group in hidden_groups(model, self.name):
            if group.norm is None:
                continue
            params = [group.incoming.weight]
            if self.config.with_bias and group.incoming.bias is not None:
                params.append(group.incoming.bias)
            chosen.append(("+".join(names[id(p)] for p in params), params))
            scale = getattr(group.norm, "weight", None)
            if self.config.project_affine and isinstance(scale, nn.Parameter):
                chosen.append((names[id(scale)], [scale]))
        if not chosen:
            raise ValueError("nap: no hidden layer is followed by a normalisation layer; call prepare_model first")
        return chosen

    @torch.no_grad()
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Record the initial norm of each projected weight (or weight-bias pair)."""
        self._targets = self.projected_parameters(model)
        self.initial_norms = {key: float(joint_norm(params)) for key, params in self._targets}

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Project every recorded weight back to its initial norm."""
        if not self.initial_norms:
            raise RuntimeError("nap has no initial norms: call attach(model, optimizer) before training")
        for key, params in self._targets:
            project_to_norm_(params, self.initial_norms[key])

    def state_dict(self) -> dict:
        """The recorded initial norms (so a resumed run projects onto the same spheres)."""
        return {"initial_norms": dict(self.initial_norms)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (after :meth:`attach`)."""
        saved = state.get("initial_norms") or {}
        missing = [key for key, _ in self._targets if key not in saved]
        if saved and missing:
            raise ValueError(f"nap: saved state has no initial norm for {missing}; was it saved from another model?")
        self.initial_norms = {key: float(value) for key, value in saved.items()}
