"""Per-unit activity criteria: dead, saturated (gradient ratio), derivative-frozen and ReDo-dormant units.

Each criterion has a ``*_unit_mask`` returning a bool tensor of shape ``(units,)`` (for mitigations that
reset units) and a ``*_fraction`` returning the fraction of such units as a Python float (for monitoring).
Inputs are layer outputs: ``(N, D)``, or conv ``(N, C, *spatial)`` with channels as units (see
:func:`lopkit.diagnostics.units.as_unit_matrix`; flatten sequences with ``channels_last=True`` first).

Bad input: masks warn and mark no unit when the input holds NaN/inf or has no samples; fractions return
NaN with a :class:`~lopkit.diagnostics.errors.LopkitWarning`.
"""

from __future__ import annotations

import torch

from .errors import warn
from .units import ActivationLike, activation_derivative, check_finite, to_float_unit_matrix

__all__ = [
    "dead_unit_mask",
    "dead_fraction",
    "saturated_unit_mask",
    "saturated_fraction",
    "frozen_unit_mask",
    "frozen_fraction",
    "dormant_scores",
    "dormant_unit_mask",
    "dormant_fraction",
]


def _check_fraction_arg(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction of samples in [0, 1], got {value}")


def _usable(m: torch.Tensor, what: str) -> bool:
    """Warn and return False when ``m`` has no samples, no units or non-finite entries."""
    if m.shape[0] == 0 or m.shape[1] == 0:
        warn(
            f"{what} have shape {tuple(m.shape)} (samples, units); need at least one sample and one unit. "
            "Pass a non-empty probe batch and a layer with units.",
            stacklevel=4,
        )
        return False
    return check_finite(m, what)


def _fraction(mask: torch.Tensor, usable: bool) -> float:
    """Fraction of True entries, or NaN (already warned) when the input was unusable."""
    if not usable or mask.numel() == 0:
        return float("nan")
    return mask.float().mean().item()


# --------------------------------------------------------------------------- dead units


def _dead_mask(m: torch.Tensor, threshold: float, sample_fraction: float) -> torch.Tensor:
    return (m.abs() < threshold).float().mean(dim=0) > sample_fraction


def dead_unit_mask(h: torch.Tensor, threshold: float = 1e-7, sample_fraction: float = 0.95) -> torch.Tensor:
    """Units whose |activation| < ``threshold`` on more than ``sample_fraction`` of samples (paper: 1e-7, 95 %)."""
    _check_fraction_arg("sample_fraction", sample_fraction)
    m = to_float_unit_matrix(h)
    _usable(m, "activations")
    return _dead_mask(m, threshold, sample_fraction)


def dead_fraction(h: torch.Tensor, threshold: float = 1e-7, sample_fraction: float = 0.95) -> float:
    """Fraction of dead units in the layer (see :func:`dead_unit_mask`); meaningful for ReLU-like units."""
    _check_fraction_arg("sample_fraction", sample_fraction)
    m = to_float_unit_matrix(h)
    ok = _usable(m, "activations")
    return _fraction(_dead_mask(m, threshold, sample_fraction), ok)


# --------------------------------------------------------------------------- saturated units


def _saturated_mask(
    m: torch.Tensor, g: torch.Tensor, ratio_threshold: float, sample_fraction: float, eps: float
) -> torch.Tensor:
    mean_abs_activation = m.abs().mean(dim=0).clamp_min(eps)  # mu_j, guarded by eps
    ratio = g.abs() / mean_abs_activation
    return (ratio < ratio_threshold).float().mean(dim=0) > sample_fraction


def _activation_and_grad(h: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(grad, torch.Tensor):
        grad = torch.as_tensor(grad)
    if not isinstance(h, torch.Tensor):
        h = torch.as_tensor(h)
    if tuple(h.shape) != tuple(grad.shape):
        raise ValueError(
            f"grad must have the same shape as the activations: h {tuple(h.shape)} vs grad "
            f"{tuple(grad.shape)}; pass dL/dh of this layer's output (e.g. from a backward hook)"
        )
    return to_float_unit_matrix(h), to_float_unit_matrix(grad)


def saturated_unit_mask(
    h: torch.Tensor,
    grad: torch.Tensor,
    ratio_threshold: float = 1e-4,
    sample_fraction: float = 0.99,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Paper's gradient-ratio saturation: |G_ij| / max(mu_j, eps) < 1e-4 on > 99 % of samples, mu_j = mean_i |H_ij|.

    ``grad`` is dL/dh for the same layer output ``h`` (same shape). The bit-flipping runs use 0.05 / 80 %.
    """
    _check_fraction_arg("sample_fraction", sample_fraction)
    m, g = _activation_and_grad(h, grad)
    if _usable(m, "activations"):
        check_finite(g, "gradients")
    return _saturated_mask(m, g, ratio_threshold, sample_fraction, eps)


def saturated_fraction(
    h: torch.Tensor,
    grad: torch.Tensor,
    ratio_threshold: float = 1e-4,
    sample_fraction: float = 0.99,
    eps: float = 1e-8,
) -> float:
    """Fraction of gradient-ratio-saturated units (see :func:`saturated_unit_mask`)."""
    _check_fraction_arg("sample_fraction", sample_fraction)
    m, g = _activation_and_grad(h, grad)
    ok = _usable(m, "activations") and check_finite(g, "gradients")
    return _fraction(_saturated_mask(m, g, ratio_threshold, sample_fraction, eps), ok)


# --------------------------------------------------------------------------- derivative-frozen units


def _frozen_mask(z: torch.Tensor, activation: ActivationLike, eps: float, sample_fraction: float) -> torch.Tensor:
    derivative = activation_derivative(z, activation)
    return (derivative.abs() < eps).float().mean(dim=0) >= sample_fraction


def frozen_unit_mask(
    z: torch.Tensor, activation: ActivationLike, eps: float = 0.01, sample_fraction: float = 0.99
) -> torch.Tensor:
    """Units with |f'(z)| < ``eps`` on at least ``sample_fraction`` of samples (the frozen-unit manifold test).

    ``z`` is the *pre-activation* (input to the activation), not its output; ``activation`` is an
    ``nn.Module``, callable or name such as ``"tanh"``. Works for any elementwise activation.
    """
    _check_fraction_arg("sample_fraction", sample_fraction)
    m = to_float_unit_matrix(z)
    _usable(m, "pre-activations")
    return _frozen_mask(m, activation, eps, sample_fraction)


def frozen_fraction(
    z: torch.Tensor, activation: ActivationLike, eps: float = 0.01, sample_fraction: float = 0.99
) -> float:
    """Fraction of derivative-frozen units (see :func:`frozen_unit_mask`)."""
    _check_fraction_arg("sample_fraction", sample_fraction)
    m = to_float_unit_matrix(z)
    ok = _usable(m, "pre-activations")
    return _fraction(_frozen_mask(m, activation, eps, sample_fraction), ok)


# --------------------------------------------------------------------------- ReDo dormant units


def _dormant_scores(m: torch.Tensor) -> torch.Tensor:
    mean_abs = m.abs().mean(dim=0)
    layer_mean = mean_abs.mean()
    if layer_mean == 0:
        # every unit is exactly silent: all scores are 0 (every unit is dormant for any tau >= 0)
        return torch.zeros_like(mean_abs)
    return mean_abs / layer_mean


def dormant_scores(h: torch.Tensor) -> torch.Tensor:
    """ReDo scores s_i = E|h_i| / mean_k E|h_k| (Sokar et al. 2023); a layer that is all zero scores 0 everywhere."""
    m = to_float_unit_matrix(h)
    if not _usable(m, "activations"):
        return torch.full((m.shape[1],), float("nan"), dtype=m.dtype, device=m.device)
    return _dormant_scores(m)


def _check_tau(tau: float) -> None:
    if tau < 0:
        raise ValueError(f"tau must be >= 0 (0 means exactly silent units; ReDo uses 0.025 or 0.1), got {tau}")


def dormant_unit_mask(h: torch.Tensor, tau: float = 0.0) -> torch.Tensor:
    """tau-dormant units, s_i <= tau. ``tau=0`` marks only units with zero activity on every sample."""
    _check_tau(tau)
    return dormant_scores(h) <= tau  # NaN scores compare False: nothing is marked on bad input


def dormant_fraction(h: torch.Tensor, tau: float = 0.0) -> float:
    """Fraction of tau-dormant units (see :func:`dormant_unit_mask`)."""
    _check_tau(tau)
    m = to_float_unit_matrix(h)
    ok = _usable(m, "activations")
    if not ok:
        return float("nan")
    return _fraction(_dormant_scores(m) <= tau, ok)

