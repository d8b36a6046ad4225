"""Where a network's units live, and unit-duplication primitives for the function-preserving clones.

**The unit walker** (one for the whole library): :func:`layer_wiring` says, for every Linear/Conv layer, which
module's output holds its output units and which module's output holds its input units (so a partition of
those modules gives the layer's row and column block ids); :func:`unit_sites` lists the *resettable* hidden
unit groups: units made by the rows of one weight layer (``incoming``), optionally normalised per unit
(``norm``: BatchNorm, or a per-unit LayerNorm/GroupNorm), passed through an elementwise ``activation``, and
read only by the columns of weight layers (``outgoing``). Resets (``lopkit.mitigations``), the cloned-unit
manifold checks (``lopkit.theory.manifolds``) and the ResNet/ViT clone wiring use these.

- ``nn.Sequential`` models (MLP, CNN): a layer's input is the output of the leaf module before it in
  registration order; the unit sites are found by ``lopkit.mitigations.layers.find_unit_groups`` and the clones
  of ``lopkit.theory.cloning.clone`` are built on the same leaf walk (:func:`sequential_leaves`).
- :class:`~lopkit.benchmarks.architectures.SmallResNet`: the real wiring: a block's ``conv1`` and projection
  ``shortcut.conv`` read the residual stream (the previous block's output, or ``stem``), ``conv2`` reads
  ``conv1``'s units; the head reads the last block. Resettable: every block's ``conv1 -> norm1 -> act1 ->
  conv2`` channels (through the per-channel BatchNorm ``norm1``, or none; not GroupNorm, see below). Stream channels are not resettable:
  several layers write them (the residual sum), so no set of rows alone makes them.
- :class:`~lopkit.benchmarks.architectures.SmallViT`: ``q``/``k``/``v`` and ``mlp.fc1`` read the stream (the
  embedding or the previous block, through ``norm1``/``norm2``), ``o`` reads ``v``'s features (head by head),
  ``fc2`` reads ``fc1``'s. Resettable: the MLP hidden features (``fc1 -> GELU -> fc2``) and the value features
  (``v -> attention mixing over tokens -> o``: the mixing is linear in each value feature, so zeroing ``o``'s
  column of a feature removes it exactly). ``q``/``k`` features are not: they enter a softmax, not a column.
  The stream is not: its LayerNorm mixes every feature's statistics, so no column-zeroing keeps the function.

A GroupNorm(1, C) (the ResNet's ``norm="layer"``) normalises over all channels at once: it is not a per-unit
norm, so a ResNet with it has no resettable unit sites (a reset there would change the other channels).

A ``unit_map`` is a 1-D index tensor: new unit ``i`` is a copy of base unit ``unit_map[i]``. Rows (outgoing units)
are duplicated as they are; columns (incoming units) are duplicated and divided by their block size, so the sum
over a block of clones equals the base unit's contribution.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lopkit.layer_types import WEIGHT_LAYERS
from lopkit.theory.partition import interleaved_block_ids, tiled_block_ids

__all__ = ["UnitSite", "clone_weight_layer", "index_unit_tensors", "is_chain", "layer_wiring", "new_unit_map",
           "sequential_leaves", "unit_sites", "WEIGHT_LAYERS"]

# WEIGHT_LAYERS (lopkit.layer_types): weight layers whose rows make units and whose columns read them.
_PER_UNIT_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class UnitSite:
    """A resettable hidden unit group, by module names: ``incoming`` rows -> [``norm``] -> [``activation``] ->
    columns of every ``outgoing`` layer; ``units_last``: the units are the last axis of the outputs (tokens)."""

    name: str
    incoming: str
    outgoing: tuple[str, ...]
    norm: str | None = None
    activation: str | None = None
    units_last: bool = False


def is_chain(module: nn.Module) -> bool:
    """Whether a module runs its children one after the other in registration order: an ``nn.Sequential`` (or a
    subclass) whose forward is the plain Sequential forward."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def sequential_leaves(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module | None]]:
    """``(name, leaf)`` of nested chains (:func:`is_chain`) in forward order; ``(name, None)`` for any other
    container or Sequential with its own forward (a barrier: its inside is not a chain); a module registered
    twice is yielded at each place."""
    for key, child in model._modules.items():  # not children(): it skips a module's second occurrence
        if child is None:
            continue
        name = f"{prefix}.{key}" if prefix else key
        if is_chain(child):
            yield from sequential_leaves(child, name)
        elif isinstance(child, nn.Sequential) or any(True for _ in child.children()):
            yield name, None
        else:
            yield name, child


def _architectures() -> tuple[type[nn.Module], type[nn.Module]]:
    """The ResNet and ViT classes (imported late: the builders import nothing of theory)."""
    from lopkit.benchmarks.architectures import SmallResNet, SmallViT

    return SmallResNet, SmallViT


def _real(module: nn.Module, name: str) -> str | None:
    """``name``, or None when the module is an ``nn.Identity`` (no norm there)."""
    return None if isinstance(module, nn.Identity) else name


def layer_wiring(model: nn.Module) -> dict[str, tuple[str | None, str | None]]:
    """Every Linear/Conv layer -> (module whose output holds its output units, module whose output holds its inputs).

    The output entry is the layer itself; the input entry is ``None`` for the network input. ResNet/ViT follow
    their real wiring (module docstring); other models use the leaf before the layer in registration order
    (the forward order of a nested ``nn.Sequential``).
    """
    resnet_type, vit_type = _architectures()
    if isinstance(model, resnet_type):
        wiring: dict[str, tuple[str | None, str | None]] = {"stem": ("stem", None)}
        stream = "stem"
        for index in range(1, model.num_blocks + 1):
            prefix = f"block{index}"
            wiring[f"{prefix}.conv1"] = (f"{prefix}.conv1", stream)
            wiring[f"{prefix}.conv2"] = (f"{prefix}.conv2", f"{prefix}.conv1")
            if isinstance(getattr(model, prefix).shortcut, nn.Sequential):
                wiring[f"{prefix}.shortcut.conv"] = (f"{prefix}.shortcut.conv", stream)
            stream = prefix
        wiring["head"] = ("head", stream)
        return wiring
    if isinstance(model, vit_type):
        wiring = {"embed.proj": ("embed.proj", None)}
        stream = "embed"
        for index in range(1, model.depth + 1):
            prefix = f"block{index}"
            for name in ("q", "k", "v"):
                wiring[f"{prefix}.attn.{name}"] = (f"{prefix}.attn.{name}", stream)
            wiring[f"{prefix}.attn.o"] = (f"{prefix}.attn.o", f"{prefix}.attn.v")
            wiring[f"{prefix}.mlp.fc1"] = (f"{prefix}.mlp.fc1", stream)
            wiring[f"{prefix}.mlp.fc2"] = (f"{prefix}.mlp.fc2", f"{prefix}.mlp.fc1")
            stream = prefix
        wiring["head"] = ("head", stream)
        return wiring
    wiring = {}
    previous: str | None = None
    for name, module in model.named_modules():
        if len(list(module.children())) > 0:
            continue
        if isinstance(module, WEIGHT_LAYERS):
            wiring[name] = (name, previous)
        previous = name
    return wiring


def unit_sites(model: nn.Module) -> list[UnitSite] | None:
    """The resettable unit groups of a SmallResNet / SmallViT (module docstring); None for other models (their
    groups come from the sequential walk of ``lopkit.mitigations.layers.find_unit_groups``)."""
    resnet_type, vit_type = _architectures()
    sites: list[UnitSite] = []
    if isinstance(model, resnet_type):
        for index, block in enumerate(model.blocks(), start=1):
            prefix = f"block{index}"
            if not isinstance(block.norm1, (nn.Identity, *_PER_UNIT_NORMS)):
                continue  # GroupNorm(1, C) mixes all channels: no per-unit reset keeps the others intact
            sites.append(UnitSite(f"{prefix}.act1", f"{prefix}.conv1", (f"{prefix}.conv2",),
                                  _real(block.norm1, f"{prefix}.norm1"), f"{prefix}.act1"))
        return sites
    if isinstance(model, vit_type):
        for index in range(1, model.depth + 1):
            prefix = f"block{index}"
            sites.append(UnitSite(f"{prefix}.attn.v", f"{prefix}.attn.v", (f"{prefix}.attn.o",), units_last=True))
            sites.append(UnitSite(f"{prefix}.mlp.act", f"{prefix}.mlp.fc1", (f"{prefix}.mlp.fc2",),
                                  activation=f"{prefix}.mlp.act", units_last=True))
        return sites
    return None


def new_unit_map(base_units: int, factor: int, layout: str) -> torch.Tensor:
    """Block ids of ``base_units * factor`` new units: clones side by side (interleaved) or in copies (tiled)."""
    if layout == "interleaved":
        return interleaved_block_ids(base_units, factor)
    return tiled_block_ids(base_units, factor)


def clone_weight_layer(module: nn.Module, out_map: torch.Tensor | None, in_map: torch.Tensor | None) -> nn.Module:
    """Linear/Conv with rows duplicated by ``out_map`` and columns duplicated and divided by their block size."""
    new = copy.deepcopy(module)
    weight = module.weight.detach()
    if out_map is not None:
        weight = weight[out_map.to(weight.device)]
    if in_map is not None:
        in_map_d = in_map.to(weight.device)
        block_size = torch.bincount(in_map_d).to(weight.dtype)[in_map_d]
        weight = weight[:, in_map_d] / block_size.view(1, -1, *([1] * (weight.dim() - 2)))
    new.weight = nn.Parameter(weight.clone(), requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        bias = module.bias.detach()
        if out_map is not None:
            bias = bias[out_map.to(bias.device)]
        new.bias = nn.Parameter(bias.clone(), requires_grad=module.bias.requires_grad)
    if isinstance(module, nn.Linear):
        new.in_features, new.out_features = weight.shape[1], weight.shape[0]
    else:
        new.in_channels, new.out_channels = weight.shape[1], weight.shape[0]
    return new


def index_unit_tensors(module: nn.Module, unit_map: torch.Tensor | None, names: tuple[str, ...], **attrs) -> nn.Module:
    """Deep copy of ``module`` with its per-unit parameters/buffers duplicated along dim 0 by ``unit_map``."""
    new = copy.deepcopy(module)
    if unit_map is None:
        return new
    for tensor_name in names:
        old = getattr(module, tensor_name, None)
        if old is None:
            continue
        values = old.detach()[unit_map.to(old.device)].clone()
        if isinstance(old, nn.Parameter):
            setattr(new, tensor_name, nn.Parameter(values, requires_grad=old.requires_grad))
        else:
            new.register_buffer(tensor_name, values)
    for attr, value in attrs.items():
        setattr(new, attr, value)
    return new
