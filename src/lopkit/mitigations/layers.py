"""Unit groups: the hidden units of a Linear/Conv network, and the per-unit surgery that resets need.

A *unit group* is one hidden layer seen as a set of units: the ``incoming`` module that produces them
(``nn.Linear`` rows or ``nn.Conv*d`` filters), an optional per-unit ``norm`` module, the ``activation``
module and the ``outgoing`` module that consumes them (the next Linear/Conv). A ``Flatten`` between a conv
layer and a Linear layer is handled: each channel feeds a contiguous block of ``in_features / channels``
input columns of the Linear layer (PyTorch flattens channel-major).

:func:`find_unit_groups` discovers the groups of an ``nn.Sequential`` model (nested Sequentials allowed)
by walking its modules in order (:func:`lopkit.theory.unit_maps.sequential_leaves`);
:func:`architecture_unit_groups` gives those of lopkit's ResNet and ViT (residual and attention/MLP blocks,
from :func:`lopkit.theory.unit_maps.unit_sites`); for any other model build :class:`UnitGroup` objects by hand.

Per-unit operations (``unit_mask`` is a bool tensor of shape ``(units,)`` or a list/tensor of indices):

- :func:`reinit_incoming`: fresh incoming weights for the selected units, drawn from an initialisation
  scheme (``"default"`` = PyTorch's own Linear/Conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); or
  Kaiming/Xavier with the gain of the group's activation), bias set to zero (``bias="zero"``, as in
  continual backprop) or to PyTorch's default bias init (``bias="default"``).
- :func:`zero_outgoing`: zero the outgoing weights that read the selected units, so a reset unit does not
  change the network's output at the moment of the reset.
- :func:`absorb_into_outgoing_bias`: add ``mean(h_j) * w_out[:, j]`` to the next layer's bias, which keeps
  the function (approximately) unchanged when a unit's outgoing weights are then zeroed.
- :func:`reset_optimizer_state`: zero the optimizer state (Adam/AdamW ``exp_avg``, ``exp_avg_sq``,
  ``max_exp_avg_sq``; SGD ``momentum_buffer``; any per-element state tensor) of exactly the entries that
  belong to the selected units.
- :func:`add_incoming_noise`: Gaussian noise on the incoming weights, scaled to each unit's weight norm.

:class:`UnitCapture` installs forward hooks that hand each group's training-time activations (and
pre-activations) to a callback; :func:`unit_activations` runs a probe batch and returns them directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from lopkit.diagnostics.units import as_unit_matrix
from lopkit.layer_types import WEIGHT_LAYERS, splits_units, unwrap_model
from lopkit.theory.unit_maps import sequential_leaves, unit_sites

__all__ = [
    "INIT_SCHEMES",
    "BIAS_SCHEMES",
    "UnitGroup",
    "UnitCapture",
    "architecture_unit_groups",
    "find_unit_groups",
    "resolve_unit_groups",
    "unit_mask_tensor",
    "incoming_weight_magnitude",
    "outgoing_weight_magnitude",
    "outgoing_weight_mask",
    "reinit_incoming",
    "reset_norm_units",
    "zero_outgoing",
    "absorb_into_outgoing_bias",
    "reset_optimizer_state",
    "add_incoming_noise",
    "unit_activations",
    "activation_gain",
]

#: Initialisation schemes accepted by :func:`reinit_incoming`.
INIT_SCHEMES: tuple[str, ...] = ("default", "kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal")
#: Bias schemes accepted by :func:`reinit_incoming`.
BIAS_SCHEMES: tuple[str, ...] = ("zero", "default")

_WEIGHT_TYPES = WEIGHT_LAYERS
_NORM_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)  # fmt: skip
_PASS_THROUGH_TYPES = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
# activation modules that are not elementwise (they mix units): a barrier, not an activation
_NON_ELEMENTWISE = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.MultiheadAttention, nn.GLU)


def _is_activation(module: nn.Module) -> bool:
    """Elementwise activation modules: everything defined in ``torch.nn.modules.activation`` except mixers."""
    if isinstance(module, _NON_ELEMENTWISE):
        return False
    return type(module).__module__ == "torch.nn.modules.activation"


# --------------------------------------------------------------------------- the unit group


@dataclass(eq=False)
class UnitGroup:
    """One hidden layer's units: producer (``incoming``), optional ``norm``, ``activation`` and consumer (``outgoing``).

    ``outgoing_block`` is the number of consecutive input columns of a Linear ``outgoing`` that read one unit
    (1 for Linear -> Linear; ``H*W`` for conv -> Flatten -> Linear); it is inferred when left as None.
    ``outgoing=None`` is allowed (nothing reads the units, e.g. the last layer of a feature extractor); then
    the outgoing operations are no-ops.
    """

    incoming: nn.Module
    outgoing: nn.Module | None
    activation: nn.Module | None = None
    norm: nn.Module | None = None
    name: str = ""
    outgoing_block: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.incoming, _WEIGHT_TYPES):
            raise ValueError(
                f"UnitGroup.incoming must be nn.Linear or nn.Conv1d/2d/3d, got {type(self.incoming).__name__}"
            )
        if self.outgoing is not None and not isinstance(self.outgoing, _WEIGHT_TYPES):
            raise ValueError(
                f"UnitGroup.outgoing must be nn.Linear, nn.Conv1d/2d/3d or None, got {type(self.outgoing).__name__}"
            )
        if self.activation is not None and not isinstance(self.activation, nn.Module):
            raise ValueError("UnitGroup.activation must be an nn.Module (or None for a linear hidden layer)")
        self.outgoing_block = _infer_block(self.incoming, self.outgoing, self.outgoing_block)
        if not self.name:
            self.name = type(self.incoming).__name__.lower()

    @property
    def num_units(self) -> int:
        """Number of units (output features or channels of ``incoming``)."""
        return _num_units(self.incoming)

    @property
    def is_conv(self) -> bool:
        """True when units are conv channels (axis 1 of the output), False for Linear features (last axis)."""
        return not isinstance(self.incoming, nn.Linear)

    @property
    def output_module(self) -> nn.Module:
        """Module whose output is the post-activation h (activation, else norm, else incoming)."""
        if self.activation is not None:
            return self.activation
        return self.pre_activation_module

    @property
    def pre_activation_module(self) -> nn.Module:
        """Module whose output is the pre-activation z (norm, else incoming)."""
        return self.norm if self.norm is not None else self.incoming

    def to_unit_matrix(self, output: torch.Tensor) -> torch.Tensor:
        """A layer output of this group as a ``(samples, units)`` matrix (Linear: last axis; conv: axis 1)."""
        return as_unit_matrix(output, channels_last=not self.is_conv)


def _num_units(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _infer_block(incoming: nn.Module, outgoing: nn.Module | None, block: int | None) -> int:
    """Columns of ``outgoing`` per unit; checks that ``outgoing`` can consume ``incoming``'s units."""
    if outgoing is None:
        return 1
    units = _num_units(incoming)
    if not isinstance(outgoing, nn.Linear):
        if outgoing.in_channels != units:
            raise ValueError(
                f"outgoing conv has in_channels={outgoing.in_channels}, expected {units} (the incoming units)"
            )
        inferred = 1
    elif isinstance(incoming, nn.Linear):
        if outgoing.in_features != units:
            raise ValueError(f"Linear -> Linear needs in_features == {units}, got {outgoing.in_features}")
        inferred = 1
    else:
        inferred, remainder = divmod(outgoing.in_features, units)
        if remainder or inferred == 0:
            raise ValueError(
                f"outgoing Linear has in_features={outgoing.in_features}, which is not a multiple of the "
                f"{units} channels of the incoming conv (conv -> Flatten -> Linear needs channels*H*W)"
            )
    if block is not None and block != inferred:
        raise ValueError(f"outgoing_block={block} does not match the layer sizes, which imply {inferred}")
    return inferred


# --------------------------------------------------------------------------- discovery


_BARRIER = object()


def _walk(module: nn.Module) -> Iterator[object]:
    """Leaf modules of nested Sequentials in execution order; any other container is a barrier."""
    for _, leaf in sequential_leaves(module):
        yield _BARRIER if leaf is None else leaf


def architecture_unit_groups(model: nn.Module) -> list[UnitGroup] | None:
    """UnitGroups of the resettable unit sites of a SmallResNet / SmallViT (:func:`lopkit.theory.unit_maps.unit_sites`:
    a ResNet block's ``conv1 -> norm1 -> act1 -> conv2``, a ViT block's ``v -> o`` and ``fc1 -> GELU -> fc2``);
    None for other models (wrappers looked through)."""
    model = unwrap_model(model)
    sites = unit_sites(model)
    if sites is None:
        return None
    modules = dict(model.named_modules())
    groups = []
    for site in sites:
        (outgoing,) = site.outgoing
        groups.append(UnitGroup(
            incoming=modules[site.incoming], outgoing=modules[outgoing],
            activation=None if site.activation is None else modules[site.activation],
            norm=None if site.norm is None else modules[site.norm], name=site.name,
        ))  # fmt: skip
    return groups


def find_unit_groups(model: nn.Module) -> list[UnitGroup]:
    """Unit groups of an ``nn.Sequential`` (nested allowed): Linear/Conv -> [norm] -> [activation] -> Linear/Conv.

    Dropout, pooling and Identity may sit anywhere between the two weight layers, ``Flatten`` between a
    conv and a Linear layer. Anything else (residual blocks, custom modules, attention, a second
    activation, a norm after the activation) ends the chain, and the layer before it is not a group.
    Groups are named after the activation module (e.g. ``act1``), else the incoming module. A module used
    at two places in the model (shared activation or tied weights) is an error: pass groups explicitly.
    A DDP, DataParallel or ``torch.compile`` wrapper is looked through (:func:`lopkit.layer_types.unwrap_model`).
    """
    model = unwrap_model(model)
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"find_unit_groups walks nn.Sequential models; {type(model).__name__} is not one. Build the groups "
            "by hand: UnitGroup(incoming=..., outgoing=..., activation=..., norm=..., name=...)"
        )
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    seen: set[int] = set()
    groups: list[UnitGroup] = []
    pending: dict | None = None
    for item in _walk(model):
        if item is _BARRIER:
            pending = None
            continue
        module: nn.Module = item  # type: ignore[assignment]
        if id(module) in seen and (isinstance(module, _WEIGHT_TYPES) or _is_activation(module)):
            raise ValueError(
                f"module {names.get(id(module), type(module).__name__)!r} is used at several places in the model; "
                "give each layer its own module or pass UnitGroup objects explicitly"
            )
        seen.add(id(module))
        if isinstance(module, _WEIGHT_TYPES):
            if pending is not None:
                group = _close_group(pending, module, names)
                if group is not None:
                    groups.append(group)
            pending = {"incoming": module, "norm": None, "activation": None, "flattened": False}
        elif pending is None:
            continue
        elif isinstance(module, _NORM_TYPES) and pending["norm"] is None and pending["activation"] is None \
                and not pending["flattened"] and _per_unit_norm(module, _num_units(pending["incoming"])):
            pending["norm"] = module
        elif _is_activation(module) and pending["activation"] is None and not pending["flattened"]:
            pending["activation"] = module
        elif isinstance(module, _PASS_THROUGH_TYPES):
            continue
        elif isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            pending["flattened"] = True
        else:
            pending = None
    return groups


def _per_unit_norm(norm: nn.Module, units: int) -> bool:
    """True if ``norm`` normalises a layer of ``units`` units without reshaping it (LayerNorm over the units only)."""
    if isinstance(norm, nn.LayerNorm):
        return tuple(norm.normalized_shape) == (units,)
    if isinstance(norm, nn.GroupNorm):
        return norm.num_channels == units
    return getattr(norm, "num_features", units) == units


def _close_group(pending: dict, outgoing: nn.Module, names: dict[int, str]) -> UnitGroup | None:
    incoming = pending["incoming"]
    conv_in = not isinstance(incoming, nn.Linear)
    linear_out = isinstance(outgoing, nn.Linear)
    if conv_in and linear_out and not pending["flattened"]:
        return None  # a Linear applied to a conv output acts on its last spatial axis: not our units
    if not conv_in and not linear_out:
        return None
    if conv_in and not linear_out and pending["flattened"]:
        return None
    try:
        block = _infer_block(incoming, outgoing, None)
    except ValueError:
        return None
    name_source = pending["activation"] if pending["activation"] is not None else incoming
    return UnitGroup(
        incoming=incoming, outgoing=outgoing, activation=pending["activation"], norm=pending["norm"],
        name=names.get(id(name_source), ""), outgoing_block=block,
    )  # fmt: skip


def resolve_unit_groups(
    model: nn.Module, groups: Sequence[UnitGroup] | Callable[[nn.Module], Sequence[UnitGroup]] | None = None
) -> list[UnitGroup]:
    """Groups for ``model``: ``groups`` as given, or called on the model if callable, else the ResNet/ViT unit sites
    (:func:`architecture_unit_groups`) or :func:`find_unit_groups`.

    Raises ValueError if no group is found, so a method never silently does nothing. A DDP, DataParallel or
    ``torch.compile`` wrapper is looked through, so the groups are the user's own modules.
    """
    model = unwrap_model(model)
    if groups is None:
        found = architecture_unit_groups(model)
        if found is None:
            found = find_unit_groups(model)
    elif callable(groups):
        found = list(groups(model))
    else:
        found = list(groups)
    if not found and any(splits_units(m) for m in model.modules()):
        raise ValueError(
            f"no unit groups found in {type(model).__name__}: its hidden activations are CReLU-like modules whose "
            "2H output features come from H incoming units, which unit resets do not handle; use such a method "
            "without crelu (e.g. with leaky_relu), or pass groups=[UnitGroup(...)] for elementwise layers"
        )
    if not found:
        raise ValueError(
            f"no unit groups found in {type(model).__name__}: resets need hidden Linear/Conv layers followed by "
            "another Linear/Conv layer; pass groups=[UnitGroup(incoming, outgoing, activation, ...)] explicitly"
        )
    for group in found:
        if not isinstance(group, UnitGroup):
            raise ValueError(f"groups must be UnitGroup objects, got {type(group).__name__}")
    return found


# --------------------------------------------------------------------------- masks and magnitudes


def unit_mask_tensor(group: UnitGroup, unit_mask: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """A bool tensor of shape ``(units,)`` on the CPU from a bool mask or a list/tensor of unit indices."""
    units = group.num_units
    mask = torch.as_tensor(unit_mask).detach().cpu()
    if mask.dtype == torch.bool:
        if tuple(mask.shape) != (units,):
            raise ValueError(f"unit mask for {group.name!r} must have shape ({units},), got {tuple(mask.shape)}")
        return mask
    indices = mask.reshape(-1).long()
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= units):
        raise ValueError(f"unit indices for {group.name!r} must lie in [0, {units}), got {indices.tolist()}")
    result = torch.zeros(units, dtype=torch.bool)
    result[indices] = True
    return result


def _row_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcastable mask selecting whole rows (output units) of ``weight``."""
    return mask.to(weight.device).reshape((-1,) + (1,) * (weight.dim() - 1))


def outgoing_weight_mask(group: UnitGroup, unit_mask: torch.Tensor | Sequence[int]) -> torch.Tensor | None:
    """Bool mask shaped like ``outgoing.weight``: the entries reading the selected units (None without outgoing)."""
    if group.outgoing is None:
        return None
    mask = unit_mask_tensor(group, unit_mask)
    weight = group.outgoing.weight
    result = torch.zeros(weight.shape, dtype=torch.bool)
    if isinstance(group.outgoing, nn.Linear):
        result[:, mask.repeat_interleave(group.outgoing_block)] = True
    elif group.outgoing.groups == 1:
        result[:, mask] = True
    else:
        per_in = group.outgoing.in_channels // group.outgoing.groups
        per_out = group.outgoing.out_channels // group.outgoing.groups
        for unit in mask.nonzero().flatten().tolist():
            g = unit // per_in
            result[g * per_out : (g + 1) * per_out, unit % per_in] = True
    return result.to(weight.device)


def _per_unit_sum(values: torch.Tensor, group: UnitGroup) -> torch.Tensor:
    """Sum of an outgoing-weight-shaped tensor over the entries that read each unit: shape ``(units,)``."""
    out = group.outgoing
    if isinstance(out, nn.Linear):
        return values.sum(dim=0).reshape(group.num_units, group.outgoing_block).sum(dim=1)
    if out.groups == 1:
        return values.transpose(0, 1).reshape(group.num_units, -1).sum(dim=1)
    per_in, per_out = out.in_channels // out.groups, out.out_channels // out.groups
    reshaped = values.reshape(out.groups, per_out, per_in, -1)  # (groups, out per group, in per group, kernel)
    return reshaped.sum(dim=(1, 3)).reshape(-1)


def outgoing_weight_magnitude(group: UnitGroup) -> torch.Tensor:
    """Per unit, sum of |w| over the outgoing weights reading it (CBP's contribution factor); 0 without outgoing."""
    if group.outgoing is None:
        return torch.zeros(group.num_units, device=group.incoming.weight.device)
    magnitude = group.outgoing.weight.detach().abs()
    if group.outgoing_block == 1 and isinstance(group.outgoing, nn.Linear):
        return magnitude.sum(dim=0)  # fast path: called every step by continual backprop
    return _per_unit_sum(magnitude, group)


def incoming_weight_magnitude(group: UnitGroup) -> torch.Tensor:
    """Per unit, sum of |w| over its incoming weights (the denominator of CBP's adaptable contribution)."""
    weight = group.incoming.weight.detach()
    return weight.abs().reshape(weight.shape[0], -1).sum(dim=1)


# --------------------------------------------------------------------------- initialisation


def activation_gain(activation: nn.Module | None) -> float:
    """Kaiming/Xavier gain for an activation module (ReLU-like smooth activations use ReLU's gain, None is linear)."""
    if activation is None or isinstance(activation, nn.Identity):
        return nn.init.calculate_gain("linear")
    if isinstance(activation, nn.LeakyReLU):
        return nn.init.calculate_gain("leaky_relu", activation.negative_slope)
    for kind, name in ((nn.Tanh, "tanh"), (nn.Sigmoid, "sigmoid"), (nn.SELU, "selu")):
        if isinstance(activation, kind):
            return nn.init.calculate_gain(name)
    return nn.init.calculate_gain("relu")


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def _sample(shape: tuple[int, ...], scheme: str, scale: float, generator: torch.Generator | None) -> torch.Tensor:
    """Float64 CPU samples: U(-scale, scale) for uniform schemes, N(0, scale^2) for normal ones."""
    if scheme.endswith("normal"):
        return torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2.0 - 1.0) * scale


def _weight_scale(weight: torch.Tensor, scheme: str, gain: float) -> float:
    fan_in, fan_out = _fans(weight)
    if scheme == "default":  # PyTorch's Linear/Conv init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))
        return 1.0 / math.sqrt(fan_in)
    if scheme == "kaiming_uniform":
        return gain * math.sqrt(3.0 / fan_in)
    if scheme == "kaiming_normal":
        return gain / math.sqrt(fan_in)
    if scheme == "xavier_uniform":
        return gain * math.sqrt(6.0 / (fan_in + fan_out))
    if scheme == "xavier_normal":
        return gain * math.sqrt(2.0 / (fan_in + fan_out))
    raise ValueError(f"unknown init scheme {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}")


@torch.no_grad()
def reinit_incoming(
    group: UnitGroup,
    unit_mask: torch.Tensor | Sequence[int],
    generator: torch.Generator | None = None,
    *,
    init: str = "default",
    bias: str = "zero",
) -> int:
    """Re-draw the incoming weights (rows / filters) of the selected units; returns how many units were reset.

    ``init="default"`` reproduces PyTorch's own Linear/Conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in));
    the Kaiming/Xavier schemes use the gain of ``group.activation`` (see :func:`activation_gain`).
    ``bias="zero"`` (continual backprop's choice) zeroes the units' biases; ``bias="default"`` draws them from
    PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Samples are drawn on the CPU from ``generator``
    (so results do not depend on the device) in float64 and cast to the weight's dtype.
    """
    if init not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {init!r}; choose one of {', '.join(INIT_SCHEMES)}")
    if bias not in BIAS_SCHEMES:
        raise ValueError(f"unknown bias scheme {bias!r}; choose 'zero' or 'default'")
    mask = unit_mask_tensor(group, unit_mask)
    count = int(mask.sum())
    if count == 0:
        return 0
    weight = group.incoming.weight
    scale = _weight_scale(weight, init, activation_gain(group.activation))
    rows = _sample((count,) + tuple(weight.shape[1:]), init, scale, generator)
    index = mask.nonzero().flatten().to(weight.device)
    weight.index_copy_(0, index, rows.to(device=weight.device, dtype=weight.dtype))
    layer_bias = group.incoming.bias
    if layer_bias is not None:
        if bias == "zero":
            values = torch.zeros(count, dtype=torch.float64)
        else:
            values = _sample((count,), "default", 1.0 / math.sqrt(_fans(weight)[0]), generator)
        layer_bias.index_copy_(0, index, values.to(device=layer_bias.device, dtype=layer_bias.dtype))
    return count


@torch.no_grad()
def reset_norm_units(group: UnitGroup, unit_mask: torch.Tensor | Sequence[int]) -> None:
    """Reset the selected units of ``group.norm`` to a fresh norm: affine weight 1, bias 0, running mean 0, var 1.

    LayerNorm/GroupNorm statistics mix units, so only their per-unit affine parameters are reset.
    """
    norm = group.norm
    if norm is None:
        return
    mask = unit_mask_tensor(group, unit_mask)
    for attr, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
        tensor = getattr(norm, attr, None)
        if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == (group.num_units,):
            tensor.masked_fill_(mask.to(tensor.device), value)


@torch.no_grad()
def zero_outgoing(group: UnitGroup, unit_mask: torch.Tensor | Sequence[int]) -> None:
    """Zero the outgoing weights reading the selected units (their contribution to the next layer becomes 0)."""
    mask = outgoing_weight_mask(group, unit_mask)
    if mask is not None:
        group.outgoing.weight.masked_fill_(mask, 0.0)


@torch.no_grad()
def absorb_into_outgoing_bias(
    group: UnitGroup, unit_mask: torch.Tensor | Sequence[int], unit_means: torch.Tensor
) -> bool:
    """Add each selected unit's mean contribution ``mean(h_j) * w_out[:, j]`` to the outgoing bias.

    Call it *before* :func:`zero_outgoing`: the next layer then sees the unit's mean instead of the unit, which
    is exact when the unit's activation is constant. For conv consumers the kernel's weights are summed, which
    ignores zero padding at the borders (approximate there). Returns False (nothing done) when the outgoing
    layer has no bias.
    """
    out = group.outgoing
    if out is None or out.bias is None:
        return False
    mask = unit_mask_tensor(group, unit_mask).to(out.weight.device)
    means = torch.as_tensor(unit_means, dtype=out.weight.dtype, device=out.weight.device).reshape(-1)
    if means.numel() != group.num_units:
        raise ValueError(f"unit_means must hold one value per unit ({group.num_units}), got {means.numel()}")
    selected = torch.where(mask, means, torch.zeros_like(means))
    weight = out.weight.detach()
    if isinstance(out, nn.Linear):
        per_column = selected.repeat_interleave(group.outgoing_block)
        out.bias.add_(weight @ per_column)
    elif out.groups == 1:
        out.bias.add_(weight.reshape(weight.shape[0], weight.shape[1], -1).sum(dim=2) @ selected)
    else:
        per_in, per_out = out.in_channels // out.groups, out.out_channels // out.groups
        kernel_sums = weight.reshape(out.groups, per_out, per_in, -1).sum(dim=3)
        out.bias.add_(torch.einsum("gok,gk->go", kernel_sums, selected.reshape(out.groups, per_in)).reshape(-1))
    return True


# --------------------------------------------------------------------------- optimizer state


def _unit_parameter_masks(group: UnitGroup, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, broadcastable bool mask of its entries that belong to the selected units) pairs."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = [(group.incoming.weight, _row_mask(group.incoming.weight, mask))]
    if group.incoming.bias is not None:
        pairs.append((group.incoming.bias, mask.to(group.incoming.bias.device)))
    if group.outgoing is not None:
        pairs.append((group.outgoing.weight, outgoing_weight_mask(group, mask)))
    if group.norm is not None:
        for attr in ("weight", "bias"):
            param = getattr(group.norm, attr, None)
            if isinstance(param, nn.Parameter) and tuple(param.shape) == (group.num_units,):
                pairs.append((param, mask.to(param.device)))
    return pairs


@torch.no_grad()
def reset_optimizer_state(
    optimizer: torch.optim.Optimizer | None, group: UnitGroup, unit_mask: torch.Tensor | Sequence[int]
) -> None:
    """Zero the optimizer state of the selected units' incoming rows, biases, norm entries and outgoing columns.

    Every state tensor shaped like its parameter is reset on the selected entries (Adam/AdamW ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq``; SGD ``momentum_buffer``; RMSprop ``square_avg``...); other units'
    entries are untouched. Adam's ``step`` counter is a single number per parameter tensor, so it is left
    alone: resetting it would change the bias correction of *every* unit of the layer. The price is that a
    reset unit's moments restart from zero without bias correction, so its first updates are larger than
    lr (about lr*(1-b1^k)/sqrt(1-b2^k) for k steps after the reset with a constant gradient: ~3x at k = 1,
    ~6x at k = 10 with the default betas), fading over ~1/(1-b2) steps.
    """
    if optimizer is None:
        return
    mask = unit_mask_tensor(group, unit_mask)
    if not bool(mask.any()):
        return
    for param, entries in _unit_parameter_masks(group, mask):
        state = optimizer.state.get(param)
        if not state:
            continue
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.masked_fill_(entries.to(value.device), 0)


@torch.no_grad()
def reset_units(
    group: UnitGroup,
    units: torch.Tensor | Sequence[int],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    generator: torch.Generator | None = None,
    init: str = "default",
    bias: str = "zero",
    unit_means: torch.Tensor | None = None,
    reset_optimizer: bool = True,
) -> int:
    """Give the selected units of ``group`` a fresh start, as ReDo, SNR and the unit resets do; returns their count.

    In order: with ``unit_means`` (one mean activation per unit) their mean contribution goes into the outgoing
    bias (:func:`absorb_into_outgoing_bias`); incoming rows and biases are re-drawn (:func:`reinit_incoming`),
    outgoing weights zeroed (:func:`zero_outgoing`), per-unit norm entries reset (:func:`reset_norm_units`) and,
    with ``reset_optimizer``, the optimizer state of all those entries zeroed (:func:`reset_optimizer_state`).
    ``units`` is a bool mask over the group's units or a list of unit indices. Use it to reset units of any
    model from your own rule::

        group = lk.find_unit_groups(model)[0]          # or UnitGroup(incoming=..., outgoing=..., activation=...)
        lk.reset_units(group, [3, 7], optimizer, generator=torch.Generator().manual_seed(0))
    """
    mask = unit_mask_tensor(group, units)
    count = int(mask.sum())
    if count == 0:
        return 0
    if unit_means is not None:
        absorb_into_outgoing_bias(group, mask, unit_means)
    reinit_incoming(group, mask, generator, init=init, bias=bias)
    zero_outgoing(group, mask)
    reset_norm_units(group, mask)
    if reset_optimizer:
        reset_optimizer_state(optimizer, group, mask)
    return count


# --------------------------------------------------------------------------- perturbation


@torch.no_grad()
def add_incoming_noise(
    group: UnitGroup,
    unit_mask: torch.Tensor | Sequence[int],
    scale: float,
    generator: torch.Generator | None = None,
    *,
    include_bias: bool = False,
) -> int:
    """Add N(0, sigma_j^2) noise to the selected units' incoming weights, sigma_j = scale * ||w_j|| / sqrt(fan_in).

    The noise vector of unit j therefore has norm about ``scale * ||w_j||``. A unit with all-zero weights uses
    the layer's mean row norm (or, for an all-zero layer, the default-init RMS 1/sqrt(fan_in)). With
    ``include_bias`` the bias gets noise of the same per-entry std. Returns the number of perturbed units.
    """
    if scale < 0:
        raise ValueError(f"noise scale must be >= 0, got {scale}")
    mask = unit_mask_tensor(group, unit_mask)
    count = int(mask.sum())
    if count == 0 or scale == 0:
        return count
    weight = group.incoming.weight
    rows = weight.detach().reshape(weight.shape[0], -1).double()
    fan_in = rows.shape[1]
    norms = rows.norm(dim=1).cpu()
    fallback = float(norms.mean()) if float(norms.mean()) > 0 else 1.0
    norms = torch.where(norms > 0, norms, torch.full_like(norms, fallback))
    std = scale * norms[mask] / math.sqrt(fan_in)
    noise = torch.randn((count, fan_in), generator=generator, dtype=torch.float64) * std[:, None]
    index = mask.nonzero().flatten().to(weight.device)
    new_rows = rows[index.to(rows.device)] + noise.to(rows.device)
    weight.index_copy_(0, index, new_rows.reshape((count,) + tuple(weight.shape[1:])).to(weight.dtype))
    if include_bias and group.incoming.bias is not None:
        bias_noise = torch.randn(count, generator=generator, dtype=torch.float64) * std
        b = group.incoming.bias
        b.index_add_(0, index, bias_noise.to(device=b.device, dtype=b.dtype))
    return count


# --------------------------------------------------------------------------- capturing activations


class UnitCapture:
    """Forward hooks that hand each group's activations to ``callback(group_index, kind, unit_matrix)``.

    ``kind`` is ``"h"`` (post-activation, the output of ``group.output_module``) or ``"z"`` (pre-activation,
    the output of ``group.pre_activation_module``). The matrix is detached and ``(samples, units)``-shaped.
    By default only forwards in training mode are reported, so evaluation passes (e.g. a Monitor probe, which
    runs in eval mode) never pollute training statistics. Set ``enabled = False`` to skip reporting cheaply.
    """

    def __init__(
        self,
        groups: Sequence[UnitGroup],
        callback: Callable[[int, str, torch.Tensor], None],
        *,
        post_activation: bool = True,
        pre_activation: bool = False,
        training_only: bool = True,
    ) -> None:
        self.groups = list(groups)
        self.callback = callback
        self.kinds = [k for k, on in (("h", post_activation), ("z", pre_activation)) if on]
        self.training_only = training_only
        self.enabled = True
        self._handles: list = []

    def attach(self) -> "UnitCapture":
        """Install the hooks (idempotent); returns self."""
        if self._handles:
            return self
        used: dict[int, int] = {}
        for index, group in enumerate(self.groups):
            for kind in self.kinds:
                module = group.output_module if kind == "h" else group.pre_activation_module
                if used.get(id(module), index) != index:
                    other = self.groups[used[id(module)]].name
                    self.remove()
                    raise ValueError(
                        f"groups {other!r} and {group.name!r} read the same module; each group needs its own modules"
                    )
                used[id(module)] = index
                self._handles.append(module.register_forward_hook(self._make_hook(index, kind)))
        return self

    def _make_hook(self, index: int, kind: str):
        group = self.groups[index]

        def hook(module: nn.Module, _inputs, output) -> None:
            if not self.enabled or (self.training_only and not module.training):
                return
            if not isinstance(output, torch.Tensor):
                return
            self.callback(index, kind, group.to_unit_matrix(output.detach()))

        return hook

    def remove(self) -> None:
        """Remove all hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        """Whether hooks are installed."""
        return bool(self._handles)


@torch.no_grad()
def unit_activations(
    model: nn.Module, group: UnitGroup, inputs: torch.Tensor, *, pre_activation: bool = False
) -> torch.Tensor:
    """Run ``model(inputs)`` without gradients and return the group's ``(samples, units)`` activations.

    Post-activation h by default, pre-activation z with ``pre_activation=True``. The model's train/eval
    mode is left as it is (note: BatchNorm in train mode updates its running statistics).
    """
    captured: list[torch.Tensor] = []
    module = group.pre_activation_module if pre_activation else group.output_module
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        model(inputs)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"group {group.name!r}: its module did not run during model(inputs); is it part of the model?")
    return group.to_unit_matrix(captured[-1]).clone()
