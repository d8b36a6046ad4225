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
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import ConstantUnitWarning, warn, warn_nan
from .units import all_finite, check_finite, normalised_unit_columns, to_float_unit_matrix

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
    "gram_matrix",
    "symmetric_product",
    "RANK_METRIC_NAMES",
    "RankWorkspace",
    "rank_metrics",
]

#: The rank metrics :class:`RankWorkspace` and :func:`rank_metrics` compute together.
RANK_METRIC_NAMES: tuple[str, ...] = ("effective_rank", "stable_rank", "correlation_rank", "numerical_rank")

# The centred Gram matrix is derived from the uncentred one unless centring removes more than this fraction
# of the energy (tr G~ / tr G below it); then rounding in the subtraction could reach ~1e-12 of the result,
# so the centred matrix is formed directly instead.
_MIN_CENTRED_ENERGY_FRACTION = 1e-4


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


_GRAM_BLOCK_ROWS = 64


def symmetric_product(a: torch.Tensor) -> torch.Tensor:
    """``a @ a.T`` computed block by block on and below the diagonal, the upper blocks mirrored (about 1/3 cheaper).

    Only the lower block triangle is multiplied (blocks of at least 64 rows, at most 8 block columns), so a
    512 x 1000 input costs about 0.6 of a full product. Small inputs (<= 64 rows) use one plain product.
    """
    n = a.shape[0]
    block = max(_GRAM_BLOCK_ROWS, -(-n // 8))
    if n <= block:
        return a @ a.T
    gram = torch.empty((n, n), dtype=a.dtype, device=a.device)
    for start in range(0, n, block):
        stop = min(start + block, n)
        gram[start:, start:stop] = a[start:] @ a[start:stop].T
        gram[start:stop, stop:] = gram[stop:, start:stop].T
    return gram


def _frobenius_sq(m: torch.Tensor) -> torch.Tensor:
    """Sum of squared entries as one dot product (no squared copy of ``m``)."""
    flat = m.reshape(-1)
    return torch.dot(flat, flat)


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of a 2-D matrix: ``x x^T`` (samples x samples) if N <= D, else ``x^T x``.

    Both have the same non-zero eigenvalues (the squared singular values of ``x``).
    """
    return symmetric_product(x if x.shape[0] <= x.shape[1] else x.T)


def singular_values(m: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D matrix (descending), via the eigenvalues of its smaller Gram matrix in float64.

    Several times faster than an SVD for 512 x 1000 probes; float64 keeps small singular values accurate
    to ~1e-8 of the largest, far below what matters for entropy-based ranks.
    """
    return _singular_values_of_gram(gram_matrix(m.to(torch.float64)))


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the body with one intra-op CPU thread, restoring the previous count (a no-op off the CPU).

    A CPU eigendecomposition is a long chain of memory-bound steps separated by thread barriers: a second
    thread saves little wall time and, when the cores are shared with other jobs, a descheduled thread
    stalls every barrier (a 512 x 512 ``eigvalsh`` measured 15 ms on one thread, 40 ms to seconds on two).
    """
    previous = torch.get_num_threads()
    if device.type != "cpu" or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _singular_values_of_gram(gram: torch.Tensor) -> torch.Tensor:
    """Square roots of the (clamped non-negative) eigenvalues of a symmetric Gram matrix, descending."""
    with _one_cpu_thread(gram.device):
        eigenvalues = torch.linalg.eigvalsh(gram)
    return eigenvalues.clamp_min_(0.0).flip(0).sqrt()


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
    return _stable_rank_of_centred_gram(gram_matrix(x))


def _stable_rank_of_centred_gram(gram: torch.Tensor) -> float:
    """(tr G~)^2 / ||G~||_F^2 of a centred Gram matrix G~; NaN + warning when it is all zero."""
    trace = torch.trace(gram)  # = ||H~||_F^2
    gram_frobenius_sq = _frobenius_sq(gram)  # = tr((H~^T H~)^2)
    if not gram_frobenius_sq > 0:
        return warn_nan(
            "stable_rank is undefined: the centred activations are all zero (every sample gives the same "
            "output). Use a probe batch with varied inputs.",
            stacklevel=4,
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
            category=ConstantUnitWarning,
        )
    kept = torch.nonzero(~constant).flatten()
    return (x[:, kept] if n_constant else x), kept


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
    return _correlation_rank_of_columns(x)


def _correlation_rank_of_columns(x: torch.Tensor) -> float:
    """d^2 / ||X^T X||_F^2 for centred unit-norm columns X (float64 Gram on the smaller side)."""
    gram = gram_matrix(x.to(torch.float64))
    return float(x.shape[1] ** 2 / _frobenius_sq(gram))


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


class RankWorkspace:
    """The four rank metrics of one unit matrix, sharing one float64 Gram matrix and its spectrum.

    Each value equals its pure function on the same rows (to rounding, ~1e-13 relative):
    ``effective_rank(m, max_samples=None)``, ``numerical_rank(m)``, ``stable_rank(m)``, ``correlation_rank(m)``,
    where ``m`` is ``h`` as a unit matrix, cut to ``max_samples`` rows (fixed-seed subset) when given.
    Per layer this costs two Gram products and one eigendecomposition instead of the four products and two
    eigendecompositions of the pure functions called one by one: effective and numerical rank read the
    eigenvalues of G = H H^T (or H^T H, whichever is smaller), stable rank the centred Gram P G P with
    P = I - 11^T / N (no new product), and correlation rank the Gram of the standardised columns (the one
    more product: for N < D the N x N Gram of Z is cheaper than forming C = Z^T Z). Values are computed on
    first use and cached. Undefined cases (fewer than 2 samples, no units, NaN/inf) go to
    the pure functions, which warn and return NaN.
    """

    def __init__(self, h: torch.Tensor, max_samples: int | None = None) -> None:
        """Prepare ``h`` (any layout :func:`~lopkit.diagnostics.units.as_unit_matrix` accepts); no work yet."""
        self.matrix = _subsample_rows(to_float_unit_matrix(h), max_samples)
        m = self.matrix
        self._usable = m.shape[0] >= 2 and m.shape[1] >= 1 and all_finite(m)
        self._x64: torch.Tensor | None = None
        self._gram: torch.Tensor | None = None
        self._sigma: torch.Tensor | None = None

    # ---------------------------------------------------------------- shared intermediates
    def _float64(self) -> torch.Tensor:
        if self._x64 is None:
            self._x64 = self.matrix.to(torch.float64)
        return self._x64

    def _shared_gram(self) -> torch.Tensor:
        if self._gram is None:
            self._gram = gram_matrix(self._float64())
        return self._gram

    def _singular_values(self) -> torch.Tensor:
        if self._sigma is None:
            self._sigma = _singular_values_of_gram(self._shared_gram())
        return self._sigma

    def _centred_gram(self) -> torch.Tensor | None:
        """P G P (N <= D) or G - N mu mu^T (N > D): the Gram matrix of the centred rows, from G without a product.

        None when centring cancels nearly all of G (the representation is almost constant over samples).
        """
        gram = self._shared_gram()
        x = self._float64()
        if x.shape[0] <= x.shape[1]:
            row_means = gram.mean(dim=1)
            centred = gram - row_means.unsqueeze(1)
            centred -= row_means.unsqueeze(0)
            centred += row_means.mean()
        else:
            mean = x.mean(dim=0)
            centred = gram - x.shape[0] * torch.outer(mean, mean)
        if not torch.trace(centred) > _MIN_CENTRED_ENERGY_FRACTION * torch.trace(gram):
            return None
        return centred

    # ---------------------------------------------------------------- metrics
    def effective_rank(self) -> float:
        """Shannon effective rank of the singular values (no centring); see :func:`effective_rank`."""
        if not self._usable:
            return effective_rank(self.matrix, max_samples=None)
        return shannon_rank(self._singular_values())

    def numerical_rank(self) -> int | float:
        """Singular values above eps * max(N, D) * sigma_max; see :func:`numerical_rank`."""
        if not self._usable or self.matrix.dtype != torch.float32:
            return numerical_rank(self.matrix)  # float64 input takes the SVD path there
        sigma = self._singular_values()
        rtol = torch.finfo(torch.float32).eps * max(self.matrix.shape)
        return int((sigma > rtol * sigma[0]).sum())

    def stable_rank(self) -> float:
        """Renyi-2 rank of the centred Gram matrix; see :func:`stable_rank`."""
        if not self._usable:
            return stable_rank(self.matrix)
        centred = self._centred_gram()
        if centred is None:  # nearly constant samples: centre the rows first, as the pure function does
            return stable_rank(self.matrix)
        return _stable_rank_of_centred_gram(centred)

    def correlation_rank(self) -> float:
        """Renyi-2 rank of the unit correlation matrix; see :func:`correlation_rank`."""
        if not self._usable:
            return correlation_rank(self.matrix)
        x, _ = _correlation_columns(self.matrix)
        if x.shape[1] == 0:
            return correlation_rank(self.matrix)  # every unit constant: warns there and returns NaN
        return _correlation_rank_of_columns(x)

    def value(self, metric: str) -> float:
        """One metric by name (one of :data:`RANK_METRIC_NAMES`), as a float."""
        if metric not in RANK_METRIC_NAMES:
            raise ValueError(f"unknown rank metric {metric!r}; use one of {', '.join(RANK_METRIC_NAMES)}")
        return float(getattr(self, metric)())


def rank_metrics(
    h: torch.Tensor, metrics: tuple[str, ...] | list[str] = RANK_METRIC_NAMES, max_samples: int | None = None
) -> dict[str, float]:
    """Several rank metrics of one layer at the cost of one Gram matrix and one eigendecomposition.

    Returns ``{name: value}`` for the requested names (see :class:`RankWorkspace` for what is shared and
    which pure function each value equals). ``max_samples`` cuts every metric to the same fixed-seed rows.
    """
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [m for m in metrics if m not in RANK_METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown rank metric(s) {unknown}; use names from {', '.join(RANK_METRIC_NAMES)}")
    workspace = RankWorkspace(h, max_samples=max_samples)
    return {name: workspace.value(name) for name in metrics}
