"""Theorem 3.1 numerics: correlation kernels, decorrelation strength and the rank-gain bound.

For an activation ``phi`` and a pre-activation ``z ~ N(0, 1)`` with gain ``scale`` and bias
``shift``, the *effective activation* is ``psi(z) = phi(scale * z + shift)`` standardised to mean 0
and variance 1.  Theorem 3.1 of the paper (v2) says that, for a correlation matrix ``C`` of jointly
Gaussian pre-activations and the entrywise correlation kernel ``K = K_psi``::

    er2(K(C)) / er2(C)  >=  1 + gamma * Psi(C) / ||C||_F^2

with ``gamma = (1 - alpha) / (1 + alpha)``, ``alpha = (E psi'(Z))^2`` (the linearity coefficient),
``Psi(C) = sum_{i != j} C_ij^2 (1 - C_ij^2)`` (the decorrelation potential) and
``er2(M) = (tr M)^2 / ||M||_F^2``.  The proof goes through Lemma A.1,
``r^2 - K(r)^2 >= gamma r^2 (1 - r^2)`` for every ``r in [-1, 1]``.

Naming follows spec item 8.3: ``linearity_coefficient`` is ``alpha`` (the paper's App. A.2 calls it
``gamma(a, b)``) and ``decorrelation_strength`` is ``gamma = (1 - alpha) / (1 + alpha)``.

Numerical method and accuracy
-----------------------------
Gaussian expectations use composite Gauss-Legendre quadrature against the N(0, 1) density on a
window ``[-L, L]`` (``L = max(10, |kink| + 6)``, at most 38), with panels of width 0.5, extra panel
edges at every kink (or transition point) of the activation, and geometrically graded edges around
it.  Because kinks sit on panel edges, the integrand is analytic on every panel and the rule
converges geometrically, also for ReLU(z - 2), leaky ReLU or tanh(20 z).  Measured against closed
forms (ReLU moments, the ReLU arc-cosine kernel, ReLU Hermite coefficients, P(Z < 2)) the error is
below 1e-12; the tests check 1e-10.

The correlation kernel ``K(r) = E[psi(X) psi(Y)]`` is computed either as the Hermite series
``sum_k a_k^2 r^k`` (fast; used automatically when the truncation tail bound
``|r|^(n+1) * (1 - sum_{k<=n} a_k^2)`` is below 1e-12) or by nested quadrature: writing
``Y = r X + sqrt(1 - r^2) W`` the inner expectation over ``W`` is split at the (moving) kink
location, and the outer one over ``X`` at the kink and at the kink of the smoothed inner function.
Both agree to ~1e-10 with each other and with the arc-cosine closed form for ReLU.

The frozen probability ``P(|d/dz phi(scale z + shift)| < eps)`` is computed exactly (up to
root-finding precision 1e-14) from the set where the inequality holds: a grid of step 1e-3 locates
sign changes, ``scipy.optimize.brentq`` refines them and the Gaussian mass of each interval is summed.
Frozen intervals narrower than the grid step are missed (only possible for gains above ~1e3).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Union

import numpy as np
import torch
from scipy import optimize, special
from torch import nn

from lopkit.diagnostics.errors import LopkitWarning
from lopkit.diagnostics.rank import renyi2_rank as diagnostics_renyi2_rank

__all__ = [
    "ACTIVATION_NAMES",
    "Activation",
    "NormalisedActivation",
    "RankGainCheck",
    "as_activation",
    "normalised_activation",
    "gaussian_expectation",
    "hermite_coefficients",
    "linearity_coefficient",
    "decorrelation_strength",
    "frozen_probability",
    "correlation_kernel",
    "kernel_matrix",
    "quartic_gap",
    "quartic_gap_bound",
    "decorrelation_potential",
    "renyi2_rank",
    "shannon_effective_rank",
    "check_rank_gain_bound",
    "correlation_path",
    "random_correlation_matrix",
    "validate_correlation_matrix",
]

# --------------------------------------------------------------------------------------------
# Named activations
# --------------------------------------------------------------------------------------------

_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805
_LEAKY_SLOPE = 0.01
_SQRT_2PI = math.sqrt(2.0 * math.pi)


def _relu(u: np.ndarray) -> np.ndarray:
    return np.maximum(u, 0.0)


def _relu_grad(u: np.ndarray) -> np.ndarray:
    return (u > 0).astype(float)


def _leaky_relu(u: np.ndarray) -> np.ndarray:
    return np.where(u > 0, u, _LEAKY_SLOPE * u)


def _leaky_relu_grad(u: np.ndarray) -> np.ndarray:
    return np.where(u > 0, 1.0, _LEAKY_SLOPE)


def _tanh_grad(u: np.ndarray) -> np.ndarray:
    return 1.0 / np.cosh(np.clip(u, -350.0, 350.0)) ** 2


def _sigmoid_grad(u: np.ndarray) -> np.ndarray:
    s = special.expit(u)
    return s * (1.0 - s)


def _gelu(u: np.ndarray) -> np.ndarray:
    return u * special.ndtr(u)


def _gelu_grad(u: np.ndarray) -> np.ndarray:
    return special.ndtr(u) + u * np.exp(-0.5 * u * u) / _SQRT_2PI


def _elu(u: np.ndarray) -> np.ndarray:
    return np.where(u > 0, u, np.expm1(np.minimum(u, 0.0)))


def _elu_grad(u: np.ndarray) -> np.ndarray:
    return np.where(u > 0, 1.0, np.exp(np.minimum(u, 0.0)))


def _selu(u: np.ndarray) -> np.ndarray:
    return _SELU_SCALE * np.where(u > 0, u, _SELU_ALPHA * np.expm1(np.minimum(u, 0.0)))


def _selu_grad(u: np.ndarray) -> np.ndarray:
    return _SELU_SCALE * np.where(u > 0, 1.0, _SELU_ALPHA * np.exp(np.minimum(u, 0.0)))


def _softplus(u: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, u)


def _silu(u: np.ndarray) -> np.ndarray:
    return u * special.expit(u)


def _silu_grad(u: np.ndarray) -> np.ndarray:
    s = special.expit(u)
    return s * (1.0 + u * (1.0 - s))


@dataclass(frozen=True)
class Activation:
    """A scalar activation ``phi`` for numpy arrays, with its derivative and kink locations.

    ``kinks`` are points (in phi's own argument) where phi or its derivative is not smooth, or where
    it changes steeply; quadrature panels are split there.  ``derivative`` defaults to a central
    finite difference.
    """

    fn: Callable[[np.ndarray], np.ndarray]
    derivative: Callable[[np.ndarray], np.ndarray] | None = None
    kinks: tuple[float, ...] = (0.0,)
    name: str = "custom"

    def __call__(self, u: np.ndarray) -> np.ndarray:
        return np.asarray(self.fn(np.asarray(u, dtype=float)), dtype=float)

    def grad(self, u: np.ndarray) -> np.ndarray:
        """Derivative phi'(u): the analytic one when given, else a central difference."""
        u = np.asarray(u, dtype=float)
        if self.derivative is not None:
            return np.asarray(self.derivative(u), dtype=float)
        h = 1e-6 * np.maximum(1.0, np.abs(u))
        return (self(u + h) - self(u - h)) / (2.0 * h)


_NAMED: dict[str, Activation] = {
    "relu": Activation(_relu, _relu_grad, (0.0,), "relu"),
    "leaky_relu": Activation(_leaky_relu, _leaky_relu_grad, (0.0,), "leaky_relu"),
    "tanh": Activation(np.tanh, _tanh_grad, (0.0,), "tanh"),
    "sigmoid": Activation(special.expit, _sigmoid_grad, (0.0,), "sigmoid"),
    "gelu": Activation(_gelu, _gelu_grad, (0.0,), "gelu"),
    "elu": Activation(_elu, _elu_grad, (0.0,), "elu"),
    "selu": Activation(_selu, _selu_grad, (0.0,), "selu"),
    "softplus": Activation(_softplus, special.expit, (0.0,), "softplus"),
    "silu": Activation(_silu, _silu_grad, (0.0,), "silu"),
}
ACTIVATION_NAMES: tuple[str, ...] = tuple(_NAMED)
_ALIASES = {"swish": "silu", "leakyrelu": "leaky_relu", "logistic": "sigmoid"}


def _module_kinks(module: Any) -> tuple[float, ...]:
    """Kink locations of common piecewise torch activations (0 for everything else)."""
    if isinstance(module, nn.ReLU6):
        return (0.0, 6.0)
    if isinstance(module, nn.Hardtanh):
        return (float(module.min_val), float(module.max_val))
    if isinstance(module, (nn.Hardswish, nn.Hardsigmoid)):
        return (-3.0, 3.0)
    return (0.0,)


def _named_equivalent(module: Any) -> str | None:
    """Name of the built-in activation that a default-configured torch module computes."""
    simple = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu", nn.SELU: "selu"}
    if type(module) in simple:
        return simple[type(module)]
    if type(module) is nn.GELU and module.approximate == "none":
        return "gelu"
    if type(module) is nn.ELU and float(module.alpha) == 1.0:
        return "elu"
    if type(module) is nn.LeakyReLU and float(module.negative_slope) == _LEAKY_SLOPE:
        return "leaky_relu"
    return None


def _wrap_module(module: Any) -> Activation:
    """Wrap an elementwise torch module as a float64 numpy activation."""
    named = _named_equivalent(module)
    if named is not None:
        return _NAMED[named]
    frozen_copy = copy.deepcopy(module).double().eval()

    def fn(u: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return frozen_copy(torch.as_tensor(u, dtype=torch.float64)).numpy()

    return Activation(fn, None, _module_kinks(module), type(module).__name__)


def as_activation(activation: Any) -> Activation:
    """Turn a name, an :class:`Activation`, a torch ``nn.Module`` or a numpy callable into an :class:`Activation`."""
    if isinstance(activation, NormalisedActivation):
        return activation.base
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        key = activation.strip().lower().replace("-", "_")
        key = _ALIASES.get(key, key)
        if key not in _NAMED:
            raise ValueError(
                f"unknown activation name {activation!r}; use one of {', '.join(ACTIVATION_NAMES)}, "
                "a torch nn.Module, or a vectorised numpy callable"
            )
        return _NAMED[key]
    if isinstance(activation, nn.Module):
        return _wrap_module(activation)
    if callable(activation):
        return Activation(activation, None, (0.0,), getattr(activation, "__name__", "custom"))
    raise ValueError(
        f"activation must be a name, an nn.Module or a callable on numpy arrays, got {type(activation).__name__}"
    )


ActivationLike = Union[str, Callable[[np.ndarray], np.ndarray], Activation, "NormalisedActivation", Any]

# --------------------------------------------------------------------------------------------
# Quadrature against the standard normal density
# --------------------------------------------------------------------------------------------

_GL_ORDER = 12
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(_GL_ORDER)
_PANEL_WIDTH = 0.5
_MIN_HALF_WIDTH = 10.0
_MAX_HALF_WIDTH = 38.0  # the N(0,1) density underflows beyond ~38.5
_TAIL_MARGIN = 6.0
_GRADING = np.array([0.3, 0.1, 0.03, 0.01, 0.003, 0.001])


def _normal_pdf(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / _SQRT_2PI


def _half_width(points: np.ndarray) -> float:
    """Integration half-window wide enough that the Gaussian tail beyond it is negligible."""
    finite = np.abs(points[np.isfinite(points)])
    far = float(finite.max()) + _TAIL_MARGIN if finite.size else 0.0
    return float(np.clip(far, _MIN_HALF_WIDTH, _MAX_HALF_WIDTH))


def _panel_edges(points: Sequence[float] | np.ndarray, half_width: float | None = None) -> np.ndarray:
    """Sorted panel edges on ``[-L, L]``: uniform panels plus each point and graded edges around it."""
    pts = np.asarray(points, dtype=float).ravel()
    pts = pts[np.isfinite(pts)]
    width = _half_width(pts) if half_width is None else half_width
    n_panels = int(math.ceil(2.0 * width / _PANEL_WIDTH))
    uniform = np.linspace(-width, width, n_panels + 1)
    graded = (pts[:, None] + np.concatenate([-_GRADING, _GRADING])[None, :]).ravel()
    edges = np.concatenate([uniform, pts, graded])
    return np.unique(np.clip(edges, -width, width))


def _rule_from_edges(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and N(0,1)-weighted weights for panels between consecutive edges (last axis)."""
    left = edges[..., :-1, None]
    right = edges[..., 1:, None]
    half = 0.5 * (right - left)
    nodes = 0.5 * (left + right) + half * _GL_NODES
    weights = half * _GL_WEIGHTS * _normal_pdf(nodes)
    new_shape = edges.shape[:-1] + (-1,)
    return nodes.reshape(new_shape), weights.reshape(new_shape)


def _normal_rule(breakpoints: Sequence[float] | np.ndarray = ()) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes/weights for E f(Z), Z ~ N(0,1), with f piecewise analytic between ``breakpoints``."""
    return _rule_from_edges(_panel_edges(breakpoints))


def gaussian_expectation(
    fn: Callable[[np.ndarray], np.ndarray], breakpoints: Sequence[float] = (0.0,)
) -> float | np.ndarray:
    """E fn(Z) for Z ~ N(0, 1), accurate (~1e-12) when fn is analytic between ``breakpoints``.

    ``fn`` receives a 1-D array of nodes and returns values of shape ``(..., n_nodes)``; the
    expectation is taken over the last axis (so several expectations can be computed at once).
    """
    nodes, weights = _normal_rule(breakpoints)
    values = np.asarray(fn(nodes), dtype=float)
    if values.shape[-1:] != nodes.shape:
        raise ValueError(
            f"fn must return an array whose last axis matches its input (length {nodes.size}), "
            f"got shape {values.shape}; make fn vectorised over numpy arrays"
        )
    result = values @ weights
    return float(result) if np.ndim(result) == 0 else result


def _gaussian_mass(a: float, b: float) -> float:
    """P(a < Z < b) for Z ~ N(0,1), computed on the side that avoids cancellation."""
    if a >= 0:
        return float(special.ndtr(-a) - special.ndtr(-b))
    return float(special.ndtr(b) - special.ndtr(a))


# --------------------------------------------------------------------------------------------
# Effective (standardised) activation
# --------------------------------------------------------------------------------------------


def _resolve(activation: ActivationLike, scale: float, shift: float) -> tuple[Activation, float, float]:
    """Base activation and modulation; a NormalisedActivation's own (scale, shift) is composed in."""
    scale, shift = float(scale), float(shift)
    if not (math.isfinite(scale) and scale != 0.0):
        raise ValueError(f"scale must be finite and non-zero, got {scale}")
    if not math.isfinite(shift):
        raise ValueError(f"shift must be finite, got {shift}")
    if isinstance(activation, NormalisedActivation):
        # psi_0(scale z + shift) with psi_0(z) = phi(s0 z + b0) (standardising is affine, so irrelevant)
        return activation.base, activation.scale * scale, activation.scale * shift + activation.shift
    return as_activation(activation), scale, shift


@dataclass(frozen=True)
class NormalisedActivation:
    """psi(z) = (phi(scale z + shift) - mean) / std, standardised under z ~ N(0, 1).

    Calling it evaluates psi on a numpy array; ``breakpoints`` are its kinks in z.
    """

    base: Activation
    scale: float
    shift: float
    mean: float
    std: float
    breakpoints: tuple[float, ...] = field(default=())

    def raw(self, z: np.ndarray) -> np.ndarray:
        """The unstandardised effective activation phi(scale z + shift)."""
        return self.base(self.scale * np.asarray(z, dtype=float) + self.shift)

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return (self.raw(z) - self.mean) / self.std

    def raw_derivative(self, z: np.ndarray) -> np.ndarray:
        """d/dz phi(scale z + shift) = scale * phi'(scale z + shift) (not standardised)."""
        return self.scale * self.base.grad(self.scale * np.asarray(z, dtype=float) + self.shift)


def _raw_moments(base: Activation, scale: float, shift: float) -> tuple[float, float, tuple[float, ...]]:
    """Mean and std of phi(scale Z + shift) (two-pass, to avoid cancellation) and its kinks in z."""
    breakpoints = tuple(sorted((k - shift) / scale for k in base.kinks))
    nodes, weights = _normal_rule(breakpoints)
    values = base(scale * nodes + shift)
    mean = float(values @ weights)
    var = float(((values - mean) ** 2) @ weights)
    return mean, math.sqrt(max(var, 0.0)), breakpoints


def _is_degenerate(mean: float, std: float) -> bool:
    return not (math.isfinite(mean) and math.isfinite(std)) or std <= 1e-10 * abs(mean) or std == 0.0


@lru_cache(maxsize=256)
def _named_normalised(name: str, scale: float, shift: float) -> NormalisedActivation:
    return _build_normalised(_NAMED[name], scale, shift)


def _build_normalised(base: Activation, scale: float, shift: float) -> NormalisedActivation:
    mean, std, breakpoints = _raw_moments(base, scale, shift)
    if _is_degenerate(mean, std):
        raise ValueError(
            f"{base.name}(scale*z + shift) with scale={scale}, shift={shift} is (numerically) constant "
            f"under z ~ N(0,1) (mean {mean:.3g}, std {std:.3g}), so it cannot be standardised; "
            "use a smaller |shift| or a larger |scale|"
        )
    return NormalisedActivation(base, scale, shift, mean, std, breakpoints)


def normalised_activation(activation: ActivationLike, scale: float = 1.0, shift: float = 0.0) -> NormalisedActivation:
    """Standardise psi(z) = phi(scale z + shift) to mean 0, variance 1 under z ~ N(0,1) (Theorem 3.1's setting)."""
    if isinstance(activation, NormalisedActivation) and scale == 1.0 and shift == 0.0:
        return activation
    base, scale, shift = _resolve(activation, scale, shift)
    if base.name in _NAMED and _NAMED[base.name] is base:
        return _named_normalised(base.name, scale, shift)
    return _build_normalised(base, scale, shift)


# --------------------------------------------------------------------------------------------
# Hermite coefficients, alpha, gamma, frozen probability
# --------------------------------------------------------------------------------------------


def _orthonormal_hermite(n: int, z: np.ndarray) -> np.ndarray:
    """h_0..h_n(z), orthonormal probabilists' Hermite polynomials (He_k / sqrt(k!)), shape (n+1, len(z))."""
    out = np.empty((n + 1,) + z.shape)
    out[0] = 1.0
    if n >= 1:
        out[1] = z
    for k in range(1, n):
        out[k + 1] = (z * out[k] - math.sqrt(k) * out[k - 1]) / math.sqrt(k + 1)
    return out


def _hermite_rule(breakpoints: Sequence[float], n: int) -> tuple[np.ndarray, np.ndarray]:
    """A finer rule (panels split in 4) on a window past h_n's turning point 2 sqrt(n), for Hermite projections."""
    pts = np.asarray(breakpoints, dtype=float)
    width = float(np.clip(max(_half_width(pts), 2.0 * math.sqrt(n) + 8.0), _MIN_HALF_WIDTH, _MAX_HALF_WIDTH))
    edges = _panel_edges(pts, width)
    fractions = np.linspace(0.0, 1.0, 5)[:-1]
    fine = (edges[:-1, None] + np.diff(edges)[:, None] * fractions).ravel()
    return _rule_from_edges(np.append(fine, edges[-1]))


def hermite_coefficients(
    activation: ActivationLike, n: int = 60, scale: float = 1.0, shift: float = 0.0
) -> np.ndarray:
    """Coefficients a_0..a_n of the standardised psi in orthonormal Hermite polynomials (a_0 = 0, sum a_k^2 = 1).

    K_psi(r) = sum_k a_k^2 r^k (Mehler).  Accurate to ~1e-13 for n up to ~150 (checked against ReLU's closed form).
    """
    if int(n) < 1:
        raise ValueError(f"n must be a positive integer (number of Hermite terms), got {n}")
    psi = normalised_activation(activation, scale, shift)
    return _hermite_coefficients_of(psi, int(n))


def _hermite_coefficients_of(psi: NormalisedActivation, n: int) -> np.ndarray:
    if psi.base.name in _NAMED and _NAMED[psi.base.name] is psi.base:
        return _named_hermite(psi.base.name, psi.scale, psi.shift, n)
    return _compute_hermite(psi, n)


@lru_cache(maxsize=256)
def _named_hermite(name: str, scale: float, shift: float, n: int) -> np.ndarray:
    coefficients = _compute_hermite(_named_normalised(name, scale, shift), n)
    coefficients.setflags(write=False)
    return coefficients


def _compute_hermite(psi: NormalisedActivation, n: int) -> np.ndarray:
    nodes, weights = _hermite_rule(psi.breakpoints, n)
    return _orthonormal_hermite(n, nodes) @ (psi(nodes) * weights)


def linearity_coefficient(activation: ActivationLike, scale: float = 1.0, shift: float = 0.0) -> float:
    """alpha = (E psi'(Z))^2 / Var psi(Z) = K'(0): the weight of the linear Hermite term (1 for linear phi).

    Uses Stein's identity E psi'(Z) = E[Z psi(Z)], so no derivative is needed.  Returns NaN (with a
    warning) if phi(scale z + shift) is constant.
    """
    base, scale, shift = _resolve(activation, scale, shift)
    mean, std, breakpoints = _raw_moments(base, scale, shift)
    if _is_degenerate(mean, std):
        warnings.warn(
            f"{base.name}(scale*z + shift) with scale={scale}, shift={shift} is constant under N(0,1); "
            "alpha is undefined (returning NaN). Use a smaller |shift| or a larger |scale|.",
            LopkitWarning,
            stacklevel=2,
        )
        return float("nan")
    nodes, weights = _normal_rule(breakpoints)
    first_hermite = float((nodes * (base(scale * nodes + shift) - mean)) @ weights)
    return min(first_hermite**2 / std**2, 1.0)


def decorrelation_strength(activation: ActivationLike, scale: float = 1.0, shift: float = 0.0) -> float:
    """gamma = (1 - alpha) / (1 + alpha) in [0, 1]: Theorem 3.1's decorrelation strength (0 iff psi is linear)."""
    alpha = linearity_coefficient(activation, scale, shift)
    return (1.0 - alpha) / (1.0 + alpha)


def frozen_probability(
    activation: ActivationLike,
    scale: float = 1.0,
    shift: float = 0.0,
    eps: float = 0.01,
    *,
    grid_step: float = 1e-3,
) -> float:
    """P(|d/dz phi(scale z + shift)| < eps) for z ~ N(0,1): the chance a unit is frozen (App. A.2).

    The derivative is that of the *unstandardised* effective activation z -> phi(scale z + shift),
    i.e. ``scale * phi'(scale z + shift)``: this reproduces the spec's reference values
    (tanh(5z): 0.447, tanh(20z): 0.822, ReLU(z - 2): 0.977); standardising by the std would not.
    """
    base, scale, shift = _resolve(activation, scale, shift)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite threshold, got {eps}")
    breakpoints = np.array([(k - shift) / scale for k in base.kinks])

    def margin(z: np.ndarray | float) -> np.ndarray | float:
        return np.abs(scale * base.grad(scale * np.asarray(z, dtype=float) + shift)) - eps

    width = _half_width(breakpoints)
    grid = np.union1d(np.arange(-width, width + grid_step, grid_step), breakpoints[np.abs(breakpoints) < width])
    frozen = margin(grid) < 0
    cuts = [-math.inf]
    for i in np.nonzero(frozen[:-1] != frozen[1:])[0]:
        cuts.append(optimize.brentq(lambda z: float(margin(z)), grid[i], grid[i + 1], xtol=1e-14))
    cuts.append(math.inf)
    states = [bool(frozen[0]) ^ (j % 2 == 1) for j in range(len(cuts) - 1)]
    return float(sum(_gaussian_mass(a, b) for a, b, s in zip(cuts[:-1], cuts[1:], states) if s))


# --------------------------------------------------------------------------------------------
# Correlation kernel
# --------------------------------------------------------------------------------------------

_SERIES_TERMS = 120
_SERIES_TOLERANCE = 1e-12


def _kernel_series(coefficients: np.ndarray, r: np.ndarray) -> np.ndarray:
    weights = coefficients[1:] ** 2
    powers = r[..., None] ** np.arange(1, weights.size + 1)
    return powers @ weights


def _series_error_bound(coefficients: np.ndarray, r: np.ndarray) -> np.ndarray:
    tail_mass = max(1.0 - float(np.sum(coefficients[1:] ** 2)), 0.0) + 1e-15
    return np.abs(r) ** (coefficients.size) * tail_mass


def _kernel_quadrature_single(psi: NormalisedActivation, r: float) -> float:
    """E[psi(X) psi(Y)] for corr(X, Y) = r, by nested quadrature split at the kinks."""
    s = math.sqrt(max(1.0 - r * r, 0.0))
    kinks = np.asarray(psi.breakpoints, dtype=float)
    outer_points = list(kinks)
    if r != 0.0:
        outer_points += [k / r for k in kinks if abs(k / r) < _MAX_HALF_WIDTH]
    outer_edges = _panel_edges(outer_points, _half_width(kinks))
    x, wx = _rule_from_edges(outer_edges)
    if s == 0.0:
        return float((psi(x) * psi(r * x)) @ wx)
    # inner kink locations in w for every outer node: r x + s w = k
    w_star = (kinks[None, :] - r * x[:, None]) / s
    width = np.clip(np.max(np.abs(w_star), axis=1) + _TAIL_MARGIN, _MIN_HALF_WIDTH, _MAX_HALF_WIDTH)
    n_uniform = int(math.ceil(2.0 * _MIN_HALF_WIDTH / _PANEL_WIDTH))
    uniform = width[:, None] * np.linspace(-1.0, 1.0, n_uniform + 1)[None, :]
    offsets = np.concatenate([[0.0], -_GRADING, _GRADING])
    graded = (w_star[:, :, None] + offsets[None, None, :]).reshape(x.size, -1)
    edges = np.sort(np.clip(np.concatenate([uniform, graded], axis=1), -width[:, None], width[:, None]), axis=1)
    w, ww = _rule_from_edges(edges)
    inner = np.sum(psi(r * x[:, None] + s * w) * ww, axis=1)
    return float((psi(x) * inner) @ wx)


def correlation_kernel(
    activation: ActivationLike,
    r: float | np.ndarray,
    scale: float = 1.0,
    shift: float = 0.0,
    *,
    method: str = "auto",
    n_terms: int = _SERIES_TERMS,
) -> float | np.ndarray:
    """K(r) = Corr(psi(X), psi(Y)) for standard bivariate Gaussian (X, Y) with correlation r (vectorised).

    ``method``: "series" (Hermite sum a_k^2 r^k with ``n_terms`` terms), "quadrature" (nested
    Gauss-Legendre, split at kinks) or "auto" (series where its tail bound is < 1e-12, else quadrature).
    """
    if method not in ("auto", "series", "quadrature"):
        raise ValueError(f"method must be 'auto', 'series' or 'quadrature', got {method!r}")
    r_arr = np.asarray(r, dtype=float)
    if not np.all(np.isfinite(r_arr)) or np.any(np.abs(r_arr) > 1.0 + 1e-12):
        raise ValueError("correlations r must be finite and lie in [-1, 1]")
    r_arr = np.clip(r_arr, -1.0, 1.0)
    psi = normalised_activation(activation, scale, shift)
    flat = r_arr.ravel()
    out = np.empty_like(flat)
    use_series = np.zeros(flat.shape, dtype=bool)
    if method != "quadrature":
        coefficients = _hermite_coefficients_of(psi, int(n_terms))
        if method == "series":
            use_series[:] = True
        else:
            use_series = _series_error_bound(coefficients, flat) < _SERIES_TOLERANCE
        out[use_series] = _kernel_series(coefficients, flat[use_series])
    remaining = np.nonzero(~use_series)[0]
    unique_r, inverse = np.unique(flat[remaining], return_inverse=True)
    values = np.array([_kernel_quadrature_single(psi, float(v)) for v in unique_r])
    out[remaining] = values[inverse] if unique_r.size else out[remaining]
    out = out.reshape(r_arr.shape)
    return float(out) if out.ndim == 0 else out


def kernel_matrix(C: np.ndarray, activation: ActivationLike, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    """K_psi applied entrywise to a correlation matrix C (the post-activation correlation matrix)."""
    C = validate_correlation_matrix(C)
    d = C.shape[0]
    upper = np.triu_indices(d, k=1)
    K = np.eye(d)
    if upper[0].size:
        values = np.atleast_1d(correlation_kernel(activation, C[upper], scale, shift))
        K[upper] = values
        K[(upper[1], upper[0])] = values
    return K


def quartic_gap(
    activation: ActivationLike, r: float | np.ndarray, scale: float = 1.0, shift: float = 0.0
) -> float | np.ndarray:
    """r^2 - K(r)^2: the per-entry loss of squared correlation through the nonlinearity (Lemma A.1)."""
    r_arr = np.asarray(r, dtype=float)
    return r_arr**2 - np.asarray(correlation_kernel(activation, r_arr, scale, shift)) ** 2


def quartic_gap_bound(
    activation: ActivationLike, r: float | np.ndarray, scale: float = 1.0, shift: float = 0.0
) -> float | np.ndarray:
    """gamma r^2 (1 - r^2): Lemma A.1's universal lower bound on the quartic gap."""
    r_arr = np.asarray(r, dtype=float)
    return decorrelation_strength(activation, scale, shift) * r_arr**2 * (1.0 - r_arr**2)


# --------------------------------------------------------------------------------------------
# Matrix quantities and Theorem 3.1
# --------------------------------------------------------------------------------------------


def _as_square(M: np.ndarray, name: str) -> np.ndarray:
    M = np.asarray(M, dtype=float)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"{name} must be a square 2-D matrix, got shape {M.shape}")
    if not np.all(np.isfinite(M)):
        raise ValueError(f"{name} contains NaN or inf entries")
    return M


def validate_correlation_matrix(C: np.ndarray, atol: float = 1e-8) -> np.ndarray:
    """Check C is square, symmetric, unit-diagonal with entries in [-1, 1]; return a cleaned float copy."""
    C = _as_square(C, "C")
    if C.shape[0] == 0:
        raise ValueError("C is empty; pass a d x d correlation matrix with d >= 1")
    if not np.allclose(C, C.T, atol=atol, rtol=0.0):
        raise ValueError("C must be symmetric (max |C - C^T| = %.3g)" % np.max(np.abs(C - C.T)))
    if not np.allclose(np.diag(C), 1.0, atol=atol, rtol=0.0):
        raise ValueError("C must have a unit diagonal (it is a correlation matrix); normalise with D^-1/2 C D^-1/2")
    if np.any(np.abs(C) > 1.0 + atol):
        raise ValueError("correlation entries must lie in [-1, 1] (max |C_ij| = %.6g)" % np.max(np.abs(C)))
    C = np.clip(0.5 * (C + C.T), -1.0, 1.0)
    np.fill_diagonal(C, 1.0)
    return C


def decorrelation_potential(C: np.ndarray) -> float:
    """Psi(C) = sum_{i != j} C_ij^2 (1 - C_ij^2): zero iff every off-diagonal correlation is 0 or +-1."""
    C = _as_square(C, "C")
    off = C[~np.eye(C.shape[0], dtype=bool)]
    return float(np.sum(off**2 * (1.0 - off**2)))


def renyi2_rank(M: np.ndarray) -> float:
    """Renyi-2 effective rank er2(M) = (tr M)^2 / ||M||_F^2 of a symmetric PSD matrix (NaN if M = 0).

    A NumPy front end of :func:`lopkit.diagnostics.rank.renyi2_rank` that refuses NaN / inf entries.
    """
    return diagnostics_renyi2_rank(torch.from_numpy(_as_square(M, "M")))


def shannon_effective_rank(M: np.ndarray) -> float:
    """exp(entropy of eigenvalues / trace) of a symmetric PSD matrix (Roy & Vetterli); NaN if the trace is 0."""
    M = _as_square(M, "M")
    eigenvalues = np.linalg.eigvalsh(0.5 * (M + M.T))
    scale = max(float(np.max(np.abs(eigenvalues))), 0.0) if eigenvalues.size else 0.0
    if eigenvalues.size and eigenvalues.min() < -1e-8 * max(scale, 1e-300):
        raise ValueError(f"M must be positive semi-definite (smallest eigenvalue {eigenvalues.min():.3g})")
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    total = float(eigenvalues.sum())
    if total <= 0.0:
        warnings.warn(
            "shannon_effective_rank of a zero matrix is undefined; returning NaN", LopkitWarning, stacklevel=2
        )
        return float("nan")
    p = eigenvalues[eigenvalues > 0] / total
    return float(math.exp(-np.sum(p * np.log(p))))


@dataclass(frozen=True)
class RankGainCheck:
    """Outcome of Theorem 3.1 for one C: actual er2 ratio, the lower bound, and the pieces of the bound."""

    ratio: float  # er2(K(C)) / er2(C) = ||C||_F^2 / ||K(C)||_F^2 (exact; v1's statement)
    bound: float  # 1 + gamma * Psi(C) / ||C||_F^2
    holds: bool  # ratio >= bound (up to 1e-10 relative rounding)
    gamma: float
    psi: float  # decorrelation potential Psi(C)
    er2_input: float
    er2_output: float


def check_rank_gain_bound(
    C: np.ndarray, activation: ActivationLike, scale: float = 1.0, shift: float = 0.0
) -> RankGainCheck:
    """Check Theorem 3.1, er2(K(C))/er2(C) >= 1 + gamma Psi(C)/||C||_F^2, for one correlation matrix C.

    C must be a correlation matrix (square, symmetric, unit diagonal, entries in [-1, 1]).  If C is
    not positive semi-definite it is not the correlation of Gaussian pre-activations; the check is
    still done (Lemma A.1 holds entrywise) but a warning is emitted.
    """
    C = validate_correlation_matrix(C)
    if C.shape[0] > 1 and np.linalg.eigvalsh(C).min() < -1e-8 * C.shape[0]:
        warnings.warn(
            "C is not positive semi-definite, so it is not the correlation matrix of any Gaussian vector; "
            "the bound is still checked entrywise",
            LopkitWarning,
            stacklevel=2,
        )
    K = kernel_matrix(C, activation, scale, shift)
    gamma = decorrelation_strength(activation, scale, shift)
    psi = decorrelation_potential(C)
    er2_in, er2_out = renyi2_rank(C), renyi2_rank(K)
    ratio = er2_out / er2_in
    bound = 1.0 + gamma * psi / float(np.sum(C * C))
    return RankGainCheck(
        ratio=float(ratio),
        bound=float(bound),
        holds=bool(ratio >= bound * (1.0 - 1e-10)),
        gamma=float(gamma),
        psi=float(psi),
        er2_input=float(er2_in),
        er2_output=float(er2_out),
    )


def correlation_path(C_target: np.ndarray, n: int = 21) -> tuple[np.ndarray, np.ndarray]:
    """The path C(lambda) = (1 - lambda) I + lambda C_target for n values of lambda in [0, 1].

    Returns ``(lambdas, matrices)`` with shapes ``(n,)`` and ``(n, d, d)``; every C(lambda) is a
    correlation matrix when C_target is one (convex combination).
    """
    C_target = validate_correlation_matrix(C_target)
    if int(n) < 2:
        raise ValueError(f"n must be >= 2 (number of points on the path, endpoints included), got {n}")
    lambdas = np.linspace(0.0, 1.0, int(n))
    identity = np.eye(C_target.shape[0])
    matrices = (1.0 - lambdas)[:, None, None] * identity + lambdas[:, None, None] * C_target
    return lambdas, matrices


def random_correlation_matrix(d: int, seed: int = 0, n_samples: int | None = None) -> np.ndarray:
    """A dense random correlation matrix: the normalised Wishart matrix of ``n_samples`` (default d) Gaussian draws.

    Fewer samples give stronger correlations (rank <= n_samples).
    """
    if int(d) < 1:
        raise ValueError(f"d must be a positive integer, got {d}")
    m = int(d if n_samples is None else n_samples)
    if m < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples}")
    G = np.random.default_rng(seed).standard_normal((int(d), m))
    W = G @ G.T / m
    inv_sd = 1.0 / np.sqrt(np.diag(W))
    C = W * inv_sd[:, None] * inv_sd[None, :]
    C = 0.5 * (C + C.T)
    np.fill_diagonal(C, 1.0)
    return np.clip(C, -1.0, 1.0)
