"""Cloned-unit and frozen-unit LoP manifolds: residuals, projections and equitable perturbations.

Orientation (spec section 2.5, PyTorch layout).  A weight ``W`` of shape ``(out, in)`` has
``W[v, u] = theta_{u -> v}``.  Given output block ids (targets ``v``) and input block ids
(sources ``u``), for every block pair (target block ``J``, source block ``I``):

* forward / *incoming* condition (the paper's column-equitable, CE): every target unit
  ``v in J`` has the same incoming total ``sum_{u in I} W[v, u]`` -> identical forward values;
* backward / *outgoing* condition (row-equitable, RE): every source unit ``u in I`` has the
  same outgoing total ``sum_{v in J} W[v, u]`` -> identical back-propagated errors;
* block-constant (M_BC): every entry of the submatrix ``W[J, I]`` is equal (implies both).

Conv weights ``(out_ch, in_ch, *kernel)`` are treated as one ``(out_ch, in_ch)`` matrix per
kernel position and every condition must hold at every position: with block-identical input
channels, ``z[v, x] = sum_I sum_p (sum_{u in I} W[v, u, p]) h_I[x + p]``, so equal per-position
incoming sums give identical outputs, and dually for the backward pass.

Residuals are the largest *spread* (max - min) of the relevant quantity over all block pairs
(and kernel positions); they are 0 exactly on the manifold.  Block ids of ``None`` mean
"not cloned": every unit is its own (singleton) block.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from lopkit.layer_types import ELEMENTWISE_ACTIVATIONS, WEIGHT_LAYERS  # noqa: F401  (WEIGHT_LAYERS re-exported)
from lopkit.theory.partition import validate_block_ids
from lopkit.theory.unit_maps import layer_wiring

__all__ = [
    "incoming_block_sums",
    "outgoing_block_sums",
    "incoming_sums_residual",
    "outgoing_sums_residual",
    "block_constancy_residual",
    "project_block_constant",
    "project_equitable",
    "distance_to_block_constant",
    "distance_to_equitable",
    "random_equitable_perturbation",
    "weight_layer_blocks",
    "manifold_residuals",
    "make_equitable_nonconstant",
    "frozen_units",
    "ELEMENTWISE_ACTIVATIONS",
    "WEIGHT_LAYERS",
]

BlockIds = torch.Tensor | None  # block id of each unit; None = not cloned (singleton blocks)



# ---------------------------------------------------------------------------------------------
# Helpers


def _as_matrix_stack(weight: torch.Tensor) -> torch.Tensor:
    """View a Linear ``(out, in)`` or conv ``(out, in, *k)`` weight as ``(out, in, positions)``."""
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise ValueError(
            f"weight must be a tensor of shape (out, in) or (out, in, *kernel), got "
            f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}"
        )
    w = weight.detach()
    return w.reshape(w.shape[0], w.shape[1], -1)


def _blocks_or_singletons(blocks: torch.Tensor | None, size: int, what: str) -> torch.Tensor:
    if blocks is None:
        return torch.arange(size, dtype=torch.long)
    ids = validate_block_ids(blocks, name=what)
    if ids.numel() != size:
        raise ValueError(f"{what} has {ids.numel()} entries but the weight has {size} {what.split('_')[0]} units")
    return ids


def _prepare(weight, out_blocks, in_blocks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = _as_matrix_stack(weight)
    out_ids = _blocks_or_singletons(out_blocks, w.shape[0], "out_blocks").to(w.device)
    in_ids = _blocks_or_singletons(in_blocks, w.shape[1], "in_blocks").to(w.device)
    return w, out_ids, in_ids


def _one_hot(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Indicator matrix ``(num_blocks, units)``."""
    return torch.nn.functional.one_hot(ids, int(ids.max()) + 1).T.to(dtype)


def _group_spread(values: torch.Tensor, ids: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-group ``max - min`` of ``values`` along ``dim`` (groups given by ``ids``)."""
    return _group_extreme(values, ids, dim, "amax") - _group_extreme(values, ids, dim, "amin")


def _group_extreme(values: torch.Tensor, ids: torch.Tensor, dim: int, reduce: str) -> torch.Tensor:
    """Per-group ``amax`` or ``amin`` of ``values`` along ``dim``; that dim becomes the block dim."""
    moved = values.movedim(dim, 0)
    num = int(ids.max()) + 1
    index = ids.view(-1, *([1] * (moved.dim() - 1))).expand_as(moved)
    fill = -math.inf if reduce == "amax" else math.inf
    out = torch.full((num, *moved.shape[1:]), fill, dtype=moved.dtype, device=moved.device)
    return out.scatter_reduce(0, index, moved, reduce).movedim(0, dim)


# ---------------------------------------------------------------------------------------------
# Block sums and residuals


def incoming_block_sums(weight: torch.Tensor, in_blocks: torch.Tensor | None) -> torch.Tensor:
    """``S[v, I, p] = sum_{u in I} W[v, u, p]``: each target unit's incoming total from each source block."""
    w = _as_matrix_stack(weight)
    in_ids = _blocks_or_singletons(in_blocks, w.shape[1], "in_blocks").to(w.device)
    return torch.einsum("vup,Iu->vIp", w, _one_hot(in_ids, w.dtype))


def outgoing_block_sums(weight: torch.Tensor, out_blocks: torch.Tensor | None) -> torch.Tensor:
    """``T[J, u, p] = sum_{v in J} W[v, u, p]``: each source unit's outgoing total into each target block."""
    w = _as_matrix_stack(weight)
    out_ids = _blocks_or_singletons(out_blocks, w.shape[0], "out_blocks").to(w.device)
    return torch.einsum("Jv,vup->Jup", _one_hot(out_ids, w.dtype), w)


def incoming_sums_residual(weight: torch.Tensor, out_blocks: BlockIds, in_blocks: BlockIds) -> float:
    """Forward (incoming, CE) condition: max over block pairs of the spread of targets' incoming sums; 0 on M_CE."""
    w, out_ids, in_ids = _prepare(weight, out_blocks, in_blocks)
    sums = incoming_block_sums(w, in_ids)
    return float(_group_spread(sums, out_ids, dim=0).max())


def outgoing_sums_residual(weight: torch.Tensor, out_blocks: BlockIds, in_blocks: BlockIds) -> float:
    """Backward (outgoing, RE) condition: max over block pairs of the spread of sources' outgoing sums; 0 on M_RE."""
    w, out_ids, in_ids = _prepare(weight, out_blocks, in_blocks)
    sums = outgoing_block_sums(w, out_ids)
    return float(_group_spread(sums, in_ids, dim=1).max())


def block_constancy_residual(weight: torch.Tensor, out_blocks: BlockIds, in_blocks: BlockIds) -> float:
    """Max over block pairs of the spread (max - min) of the entries of ``W[J, I]``; 0 on M_BC (identical clones)."""
    w, out_ids, in_ids = _prepare(weight, out_blocks, in_blocks)
    hi = _group_extreme(_group_extreme(w, out_ids, 0, "amax"), in_ids, 1, "amax")
    lo = _group_extreme(_group_extreme(w, out_ids, 0, "amin"), in_ids, 1, "amin")
    return float((hi - lo).max())


# ---------------------------------------------------------------------------------------------
# Projections


def _block_means(w: torch.Tensor, out_ids: torch.Tensor, in_ids: torch.Tensor) -> torch.Tensor:
    a_out, a_in = _one_hot(out_ids, w.dtype), _one_hot(in_ids, w.dtype)
    sums = torch.einsum("Jv,vup,Iu->JIp", a_out, w, a_in)
    counts = a_out.sum(1).view(-1, 1, 1) * a_in.sum(1).view(1, -1, 1)
    return sums / counts


def project_block_constant(weight: torch.Tensor, out_blocks: BlockIds, in_blocks: BlockIds) -> torch.Tensor:
    """Frobenius-orthogonal projection onto M_BC: replace every block submatrix by its mean (same shape as weight)."""
    w, out_ids, in_ids = _prepare(weight, out_blocks, in_blocks)
    means = _block_means(w, out_ids, in_ids)
    return means[out_ids][:, in_ids].reshape(weight.shape)


def project_equitable(weight: torch.Tensor, out_blocks: BlockIds, in_blocks: BlockIds) -> torch.Tensor:
    """Frobenius-orthogonal projection onto M_RE ∩ M_CE: remove the centred row and column effects of every block.

    Each submatrix ``B`` decomposes orthogonally into its mean, centred row effects, centred column
    effects and a doubly-centred rest; the equitable set is (mean) + (doubly-centred), so the
    projection is ``B - (rowmean - mean) - (colmean - mean)``.
    """
    w, out_ids, in_ids = _prepare(weight, out_blocks, in_blocks)
    n_out = torch.bincount(out_ids).to(w.dtype)
    n_in = torch.bincount(in_ids).to(w.dtype)
    row_mean = incoming_block_sums(w, in_ids) / n_in.view(1, -1, 1)  # (out, K_in, p)
    col_mean = outgoing_block_sums(w, out_ids) / n_out.view(-1, 1, 1)  # (K_out, in, p)
    mean = _block_means(w, out_ids, in_ids)[out_ids][:, in_ids]
    projected = w - row_mean[:, in_ids] - col_mean[out_ids] + 2 * mean
    return projected.reshape(weight.shape)


def distance_to_block_constant(weight: torch.Tensor, out_blocks: BlockIds, in_blocks: BlockIds) -> float:
    """Frobenius distance from ``weight`` to its projection onto the block-constant set M_BC."""
    return float(torch.linalg.vector_norm(weight.detach() - project_block_constant(weight, out_blocks, in_blocks)))


def distance_to_equitable(weight: torch.Tensor, out_blocks: BlockIds, in_blocks: BlockIds) -> float:
    """Frobenius distance from ``weight`` to the equitable set M_RE ∩ M_CE (0 on the cloned manifold)."""
    return float(torch.linalg.vector_norm(weight.detach() - project_equitable(weight, out_blocks, in_blocks)))


# ---------------------------------------------------------------------------------------------
# Equitable, non-constant perturbations


def random_equitable_perturbation(
    out_blocks: torch.Tensor | None,
    in_blocks: torch.Tensor | None,
    generator: torch.Generator | None = None,
    scale: float = 1.0,
    *,
    out_units: int | None = None,
    in_units: int | None = None,
    kernel_shape: tuple[int, ...] = (),
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random non-zero ``P`` with zero row and column sums inside every block pair (per kernel position).

    ``W + P`` keeps every incoming and outgoing block sum of ``W`` (so it stays on the cloned
    manifold and computes the same function) but is no longer block-constant.  Built by double
    centring a standard Gaussian matrix within every block submatrix, times ``scale``.  Block
    pairs with a singleton side admit no such perturbation and get zeros; a ``ValueError`` is
    raised when every pair has a singleton side (e.g. first or last layers).
    """
    if out_blocks is None and out_units is None or in_blocks is None and in_units is None:
        raise ValueError("give block ids, or out_units/in_units for sides that are not cloned (singleton blocks)")
    n_out = out_units if out_blocks is None else len(out_blocks)
    n_in = in_units if in_blocks is None else len(in_blocks)
    out_ids = _blocks_or_singletons(out_blocks, n_out, "out_blocks")
    in_ids = _blocks_or_singletons(in_blocks, n_in, "in_blocks")
    dtype = dtype or torch.get_default_dtype()
    noise = torch.randn((n_out, n_in, *kernel_shape), generator=generator, dtype=dtype)
    doubly_centred = project_equitable(noise, out_ids, in_ids) - project_block_constant(noise, out_ids, in_ids)
    out_cloned = torch.bincount(out_ids)[out_ids] > 1
    in_cloned = torch.bincount(in_ids)[in_ids] > 1
    pair_mask = (out_cloned.view(-1, 1) & in_cloned.view(1, -1)).view(n_out, n_in, *([1] * len(kernel_shape)))
    doubly_centred = torch.where(pair_mask, doubly_centred, torch.zeros((), dtype=dtype))  # exact zeros, not rounding
    if not bool(pair_mask.any()):
        raise ValueError(
            "no block pair has >= 2 units on both sides, so the only equitable perturbation is zero; "
            "equitable non-constant weights exist only between two cloned (hidden) layers"
        )
    return (scale * doubly_centred).to(device=device)


def weight_layer_blocks(model: nn.Module, partition) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """For each Linear/Conv: (output block ids, input block ids), ``None`` where the side is not cloned.

    Which module's partition entry gives each side comes from :func:`lopkit.theory.unit_maps.layer_wiring`: the
    layer itself for its outputs; for its inputs the previous leaf module in registration order (the forward
    order of a nested ``nn.Sequential``), or the real wiring (residual streams, attention heads) of the small
    ResNet/ViT of ``lopkit.benchmarks.architectures``.
    """
    modules = dict(model.named_modules())
    result: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    for name, (out_key, in_key) in layer_wiring(model).items():
        weight = modules[name].weight
        out_ids = partition[out_key] if out_key in partition else None
        in_ids = partition[in_key] if in_key is not None and in_key in partition else None
        if out_ids is not None and len(out_ids) != weight.shape[0]:
            raise ValueError(f"partition[{name!r}] has {len(out_ids)} ids, which does not match the "
                             f"{weight.shape[0]} outputs of the layer; was the partition built for this model?")
        if in_ids is not None and len(in_ids) != weight.shape[1]:
            raise ValueError(
                f"{name!r}: the partition of its input {in_key!r} has {len(in_ids)} ids, which does not match the "
                f"layer's {weight.shape[1]} inputs; is the partition for this model?"
            )
        result[name] = (out_ids, in_ids)
    return result


def manifold_residuals(model: nn.Module, partition) -> list[dict]:
    """Tidy rows (``layer, metric, value``) of the cloned-manifold residuals of every Linear/Conv layer."""
    rows = []
    for name, (out_ids, in_ids) in weight_layer_blocks(model, partition).items():
        weight = dict(model.named_modules())[name].weight
        for metric, fn in (
            ("incoming_sums_residual", incoming_sums_residual),
            ("outgoing_sums_residual", outgoing_sums_residual),
            ("block_constancy_residual", block_constancy_residual),
            ("distance_to_block_constant", distance_to_block_constant),
            ("distance_to_equitable", distance_to_equitable),
        ):
            rows.append({"layer": name, "metric": metric, "value": fn(weight, out_ids, in_ids)})
    return rows


def make_equitable_nonconstant(
    cloned_model: nn.Module,
    partition,
    scale: float = 0.1,
    generator: torch.Generator | None = None,
    *,
    inplace: bool = False,
) -> nn.Module:
    """Add a random equitable perturbation to every hidden->hidden Linear/Conv: same function, not block-constant.

    Only layers whose inputs *and* outputs are cloned are perturbed.  The first layer reads the
    input features and the last layer writes the outputs; those are singleton blocks, and a block
    pair with a singleton side has a single row or column, so "equal incoming/outgoing sums" forces
    its entries to be equal: equitable there means block-constant, and any non-zero perturbation
    would change the function.  Biases (edges from a constant singleton node) are left alone for
    the same reason.  Returns a perturbed deep copy unless ``inplace=True``.
    """
    model = cloned_model if inplace else copy.deepcopy(cloned_model)
    modules = dict(model.named_modules())
    perturbed = 0
    for name, (out_ids, in_ids) in weight_layer_blocks(model, partition).items():
        if out_ids is None or in_ids is None:
            continue
        weight = modules[name].weight
        if not (torch.bincount(out_ids).max() > 1 and torch.bincount(in_ids).max() > 1):
            continue
        delta = random_equitable_perturbation(
            out_ids, in_ids, generator, scale, kernel_shape=tuple(weight.shape[2:]), dtype=weight.dtype
        )
        with torch.no_grad():
            weight.add_(delta.to(weight.device))
        perturbed += 1
    if perturbed == 0:
        raise ValueError(
            "make_equitable_nonconstant: no hidden->hidden layer with cloned inputs and outputs; "
            "the model needs at least two cloned hidden layers"
        )
    return model


# ---------------------------------------------------------------------------------------------
# Frozen units


def frozen_units(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    atol: float = 0.0,
    activation_types: tuple[type[nn.Module], ...] = ELEMENTWISE_ACTIVATIONS,
) -> dict[str, torch.Tensor]:
    """Activation module name -> bool mask of units whose derivative ``|f'(z)| <= atol`` on every input.

    Such units (e.g. ReLU with a very negative bias) get exactly zero gradient on their incoming
    weights and bias, so they lie on the frozen-unit manifold M_F.  Units are features of
    ``(N, D)`` or channels of ``(N, C, *spatial)`` pre-activations.  The derivative is computed
    by autograd of the elementwise activation; the model runs in eval mode (mode restored).
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, activation_types):
            handles.append(module.register_forward_pre_hook(_capture_input(captured, name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    modules = dict(model.named_modules())
    masks: dict[str, torch.Tensor] = {}
    for name, z in captured.items():
        derivative = _elementwise_derivative(modules[name], z)
        magnitude = derivative.abs()
        per_unit = magnitude.movedim(1, -1).reshape(-1, z.shape[1]) if z.dim() > 1 else magnitude.view(-1, 1)
        masks[name] = (per_unit <= atol).all(dim=0)
    return masks


def _capture_input(store: dict, name: str):
    """Pre-hook (runs before an in-place activation can overwrite its input) storing the pre-activation."""

    def hook(_module, args):
        store[name] = args[0].detach().clone()

    return hook


def _elementwise_derivative(activation: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``f'(z)`` elementwise, via autograd of ``sum f(z)`` (valid because ``f`` acts elementwise)."""
    fn = copy.deepcopy(activation)
    if hasattr(fn, "inplace"):
        fn.inplace = False
    with torch.enable_grad():
        z_var = z.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(z_var).sum(), z_var)
    return grad
