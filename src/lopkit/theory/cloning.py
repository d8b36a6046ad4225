"""Function-preserving cloning (width expansion by an integer factor) of ``nn.Sequential`` MLPs and CNNs.

Construction (paper section 2.5 / App. A.4, "tile weights scaled by 1/(input expansion)"):
every hidden unit (feature or channel) of the base network is copied ``factor`` times.  For a
Linear or Conv layer with output map ``out_map`` (base unit of each new output unit) and input
map ``in_map`` (base unit of each new input unit)::

    W_clone[o, i, ...] = W_base[out_map[o], in_map[i], ...] / |block of input unit i|
    b_clone[o]         = b_base[out_map[o]]

so every clone receives exactly the base pre-activation (the copies of an input unit together
contribute the base weight) and the clone computes the base function.  Input features and the
final layer's outputs are not cloned (singleton blocks).  Normalisation layers duplicate their
per-unit parameters and running statistics; for BatchNorm the batch statistics of duplicated
channels equal the base's, and for LayerNorm / GroupNorm(1, C) the mean and variance over a
vector in which every entry appears ``factor`` times equal those of the base vector, so train
and eval mode are both preserved.

The result is block-constant within every block pair, hence on the cloned-unit manifold
(equal incoming *and* outgoing sums), so SGD, momentum and Adam keep it there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from lopkit.layer_types import CLONABLE_ELEMENTWISE
from lopkit.theory.partition import Partition
from lopkit.theory.unit_maps import clone_weight_layer, index_unit_tensors, is_chain, new_unit_map, sequential_leaves

__all__ = ["clone", "SUPPORTED_MODULES", "LAYOUTS"]

LAYOUTS = ("interleaved", "tiled")

_LINEAR = (nn.Linear,)
_CONV = (nn.Conv1d, nn.Conv2d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
_ELEMENTWISE = CLONABLE_ELEMENTWISE
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_POOL = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
_OUTPUT_ONLY = (nn.Softmax, nn.LogSoftmax)  # allowed only where units are not cloned (after the last layer)

SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (
    _LINEAR + _CONV + _BATCHNORM + (nn.LayerNorm, nn.GroupNorm, nn.PReLU, nn.Flatten)
    + _ELEMENTWISE + _DROPOUT + _POOL + _OUTPUT_ONLY
)


@dataclass
class _State:
    """What the tensor flowing between modules looks like, seen from the clone."""

    unit_map: torch.Tensor | None = None  # base unit index of each current unit; None = not cloned
    spatial: bool | None = None  # True: units are channels of (N, C, *spatial); False: features; None: unknown
    pending_channels: torch.Tensor | None = None  # channel map of a Flatten whose spatial size is not yet known
    pending_names: list[str] = field(default_factory=list)  # modules whose flattened block ids await that size


def clone(model: nn.Module, factor: int, layout: str = "interleaved") -> tuple[nn.Module, Partition]:
    """Function-preserving width expansion of an ``nn.Sequential`` MLP/CNN by ``factor``; returns (clone, partition).

    The small ResNet and ViT of :mod:`lopkit.benchmarks.architectures` are handled by
    :mod:`lopkit.theory.cloning_arch` (residual streams, attention heads, LayerNorm statistics).

    ``layout="interleaved"`` puts clone ``j`` of base unit ``k`` at index ``k * factor + j`` (as the
    authors' code); ``layout="tiled"`` at ``j * K + k``.  The partition maps every module of the clone
    whose output units are cloned to the base unit index of each unit; for a ``Flatten`` after
    cloned channels the ids are ``base_channel * HW + s``.  The clone is a deep copy (same dtype and
    device); the base is not modified.  Raises ``TypeError`` for unsupported modules.  The modules are walked by
    the one unit walker, :func:`lopkit.theory.unit_maps.sequential_leaves`: a module registered at several places
    is cloned at each place and stays one (tied) module, which needs its clones at every place to be equal.
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive integer (the width expansion), got {factor!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    from lopkit.theory.cloning_arch import ARCHITECTURES, clone_architecture  # lazy: it imports this module

    if isinstance(model, ARCHITECTURES):
        return clone_architecture(model, factor, layout)
    _check_sequential(model, "model")
    leaves = _leaf_modules(model)
    for name, module in leaves:
        if not isinstance(module, SUPPORTED_MODULES):
            raise TypeError(
                f"clone(): module {name!r} of type {type(module).__name__} is not supported. Supported modules: "
                f"{', '.join(sorted(t.__name__ for t in SUPPORTED_MODULES))} (inside nested nn.Sequential)."
            )
    last_layer = _last_weight_layer(leaves)

    cloned = copy.deepcopy(model)
    state = _State()
    blocks: dict[str, torch.Tensor] = {}
    shared: dict[int, tuple[str, nn.Module]] = {}  # a module with tensors registered at several places
    for name, base_module in leaves:
        is_last = name == last_layer
        new_module, state = _clone_module(name, base_module, state, factor, layout, is_last, blocks)
        new_module = _tie(shared, name, base_module, new_module)
        _replace_module(cloned, name, new_module)
        if state.pending_channels is not None:
            state.pending_names.append(name)
        elif state.unit_map is not None:
            blocks[name] = state.unit_map
    if state.pending_channels is not None:
        raise TypeError(
            "clone(): a Flatten of cloned channels is not followed by a Linear, BatchNorm1d or LayerNorm, so its "
            "spatial size cannot be inferred"
        )
    return cloned, Partition(blocks, factor=factor)


# ---------------------------------------------------------------------------------------------
# Module walking


def _check_sequential(module: nn.Module, name: str) -> None:
    if not is_chain(module):
        raise TypeError(
            f"clone(): {name!r} must be an nn.Sequential (nested Sequentials allowed) whose forward is the plain "
            f"Sequential forward, got {type(module).__name__}; the forward order of other containers is unknown"
        )


def _leaf_modules(model: nn.Sequential) -> list[tuple[str, nn.Module]]:
    """Leaf modules of nested Sequentials in forward order (the one walker,
    :func:`lopkit.theory.unit_maps.sequential_leaves`); any other container is an error."""
    leaves = list(sequential_leaves(model))
    for name, leaf in leaves:
        if leaf is None:
            _check_sequential(model.get_submodule(name), name)
    return leaves  # type: ignore[return-value]


def _tie(shared: dict[int, tuple[str, nn.Module]], name: str, base: nn.Module, new: nn.Module) -> nn.Module:
    """The clone of a module with tensors registered at several places is one module too (tied as in the base),
    provided its clones at every place are equal; otherwise the clone cannot keep the tie."""
    if not any(True for _ in base.parameters()) and not any(True for _ in base.buffers()):
        return new
    if id(base) not in shared:
        shared[id(base)] = (name, new)
        return new
    first_name, first = shared[id(base)]
    first_state, new_state = first.state_dict(), new.state_dict()
    if first_state.keys() == new_state.keys() and all(
        first_state[k].shape == new_state[k].shape and torch.equal(first_state[k], new_state[k]) for k in first_state
    ):
        return first
    raise TypeError(
        f"clone(): module {first_name!r} is registered again at {name!r} but its clones there differ (the units "
        "it reads or writes are cloned differently), so the tie cannot be kept; give each place its own module"
    )


def _last_weight_layer(leaves: list[tuple[str, nn.Module]]) -> str | None:
    """Name of the last Linear/Conv layer: its outputs are the network outputs and are not cloned."""
    names = [n for n, m in leaves if isinstance(m, _LINEAR + _CONV)]
    return names[-1] if names else None


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent = root
    *path, last = name.split(".")
    for key in path:
        parent = parent._modules[key]
    parent._modules[last] = new


# ---------------------------------------------------------------------------------------------
# Per-module rules


def _clone_module(
    name: str,
    module: nn.Module,
    state: _State,
    factor: int,
    layout: str,
    is_last: bool,
    blocks: dict[str, torch.Tensor],
) -> tuple[nn.Module, _State]:
    """Cloned copy of one leaf module and the state of its output."""
    if isinstance(module, _LINEAR):
        state = _resolve_flatten(state, module.in_features, name, blocks)
        if state.spatial is True:
            raise TypeError(f"clone(): Linear {name!r} is applied to a conv feature map; insert a Flatten before it")
        out_map = None if is_last else new_unit_map(module.out_features, factor, layout)
        return clone_weight_layer(module, out_map, state.unit_map), _State(out_map, spatial=False)
    if isinstance(module, _CONV):
        if module.groups != 1:
            raise TypeError(
                f"clone(): {type(module).__name__} {name!r} has groups={module.groups}; only groups=1 is supported"
            )
        if state.pending_channels is not None or state.spatial is False and state.unit_map is not None:
            raise TypeError(f"clone(): {type(module).__name__} {name!r} follows flattened features; cannot clone")
        out_map = None if is_last else new_unit_map(module.out_channels, factor, layout)
        return clone_weight_layer(module, out_map, state.unit_map), _State(out_map, spatial=True)
    if isinstance(module, _BATCHNORM):
        state = _resolve_flatten(state, module.num_features, name, blocks)
        return index_unit_tensors(module, state.unit_map, ("weight", "bias", "running_mean", "running_var"),
                                   num_features=_new_count(state, module.num_features)), state
    if isinstance(module, nn.LayerNorm):
        return _clone_layer_norm(name, module, state, blocks)
    if isinstance(module, nn.GroupNorm):
        return _clone_group_norm(name, module, state), state
    if isinstance(module, nn.PReLU):
        if module.num_parameters == 1:
            return copy.deepcopy(module), state
        _require_resolved(state, name)
        if state.unit_map is None:
            return copy.deepcopy(module), state
        return index_unit_tensors(module, state.unit_map, ("weight",), num_parameters=len(state.unit_map)), state
    if isinstance(module, nn.Flatten):
        return copy.deepcopy(module), _flatten_state(name, module, state)
    if isinstance(module, _POOL):
        if state.pending_channels is not None or (state.unit_map is not None and state.spatial is False):
            raise TypeError(f"clone(): pooling {name!r} over cloned features (not channels) would mix clones")
        return copy.deepcopy(module), state
    if isinstance(module, _ELEMENTWISE + _DROPOUT):
        return copy.deepcopy(module), state
    if isinstance(module, _OUTPUT_ONLY):
        if state.unit_map is not None or state.pending_channels is not None:
            raise TypeError(f"clone(): {type(module).__name__} {name!r} mixes cloned units; only allowed on outputs")
        return copy.deepcopy(module), state
    raise TypeError(f"clone(): module {name!r} of type {type(module).__name__} is not supported")




def _new_count(state: _State, base_count: int) -> int:
    return base_count if state.unit_map is None else int(state.unit_map.numel())






def _clone_layer_norm(name: str, module: nn.LayerNorm, state: _State, blocks: dict) -> tuple[nn.Module, _State]:
    """LayerNorm over the (flattened) feature dim; duplicating gamma/beta preserves the function."""
    if state.unit_map is None and state.pending_channels is None:
        return copy.deepcopy(module), state
    if len(module.normalized_shape) != 1:
        raise TypeError(
            f"clone(): LayerNorm {name!r} normalises over {tuple(module.normalized_shape)}; only a LayerNorm over the "
            "last (feature) dimension of (N, D) activations is supported"
        )
    state = _resolve_flatten(state, module.normalized_shape[0], name, blocks)
    if state.spatial is True:
        raise TypeError(f"clone(): LayerNorm {name!r} on a conv feature map normalises over space, not channels")
    new = index_unit_tensors(module, state.unit_map, ("weight", "bias"))
    new.normalized_shape = (int(state.unit_map.numel()),)
    return new, state


def _clone_group_norm(name: str, module: nn.GroupNorm, state: _State) -> nn.Module:
    """GroupNorm: duplicate per-channel affine; each new group must hold exactly the clones of one base group."""
    _require_resolved(state, name)
    if state.unit_map is None:
        return copy.deepcopy(module)
    unit_map = state.unit_map
    groups, base_channels, channels = module.num_groups, module.num_channels, int(unit_map.numel())
    if groups > 1:
        base_group = unit_map // (base_channels // groups)
        new_group = torch.arange(channels) // (channels // groups)
        if not torch.equal(base_group, new_group):
            raise TypeError(
                f"clone(): GroupNorm {name!r} with num_groups={groups} mixes clones of different base groups in this "
                "layout; use layout='interleaved' or GroupNorm(1, C)"
            )
    return index_unit_tensors(module, unit_map, ("weight", "bias"), num_channels=channels)


def _flatten_state(name: str, module: nn.Flatten, state: _State) -> _State:
    """A Flatten of cloned channels waits for the next layer to tell the spatial size (HW)."""
    if state.unit_map is None or state.spatial is False:
        return state
    if module.start_dim != 1 or module.end_dim != -1:
        raise TypeError(f"clone(): Flatten {name!r} must flatten dims 1..-1 (start_dim=1, end_dim=-1)")
    if state.pending_channels is not None:
        return state
    return _State(None, spatial=False, pending_channels=state.unit_map, pending_names=[])


def _resolve_flatten(state: _State, base_features: int, name: str, blocks: dict[str, torch.Tensor]) -> _State:
    """Turn a pending channel map into a flattened map ``c * HW + s -> map[c] * HW + s`` with HW = features / K."""
    if state.pending_channels is None:
        return state
    channel_map = state.pending_channels
    base_channels = int(channel_map.max()) + 1
    if base_features % base_channels != 0:
        raise TypeError(
            f"clone(): {name!r} expects {base_features} base features after Flatten, not a multiple of the "
            f"{base_channels} base channels; cannot infer the spatial size"
        )
    spatial_size = base_features // base_channels
    flat_map = (channel_map.view(-1, 1) * spatial_size + torch.arange(spatial_size).view(1, -1)).reshape(-1)
    for pending in state.pending_names:
        blocks[pending] = flat_map
    return _State(flat_map, spatial=False)


def _require_resolved(state: _State, name: str) -> None:
    if state.pending_channels is not None:
        raise TypeError(f"clone(): {name!r} directly after a Flatten of cloned channels is not supported")
