"""Unit-duplication primitives shared by the function-preserving clones (MLP/CNN and ResNet/ViT).

A ``unit_map`` is a 1-D index tensor: new unit ``i`` is a copy of base unit ``unit_map[i]``. Rows (outgoing units)
are duplicated as they are; columns (incoming units) are duplicated and divided by their block size, so the sum
over a block of clones equals the base unit's contribution.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lopkit.theory.partition import interleaved_block_ids, tiled_block_ids

__all__ = ["clone_weight_layer", "index_unit_tensors", "new_unit_map"]


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
