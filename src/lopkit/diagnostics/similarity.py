"""Duplicate (cloned) units: pairwise unit similarity, the paper's duplicate fraction and duplicate clusters.

Paper rule (App. B.1.2 and the authors' code): normalise each unit's column of H (no centring), take the
cosine similarity of every pair, and count unit j as a duplicate if *some* later unit k > j has similarity
above 0.95 (0.98 in the bit-flipping runs). A cluster of m identical units therefore counts m - 1.
Options: ``centered=True`` (Pearson correlation) and ``absolute=True`` (|similarity|, so anti-correlated
units count too; they are also fixed points of the rank dynamics). Units with zero norm (or, centred,
constant units) have no direction and are never duplicates.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from .errors import warn
from .units import check_finite, normalised_unit_columns, to_float_unit_matrix

__all__ = [
    "cosine_similarity_matrix",
    "degenerate_unit_mask",
    "duplicate_unit_mask",
    "duplicate_fraction",
    "duplicate_clusters",
    "live_clone_fraction",
]


def degenerate_unit_mask(h: torch.Tensor, centered: bool = False) -> torch.Tensor:
    """Units without a direction: all-zero columns (or, with ``centered=True``, constant columns)."""
    return normalised_unit_columns(to_float_unit_matrix(h), centered)[1]


def cosine_similarity_matrix(h: torch.Tensor, centered: bool = False) -> torch.Tensor:
    """(D, D) cosine similarity of unit columns (Pearson correlation if ``centered``); degenerate units get 0 rows."""
    m = to_float_unit_matrix(h)
    x, _ = normalised_unit_columns(m, centered)
    return (x.T @ x).clamp_(-1.0, 1.0)


def _duplicate_graph(
    m: torch.Tensor, threshold: float, centered: bool, absolute: bool
) -> torch.Tensor:
    """Boolean (D, D) adjacency: pairs of distinct, non-degenerate units with similarity > threshold."""
    x, degenerate = normalised_unit_columns(m, centered)
    sim = x.T @ x
    if absolute:
        sim = sim.abs()
    adjacency = sim > threshold
    adjacency.fill_diagonal_(False)
    adjacency &= ~degenerate.unsqueeze(0)
    adjacency &= ~degenerate.unsqueeze(1)
    return adjacency


_SIMILARITY_BLOCK_UNITS = 64


def _has_later_duplicate(
    x: torch.Tensor, degenerate: torch.Tensor, threshold: float, absolute: bool
) -> torch.Tensor:
    """Bool (D,) mask: unit j has similarity > ``threshold`` with some non-degenerate unit k > j.

    ``x`` holds unit-norm columns (degenerate ones zero). Only the similarities with later units are
    formed, one block of rows at a time (about 0.6 of the full ``x^T x`` product for D = 1000, and never
    a (D, D) boolean matrix); the row maximum over later units is compared with the threshold.
    """
    d = x.shape[1]
    block = max(_SIMILARITY_BLOCK_UNITS, -(-d // 8))
    columns_first = x.T
    not_later = torch.ones((block, block), dtype=torch.bool, device=x.device).tril()  # k <= j inside a block
    exclude_degenerate = threshold < 0 and bool(degenerate.any())  # they have similarity 0 with everything
    found = torch.empty(d, dtype=torch.bool, device=x.device)
    for start in range(0, d, block):
        stop = min(start + block, d)
        width = stop - start
        sim = columns_first[start:stop] @ x[:, start:]  # (width, D - start): units start.. vs later ones
        if absolute:
            sim.abs_()
        sim[:, :width].masked_fill_(not_later[:width, :width], -math.inf)
        if exclude_degenerate:
            sim[:, degenerate[start:]] = -math.inf
        found[start:stop] = sim.amax(dim=1) > threshold
    return found & ~degenerate


def _duplicate_mask(m: torch.Tensor, threshold: float, centered: bool, absolute: bool) -> torch.Tensor:
    """Paper rule on a checked unit matrix: units with a later duplicate (see :func:`duplicate_unit_mask`)."""
    x, degenerate = normalised_unit_columns(m, centered)
    return _has_later_duplicate(x, degenerate, threshold, absolute)


def _check_input(m: torch.Tensor) -> bool:
    """Warn and return False when duplicates are undefined: fewer than 2 samples (over one sample a unit's
    direction is only its sign, so every active unit would look like a clone), no unit, or NaN/inf."""
    if m.shape[0] < 2 or m.shape[1] == 0:
        warn(
            f"duplicate units need at least 2 samples and 1 unit, got (samples, units) = {tuple(m.shape)}; "
            "use a larger probe batch.",
            stacklevel=4,
        )
        return False
    return check_finite(m, "activations")


def _check_threshold(threshold: float) -> None:
    if not -1.0 <= threshold < 1.0:
        raise ValueError(
            f"threshold must be in [-1, 1) because similarities lie in [-1, 1], got {threshold} "
            "(paper: 0.95, bit-flipping: 0.98)"
        )


def duplicate_unit_mask(
    h: torch.Tensor, threshold: float = 0.95, centered: bool = False, absolute: bool = False
) -> torch.Tensor:
    """Units j with similarity > ``threshold`` to some unit k > j (paper rule; m identical units mark m - 1)."""
    _check_threshold(threshold)
    m = to_float_unit_matrix(h)
    if not _check_input(m):
        return torch.zeros(m.shape[1], dtype=torch.bool, device=m.device)
    return _duplicate_mask(m, threshold, centered, absolute)


def duplicate_fraction(
    h: torch.Tensor, threshold: float = 0.95, centered: bool = False, absolute: bool = False
) -> float:
    """Fraction of duplicate units in the layer (see :func:`duplicate_unit_mask`)."""
    _check_threshold(threshold)
    m = to_float_unit_matrix(h)
    if not _check_input(m):
        return float("nan")
    return _duplicate_mask(m, threshold, centered, absolute).float().mean().item()


def duplicate_clusters(
    h: torch.Tensor, threshold: float = 0.95, centered: bool = False, absolute: bool = False
) -> list[list[int]]:
    """Connected components (size >= 2) of the duplicate-similarity graph: a candidate clone partition.

    Each cluster is a sorted list of unit indices; clusters are ordered largest first, ties by smallest
    index. Returns ``[]`` (with a warning) for unusable input.
    """
    _check_threshold(threshold)
    m = to_float_unit_matrix(h)
    if not _check_input(m):
        return []
    adjacency = _duplicate_graph(m, threshold, centered, absolute).cpu().numpy()
    n_components, labels = connected_components(csr_matrix(adjacency), directed=False)
    sizes = np.bincount(labels, minlength=n_components)
    order = np.argsort(labels, kind="stable")  # unit indices grouped by label, ascending inside each group
    groups = np.split(order, np.cumsum(sizes)[:-1])
    clusters = [g.tolist() for g in groups if g.size >= 2]
    clusters.sort(key=lambda c: (-len(c), c[0]))
    return clusters


def live_clone_fraction(h: torch.Tensor, threshold: float = 0.98, dead: torch.Tensor | None = None) -> float:
    """Fraction of the layer's units that are live clones: Pearson (centred) correlation > ``threshold`` with
    some later live unit, dead units (``dead`` mask, e.g. :func:`~lopkit.diagnostics.activations.dead_unit_mask`
    of the ReLU outputs) and constant units excluded; the denominator is all D units.

    lopkit's definition, reported beside the paper's (uncentred) duplicate fraction: on bit-flipping the
    paper's "duplicates" of the fc1 pre-activations are dead units whose negative pre-activations point the
    same way, which this count leaves out (``fidelity_notes.md``).
    """
    _check_threshold(threshold)
    m = to_float_unit_matrix(h)
    if not _check_input(m):
        return float("nan")
    x, degenerate = normalised_unit_columns(m, centered=True)
    if dead is not None:
        dead = torch.as_tensor(dead, dtype=torch.bool, device=m.device).reshape(-1)
        if dead.numel() != m.shape[1]:
            raise ValueError(f"dead mask has {dead.numel()} entries, the activations have {m.shape[1]} units")
        degenerate = degenerate | dead
        x = x * (~dead).to(x.dtype)
    return _has_later_duplicate(x, degenerate, threshold, absolute=False).float().mean().item()
