"""Rank of a layer's representation: Shannon effective rank, Renyi-2 (stable / correlation) ranks, numerical rank.

- :func:`effective_rank` is the paper's and Dohare et al.'s metric: exp of the Shannon entropy of the
  singular values of H normalised to sum 1 (no centring, at most 1024 rows, as in the authors' code).
- :func:`stable_rank` is the Renyi-2 rank of the mean-centred Gram matrix, as the authors' code computes it
  (not the ||A||_F^2 / ||A||_2^2 "stable rank" named in the authors' README).
- :func:`correlation_rank` is the Theorem 3.1 proxy er2(C) = d^2 / ||C||_F^2 on the unit correlation matrix.

Undefined cases (fewer than 2 samples, no units, NaN/inf input, an all-zero matrix) return NaN with a
:class:`~lopkit.diagnostics.errors.LopkitWarning`.
"""

from __future__ import annotations

import math

import torch

from .errors import warn, warn_nan
from .units import check_finite, normalised_unit_columns, to_float_unit_matrix

__all__ = [
    "singular_values",
    "effective_rank",
    "stable_rank",
    "correlation_matrix",
    "correlation_rank",
    "correlation_effective_rank",
    "renyi2_rank",
    "shannon_rank",
    "numerical_rank",
]


def _usable_for_rank(m: torch.Tensor, metric: str) -> bool:
    """Warn and return False when a rank metric is undefined for ``m`` (too few samples, no units, NaN)."""
    if m.shape[0] < 2 or m.shape[1] == 0:
        warn(
            f"{metric} needs at least 2 samples and 1 unit, got (samples, units) = {tuple(m.shape)}; "
            "use a larger probe batch.",
            stacklevel=4,
        )
        return False
    return check_finite(m, "activations")


def _subsample_rows(m: torch.Tensor, max_samples: int | None) -> torch.Tensor:
    """At most ``max_samples`` rows, chosen by a fixed-seed permutation so repeated calls agree.

    A random (not strided) choice avoids aliasing with periodic row orders such as flattened conv maps.
    """
    if max_samples is None or m.shape[0] <= max_samples:
        return m
    if max_samples < 2:
        raise ValueError(f"max_samples must be >= 2 (or None for all rows), got {max_samples}")
    generator = torch.Generator().manual_seed(0)
    rows = torch.randperm(m.shape[0], generator=generator)[:max_samples].sort().values
    return m[rows.to(m.device)]


def singular_values(m: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D matrix (descending), via the eigenvalues of its smaller Gram matrix in float64.

    Several times faster than an SVD for 512 x 1000 probes; float64 keeps small singular values accurate
    to ~1e-8 of the largest, far below what matters for entropy-based ranks.
    """
    x = m.to(torch.float64)
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    eigenvalues = torch.linalg.eigvalsh(gram).clamp_min(0.0)
    return eigenvalues.flip(0).sqrt()


def shannon_rank(weights: torch.Tensor) -> float:
    """exp(Shannon entropy) of non-negative weights normalised to sum 1; NaN + warning if they sum to 0."""
    weights = weights.to(torch.float64)
    total = weights.sum()
    if not total > 0:
        return warn_nan(
            "all singular values / eigenvalues are zero (an all-zero representation); the effective rank "
            "is undefined. Check for a dead layer with dead_fraction().",
            stacklevel=4,
        )
    p = weights / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def effective_rank(h: torch.Tensor, center: bool = False, max_samples: int | None = 1024) -> float:
    """Shannon effective rank exp(H(sigma / sum sigma)) of the unit matrix (paper, Dohare et al.).

    Defaults follow the authors' code: no centring and at most ``max_samples`` rows (a fixed-seed subset).
    Ranges from 1 (rank one) to min(N, D) (all singular values equal). An all-zero matrix gives NaN.
    """
    m = to_float_unit_matrix(h)
    if not _usable_for_rank(m, "effective_rank"):
        return float("nan")
    m = _subsample_rows(m, max_samples)
    if center:
        m = m - m.mean(dim=0, keepdim=True)
    return shannon_rank(singular_values(m))


def renyi2_rank(matrix: torch.Tensor) -> float:
    """Renyi-2 effective rank (tr M)^2 / ||M||_F^2 of a symmetric PSD matrix (1 for rank one, d for the identity)."""
    matrix = torch.as_tensor(matrix)
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"renyi2_rank needs a square matrix, got shape {tuple(matrix.shape)}")
    if matrix.shape[0] == 0:
        return warn_nan("renyi2_rank of an empty (0 x 0) matrix is undefined.")
    matrix = matrix.detach().to(torch.float64)
    if not check_finite(matrix, "matrix"):
        return float("nan")
    frobenius_sq = (matrix * matrix).sum()
    if frobenius_sq == 0:
        return warn_nan("renyi2_rank of an all-zero matrix is undefined (0 / 0).")
    return float(torch.trace(matrix) ** 2 / frobenius_sq)


def stable_rank(h: torch.Tensor) -> float:
    """Renyi-2 rank of the mean-centred Gram matrix, ||H~||_F^4 / tr((H~^T H~)^2), as in the authors' code.

    Computed on whichever Gram matrix (samples x samples or units x units) is smaller; both have the same
    non-zero spectrum. Always <= the numerical rank of H~. NaN if every sample is identical.
    """
    m = to_float_unit_matrix(h)
    if not _usable_for_rank(m, "stable_rank"):
        return float("nan")
    x = m.to(torch.float64)
    x = x - x.mean(dim=0, keepdim=True)
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    trace = torch.trace(gram)  # = ||H~||_F^2
    gram_frobenius_sq = (gram * gram).sum()  # = tr((H~^T H~)^2)
    if not gram_frobenius_sq > 0:
        return warn_nan(
            "stable_rank is undefined: the centred activations are all zero (every sample gives the same "
            "output). Use a probe batch with varied inputs.",
            stacklevel=3,
        )
    return float(trace**2 / gram_frobenius_sq)


def _correlation_columns(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred, unit-norm columns X of the non-constant units (so C = X^T X) and their indices.

    Warns with the number of constant units dropped.
    """
    x, constant = normalised_unit_columns(m, centered=True)
    n_constant = int(constant.sum())
    if n_constant:
        warn(
            f"correlation: dropped {n_constant} constant unit(s) out of {m.shape[1]} (their correlation is "
            "undefined); count them with dead_fraction() or dormant_fraction().",
            stacklevel=4,
        )
    kept = torch.nonzero(~constant).flatten()
    return x[:, kept], kept


def correlation_matrix(h: torch.Tensor, return_kept: bool = False):
    """Pearson correlation matrix between units; constant units are dropped with a warning saying how many.

    Returns the (d, d) matrix over the d non-constant units, or ``(matrix, kept_unit_indices)`` when
    ``return_kept=True``.
    """
    m = to_float_unit_matrix(h)
    if m.shape[0] < 2:
        raise ValueError(
            f"correlation_matrix needs at least 2 samples, got (samples, units) = {tuple(m.shape)}"
        )
    x, kept = _correlation_columns(m)
    corr = (x.T @ x).clamp_(-1.0, 1.0)
    corr.fill_diagonal_(1.0)
    return (corr, kept) if return_kept else corr


def _correlation_columns_or_none(h: torch.Tensor, metric: str) -> torch.Tensor | None:
    m = to_float_unit_matrix(h)
    if not _usable_for_rank(m, metric):
        return None
    x, _ = _correlation_columns(m)
    if x.shape[1] == 0:
        warn(f"{metric} is undefined: every unit is constant over the probe batch.", stacklevel=4)
        return None
    return x


def correlation_rank(h: torch.Tensor) -> float:
    """Renyi-2 rank d^2 / ||C||_F^2 of the unit correlation matrix C (Theorem 3.1 proxy; constant units dropped).

    Uses ||X^T X||_F = ||X X^T||_F on the smaller side, so it never forms C when samples < units.
    """
    x = _correlation_columns_or_none(h, "correlation_rank")
    if x is None:
        return float("nan")
    x = x.to(torch.float64)
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    return float(x.shape[1] ** 2 / (gram * gram).sum())


def correlation_effective_rank(h: torch.Tensor) -> float:
    """Shannon effective rank exp(H(lambda / d)) of the eigenvalues of the unit correlation matrix (theory's form)."""
    x = _correlation_columns_or_none(h, "correlation_effective_rank")
    if x is None:
        return float("nan")
    return shannon_rank(singular_values(x) ** 2)  # eigenvalues of C = X^T X


def numerical_rank(h: torch.Tensor, rtol: float | None = None) -> int | float:
    """Number of singular values above ``rtol * sigma_max`` (default rtol = eps * max(N, D), numpy's convention).

    ``eps`` is the machine epsilon of the input's dtype. For float32 input the singular values come from
    the float64 Gram matrix (accurate to ~1e-8 sigma_max, well below the default tolerance, and about
    twice as fast as an SVD); float64 input or ``rtol < 1e-6`` uses a full SVD. An empty matrix has rank 0;
    NaN/inf input returns NaN with a warning.
    """
    m = to_float_unit_matrix(h)
    if m.numel() == 0:
        return 0
    if not check_finite(m, "activations"):
        return float("nan")
    if rtol is None:
        rtol = torch.finfo(m.dtype).eps * max(m.shape)
    if m.dtype == torch.float64 or rtol < 1e-6:
        return int(torch.linalg.matrix_rank(m, rtol=rtol))
    sigma = singular_values(m)
    return int((sigma > rtol * sigma[0]).sum())
