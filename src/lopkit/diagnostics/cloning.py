"""Cloning R^2: how much of a layer's variation across units is explained by the unit's clone block.

``block_ids`` gives, for each unit, the block (base unit) it belongs to; any integer labels and any
layout work (interleaved, contiguous or scattered). R^2 = 1 means units in every block are exact clones
(the network sits on the cloned-unit LoP manifold, Theorem 2.1); noise or dropout pull it below 1.
Apply it to forward activations and to backward gradients (dL/dh) alike.

Two definitions exist (spec ``lop_paper.md`` section 8.7, ``fidelity_notes.md`` E2), named after their source:

- ``variance_ratio`` (the paper's text, lopkit's default): 1 - residual sum of squares / total sum of squares;
- ``std_ratio_barriers`` (the Barriers authors' code, what their figures plot): 1 - mean over (sample, block) of
  the std within the block / the std across the layer. Their code's "mean" key then sums the *forward* values
  only but divides by the number of forward + backward entries (exact clones score about 0.5); lopkit does not
  copy that: report forward and backward separately.
"""

from __future__ import annotations

import torch

from .errors import warn_nan
from .units import check_finite, to_float_unit_matrix

__all__ = ["R2_DEFINITIONS", "block_means", "cloning_r2"]

R2_DEFINITIONS = ("std_ratio_barriers", "variance_ratio")
"""Cloning R^2 definitions: the Barriers authors' code (std ratio) and the paper's text (variance ratio)."""

LEGACY_EPS = 1e-10  # the authors' code adds this to the per-sample std before dividing


def _validate_block_ids(block_ids: torch.Tensor, n_units: int, device: torch.device) -> torch.Tensor:
    """Check ``block_ids`` is a 1-D integer tensor with one entry per unit and move it to ``device``."""
    block_ids = torch.as_tensor(block_ids)
    if block_ids.dim() != 1:
        raise ValueError(
            f"block_ids must be 1-D (one block id per unit), got shape {tuple(block_ids.shape)}"
        )
    if block_ids.dtype.is_floating_point or block_ids.dtype.is_complex or block_ids.dtype == torch.bool:
        raise ValueError(
            f"block_ids must hold integers (e.g. torch.long), got dtype {block_ids.dtype}"
        )
    if block_ids.numel() != n_units:
        raise ValueError(
            f"block_ids has {block_ids.numel()} entries but the activations have {n_units} units; "
            "pass one block id per unit of this layer (conv: per channel)"
        )
    return block_ids.to(device=device, dtype=torch.long)


def _block_index(block_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Relabel arbitrary block ids to 0..K-1 (in sorted id order); return per-unit labels and K."""
    unique_ids, labels = torch.unique(block_ids, sorted=True, return_inverse=True)
    return labels, unique_ids.numel()


def _block_means(m: torch.Tensor, labels: torch.Tensor, n_blocks: int) -> torch.Tensor:
    sums = torch.zeros(m.shape[0], n_blocks, dtype=m.dtype, device=m.device).index_add_(1, labels, m)
    counts = torch.bincount(labels, minlength=n_blocks).to(m.dtype)
    return sums / counts


def block_means(h: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of each block: (N, K), columns in ascending order of the distinct block ids."""
    m = to_float_unit_matrix(h)
    ids = _validate_block_ids(block_ids, m.shape[1], m.device)
    labels, n_blocks = _block_index(ids)
    return _block_means(m, labels, n_blocks)


def _variance_r2(m: torch.Tensor, labels: torch.Tensor, n_blocks: int) -> float:
    x = m.to(torch.float64)
    residual = x - _block_means(x, labels, n_blocks)[:, labels]
    total = x - x.mean(dim=1, keepdim=True)
    total_ss = (total * total).sum()
    if not total_ss > 0:
        return warn_nan(
            "cloning_r2 is undefined: every unit has the same value on each sample (zero total variance "
            "across units). Check for a dead layer or use a different probe batch.",
            stacklevel=4,
        )
    return float(1.0 - (residual * residual).sum() / total_ss)


def _legacy_std_ratio_r2(m: torch.Tensor, labels: torch.Tensor, n_blocks: int) -> float:
    counts = torch.bincount(labels, minlength=n_blocks)
    block_size = int(counts[0])
    if not bool((counts == block_size).all()):
        raise ValueError(
            "the std_ratio_barriers cloning R^2 needs every block to have the same size (the authors' code "
            f"assumes a uniform expansion factor); got block sizes from {int(counts.min())} to {int(counts.max())}"
        )
    if block_size < 2 or m.shape[1] < 2:
        return warn_nan(
            "the std_ratio_barriers cloning R^2 needs blocks of at least 2 units (the unbiased std of one "
            "value is undefined); use definition='variance_ratio'.",
            stacklevel=4,
        )
    x = m.to(torch.float64)
    residual = x - _block_means(x, labels, n_blocks)[:, labels]
    within_ss = x.new_zeros(x.shape[0], n_blocks).index_add_(1, labels, residual * residual)  # (N, K)
    within_std = (within_ss / (block_size - 1)).sqrt()  # torch's default unbiased std, as in the code
    across_std = x.std(dim=1, correction=1, keepdim=True)  # (N, 1): std over all units of the sample
    return float(1.0 - (within_std / (across_std + LEGACY_EPS)).mean())


def cloning_r2(
    h: torch.Tensor, block_ids: torch.Tensor, legacy_std_ratio: bool = False, *, definition: str | None = None
) -> float:
    """Cloning R^2 of a layer for a partition of its units into clone blocks (1 = exact clones).

    ``definition="variance_ratio"`` (default, paper text): R^2 = 1 - sum (h - mean of the unit's block)^2 /
    sum (h - mean of all units)^2, with both means taken per sample. ``definition="std_ratio_barriers"`` (or the
    older spelling ``legacy_std_ratio=True``) reproduces the authors' figures instead: 1 - mean over (sample,
    block) of std within the block / (std over all the sample's units + 1e-10), both stds unbiased (torch's
    default, as in their code); it needs equal block sizes. A partition of singleton blocks gives 1 by construction.
    """
    if definition is None:
        definition = "std_ratio_barriers" if legacy_std_ratio else "variance_ratio"
    elif definition not in R2_DEFINITIONS:
        raise ValueError(f"definition must be one of {', '.join(R2_DEFINITIONS)}; got {definition!r}")
    elif legacy_std_ratio and definition != "std_ratio_barriers":
        raise ValueError(f"legacy_std_ratio=True contradicts definition={definition!r}; pass only one of them")
    m = to_float_unit_matrix(h)
    ids = _validate_block_ids(block_ids, m.shape[1], m.device)
    if m.shape[0] == 0 or m.shape[1] == 0:
        return warn_nan(
            f"cloning_r2 needs at least one sample and one unit, got (samples, units) = {tuple(m.shape)}."
        )
    if not check_finite(m, "activations"):
        return float("nan")
    labels, n_blocks = _block_index(ids)
    if definition == "std_ratio_barriers":
        return _legacy_std_ratio_r2(m, labels, n_blocks)
    return _variance_r2(m, labels, n_blocks)
