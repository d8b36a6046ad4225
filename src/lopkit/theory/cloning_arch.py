"""Function-preserving cloning (width x ``factor``) of the small ResNet and ViT of ``benchmarks.architectures``.

:func:`lopkit.theory.cloning.clone` dispatches here for :class:`SmallResNet` and :class:`SmallViT`.
The rules are those of the MLP/CNN path (paper App. A.4): every cloned unit gets the incoming
weights of its base unit, and the weights *from* a cloned input unit are divided by the size of
its block (``factor``), so the copies of an input together contribute the base weight and every
clone receives exactly the base pre-activation.  Inputs (pixels) and outputs (logits) are never
cloned.  What is cloned, and why the function is preserved:

* **ResNet.**  Units are channels.  The stem, each block's ``conv1``/``conv2`` and the projection
  shortcut duplicate their output channels; a stage's residual stream (the block outputs and the
  shortcut) uses one channel map, so both branches of every addition carry the same profile and
  their sum is the clone of the base sum.  BatchNorm duplicates ``weight``, ``bias``,
  ``running_mean`` and ``running_var`` per cloned channel: in eval mode each clone uses its base
  channel's statistics; in train mode the batch statistics of a duplicated channel equal the
  base's.  GroupNorm(1, C) (``norm="layer"``) normalises over all channels and pixels, and a
  tensor in which every channel appears ``factor`` times has the same mean and the same biased
  variance as the base tensor.  Average pooling is per channel; the head's columns are divided by
  ``factor``.
* **ViT.**  The residual stream (``dim`` features) is cloned feature by feature: patch
  projection rows, class token and position embedding entries are duplicated.  **LayerNorm** over
  the cloned stream is unchanged: a vector in which every feature appears ``factor`` times has
  the same mean and the same biased variance (``eps`` is unchanged too), so each clone is
  normalised to its base feature's value and gets its base ``gamma``/``beta``.  **Attention heads
  are cloned as whole heads** (``heads * factor`` heads of unchanged ``head_dim``): the rows of
  ``q``, ``k``, ``v`` for a cloned head repeat the base head's rows (columns divided by
  ``factor``, as for any cloned input), so each cloned head computes the base head's scores
  ``q_h . k_h / sqrt(head_dim)`` with the *same* scale (``head_dim`` did not change) and the same
  attention weights and values.  The output projection ``o`` reads ``factor`` copies of every head,
  so its columns are divided by ``factor``.  (Doubling ``head_dim`` instead would double every dot
  product ``q_h . k_h`` while the scale only shrinks by ``sqrt(factor)``, which changes the
  attention; it would need ``q`` rescaled by ``1/sqrt(factor)``.  The authors' code keeps the head
  count, which keeps clones identical to each other but does not preserve the base function.)
  The MLP hidden features are cloned like an MLP layer.  ``norm="none"`` has no LayerNorm at all.

The returned :class:`Partition` names every module whose output units are cloned: channels for
conv-side modules, features of ``(N, T, D)`` token tensors (``Partition.channels_last``) for the
transformer's token-wise modules, and heads for the attention weights (``blockK.attn.drop``,
``(N, heads, T, T)``, block id = base head).  Block ids: clone ``j`` of base unit ``k`` at
``k * factor + j`` (``layout="interleaved"``) or ``j * K + k`` (``"tiled"``); for ``q``/``k``/``v``
features the base feature is ``base_head * head_dim + d``.  Everything is block-constant, so the
clone lies on the cloned-unit manifold and SGD, momentum and Adam keep it there (Theorem 2.1,
Remark 2.4).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lopkit.benchmarks.architectures import SmallResNet, SmallViT
from lopkit.theory.unit_maps import clone_weight_layer, index_unit_tensors, new_unit_map
from lopkit.theory.partition import Partition

__all__ = ["ARCHITECTURES", "clone_architecture", "architecture_layer_blocks"]

#: Model classes cloned by this module (``clone`` dispatches on them).
ARCHITECTURES: tuple[type[nn.Module], ...] = (SmallResNet, SmallViT)

BlockIds = torch.Tensor | None


def clone_architecture(model: nn.Module, factor: int, layout: str = "interleaved") -> tuple[nn.Module, Partition]:
    """Function-preserving x``factor`` clone of a SmallResNet or SmallViT; returns (clone, partition)."""
    if isinstance(model, SmallResNet):
        return _clone_resnet(model, factor, layout)
    if isinstance(model, SmallViT):
        return _clone_vit(model, factor, layout)
    raise TypeError(f"clone_architecture(): expected SmallResNet or SmallViT, got {type(model).__name__}")


def _clone_norm(module: nn.Module, unit_map: torch.Tensor) -> nn.Module:
    """BatchNorm / GroupNorm(1, C) / LayerNorm with per-unit parameters and running statistics duplicated."""
    if isinstance(module, nn.BatchNorm2d):
        return index_unit_tensors(module, unit_map, ("weight", "bias", "running_mean", "running_var"),
                                   num_features=len(unit_map))
    if isinstance(module, nn.GroupNorm):
        if module.num_groups != 1:
            raise TypeError(f"clone(): GroupNorm with {module.num_groups} groups; only GroupNorm(1, C) is supported")
        return index_unit_tensors(module, unit_map, ("weight", "bias"), num_channels=len(unit_map))
    if isinstance(module, nn.LayerNorm):
        return index_unit_tensors(module, unit_map, ("weight", "bias"), normalized_shape=(len(unit_map),))
    if isinstance(module, nn.Identity):
        return copy.deepcopy(module)
    raise TypeError(f"clone(): unsupported normalisation {type(module).__name__}")


def _clone_resnet(model: SmallResNet, factor: int, layout: str) -> tuple[SmallResNet, Partition]:
    new = copy.deepcopy(model)
    blocks: dict[str, torch.Tensor] = {}

    def record(name: str, module: nn.Module, ids: torch.Tensor) -> None:
        if not isinstance(module, nn.Identity):
            blocks[name] = ids

    stream = new_unit_map(model.stem.out_channels, factor, layout)
    new.stem = clone_weight_layer(model.stem, stream, None)
    new.stem_norm = _clone_norm(model.stem_norm, stream)
    for name in ("stem", "stem_norm", "stem_act"):
        record(name, getattr(new, name), stream)
    for index, block in enumerate(model.blocks(), start=1):
        prefix, target = f"block{index}", getattr(new, f"block{index}")
        out = new_unit_map(block.conv1.out_channels, factor, layout)
        target.conv1 = clone_weight_layer(block.conv1, out, stream)
        target.norm1 = _clone_norm(block.norm1, out)
        target.conv2 = clone_weight_layer(block.conv2, out, out)
        target.norm2 = _clone_norm(block.norm2, out)
        for name in ("conv1", "norm1", "act1", "conv2", "norm2"):
            record(f"{prefix}.{name}", getattr(target, name), out)
        if isinstance(block.shortcut, nn.Sequential):
            target.shortcut.conv = clone_weight_layer(block.shortcut.conv, out, stream)
            target.shortcut.norm = _clone_norm(block.shortcut.norm, out)
            record(f"{prefix}.shortcut.conv", target.shortcut.conv, out)
            record(f"{prefix}.shortcut.norm", target.shortcut.norm, out)
        elif not torch.equal(out, stream):
            raise TypeError(f"clone(): {prefix} has an identity shortcut between different channel maps")
        record(prefix, target, out)
        stream = out
    for name in ("pool", "flatten", "drop"):
        record(name, getattr(new, name), stream)
    new.head = clone_weight_layer(model.head, None, stream)
    return new, Partition(blocks, factor=factor)


def _clone_vit(model: SmallViT, factor: int, layout: str) -> tuple[SmallViT, Partition]:
    new = copy.deepcopy(model)
    blocks: dict[str, torch.Tensor] = {}
    last: set[str] = set()

    def record(name: str, module: nn.Module, ids: torch.Tensor, units_last: bool = True) -> None:
        if not isinstance(module, nn.Identity):
            blocks[name] = ids
            if units_last:
                last.add(name)

    stream = new_unit_map(model.embed.proj.out_channels, factor, layout)
    new.embed.proj = clone_weight_layer(model.embed.proj, stream, None)
    for tensor in ("cls_token", "pos_embed"):
        old = getattr(model.embed, tensor)
        setattr(new.embed, tensor, nn.Parameter(old.detach()[..., stream].clone(), requires_grad=old.requires_grad))
    record("embed.proj", new.embed.proj, stream, units_last=False)  # conv output (N, C, h, w)
    record("embed", new.embed, stream)
    for index, block in enumerate(model.blocks(), start=1):
        prefix, target, attn = f"block{index}", getattr(new, f"block{index}"), block.attn
        head_map = new_unit_map(attn.heads, factor, layout)
        features = (head_map.view(-1, 1) * attn.head_dim + torch.arange(attn.head_dim).view(1, -1)).reshape(-1)
        hidden = new_unit_map(block.mlp.fc1.out_features, factor, layout)
        target.norm1 = _clone_norm(block.norm1, stream)
        target.norm2 = _clone_norm(block.norm2, stream)
        for name in ("q", "k", "v"):
            setattr(target.attn, name, clone_weight_layer(getattr(attn, name), features, stream))
        target.attn.o = clone_weight_layer(attn.o, stream, features)
        target.attn.heads = attn.heads * factor
        target.attn.o.concat_heads = attn.heads * factor
        target.mlp.fc1 = clone_weight_layer(block.mlp.fc1, hidden, stream)
        target.mlp.fc2 = clone_weight_layer(block.mlp.fc2, stream, hidden)
        record(f"{prefix}.norm1", target.norm1, stream)
        for name in ("q", "k", "v"):
            record(f"{prefix}.attn.{name}", getattr(target.attn, name), features)
        record(f"{prefix}.attn.drop", target.attn.drop, head_map, units_last=False)  # (N, heads, T, T)
        record(f"{prefix}.attn.o", target.attn.o, stream)
        record(f"{prefix}.norm2", target.norm2, stream)
        for name in ("fc1", "act", "drop"):
            record(f"{prefix}.mlp.{name}", getattr(target.mlp, name), hidden)
        record(f"{prefix}.mlp.fc2", target.mlp.fc2, stream)
        record(prefix, target, stream)
    new.norm = _clone_norm(model.norm, stream)
    record("norm", new.norm, stream)
    new.head = clone_weight_layer(model.head, None, stream)
    return new, Partition(blocks, factor=factor, channels_last=frozenset(last))


def architecture_layer_blocks(model: nn.Module, partition: Partition) -> dict[str, tuple[BlockIds, BlockIds]]:
    """For every Linear/Conv of a cloned ResNet/ViT: (output block ids, input block ids), ``None`` if not cloned.

    The input ids follow the real wiring (residual streams, shortcuts, attention heads) of
    :func:`lopkit.theory.unit_maps.layer_wiring`, which :func:`lopkit.theory.manifolds.weight_layer_blocks` reads.
    """
    if not isinstance(model, ARCHITECTURES):
        raise TypeError(f"architecture_layer_blocks(): expected SmallResNet or SmallViT, got {type(model).__name__}")
    from lopkit.theory.manifolds import weight_layer_blocks  # manifolds imports this module lazily

    return weight_layer_blocks(model, partition)
