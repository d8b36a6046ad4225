"""Attention heads as units: the duplicate-heads fraction of a layer that reads concatenated head outputs.

A multi-head attention concatenates ``heads`` head outputs of ``head_dim`` features each and feeds them to its
output projection ``o``. Taking each *head* as one unit, its "activation" on the probe is its whole output
``(samples, head_dim)``, flattened: the head unit matrix has one row per (sample, head feature) and one column
per head, so two heads are duplicates when their outputs agree coordinate by coordinate (as the heads of an
exact clone do). The duplicate rule is the Monitor's duplicate fraction (uncentred cosine > threshold with some
later head; :func:`lopkit.diagnostics.similarity.duplicate_fraction`).

The Monitor computes ``duplicate_heads_fraction`` on every weight layer with an integer attribute
``concat_heads`` (the number of heads its input concatenates), such as the ``o`` projection
(:class:`lopkit.benchmarks.architectures.AttentionOutput`) of lopkit's ViT.
"""

from __future__ import annotations

import torch

from lopkit.diagnostics.similarity import duplicate_fraction

__all__ = ["head_unit_matrix", "duplicate_heads_fraction", "concat_heads_of"]


def concat_heads_of(module: torch.nn.Module) -> int | None:
    """The head count a layer's input concatenates (its ``concat_heads`` attribute), or None."""
    heads = getattr(module, "concat_heads", None)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        return None
    return heads


def head_unit_matrix(concat: torch.Tensor, heads: int) -> torch.Tensor:
    """``(samples, heads * head_dim)`` concatenated head outputs -> ``(samples * head_dim, heads)``: heads as units."""
    if concat.dim() != 2:
        raise ValueError(f"expected a (samples, heads * head_dim) matrix, got shape {tuple(concat.shape)}")
    samples, width = concat.shape
    if heads < 1 or width % heads:
        raise ValueError(f"{width} features cannot be split into {heads} heads of equal width")
    per_head = concat.reshape(samples, heads, width // heads)
    return per_head.permute(0, 2, 1).reshape(-1, heads)


def duplicate_heads_fraction(
    concat: torch.Tensor, heads: int, threshold: float = 0.95, centered: bool = False, absolute: bool = False
) -> float:
    """Fraction of heads whose output duplicates a later head's (cosine of flattened outputs > ``threshold``)."""
    return duplicate_fraction(head_unit_matrix(concat, heads), threshold=threshold, centered=centered,
                              absolute=absolute)
