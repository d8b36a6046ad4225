"""Turn layer outputs into (samples, units) matrices and compute activation derivatives.

Every activation metric in :mod:`lopkit.diagnostics` works on a 2-D matrix whose rows are samples and
whose columns are units. Conv outputs ``(N, C, *spatial)`` become ``(N * prod(spatial), C)``: channels
are the units and every spatial position counts as a sample, as in the paper's code.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import warn

ActivationLike = Union[nn.Module, Callable[[torch.Tensor], torch.Tensor], str]

__all__ = [
    "ActivationLike",
    "ACTIVATION_NAMES",
    "as_unit_matrix",
    "to_float_unit_matrix",
    "resolve_activation",
    "activation_derivative",
    "all_finite",
    "check_finite",
    "normalised_unit_columns",
]


def as_unit_matrix(h: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """Reshape a layer output to ``(samples, units)`` so all metrics see the same layout.

    ``(N, D)`` passes through unchanged. ``(N, C, *spatial)`` becomes ``(N * prod(spatial), C)``
    (channels are units). With ``channels_last=True`` the last axis holds the units, so a sequence
    ``(N, T, D)`` becomes ``(N * T, D)``. The result is a view when possible and keeps autograd history.
    """
    if not isinstance(h, torch.Tensor):
        h = torch.as_tensor(h)
    if h.dim() < 2:
        raise ValueError(
            f"expected activations with a batch axis and a unit axis, got shape {tuple(h.shape)}; "
            "pass a (samples, units) matrix, e.g. h.unsqueeze(0) for a single sample or "
            "h.unsqueeze(1) for a single unit"
        )
    if h.dim() == 2:
        return h
    if channels_last:
        return h.reshape(-1, h.shape[-1])
    return h.movedim(1, -1).reshape(-1, h.shape[1])


def to_float_unit_matrix(h: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """Detached floating-point unit matrix: what metrics compute on (half precision is promoted to float32)."""
    m = as_unit_matrix(h, channels_last=channels_last).detach()
    if m.dtype not in (torch.float32, torch.float64):
        m = m.to(torch.float32)
    return m


def all_finite(h: torch.Tensor) -> bool:
    """True when every entry of ``h`` is finite, tested through one sum (about 30x cheaper than ``isfinite``).

    A NaN or inf entry makes the sum non-finite; only when the sum is non-finite (or overflows with finite
    entries) is every element checked.
    """
    if h.numel() == 0 or bool(torch.isfinite(h.sum())):
        return True
    return bool(torch.isfinite(h).all())


def check_finite(h: torch.Tensor, what: str = "activations") -> bool:
    """Return True if ``h`` holds only finite numbers; otherwise warn (LopkitWarning) and return False."""
    if all_finite(h):
        return True
    bad = int((~torch.isfinite(h)).sum())
    warn(
        f"{what} contain {bad} NaN/inf value(s) out of {h.numel()}; the metric is undefined and NaN is "
        "returned. Check the learning rate / loss for divergence before measuring.",
        stacklevel=4,
    )
    return False


def _column_norms(m: torch.Tensor) -> torch.Tensor:
    """L2 norm of every column (sum of squares along rows: ~3x faster than ``vector_norm(m, dim=0)`` on CPU)."""
    return m.square().sum(dim=0).sqrt_()


def normalised_unit_columns(m: torch.Tensor, centered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of a unit matrix scaled to unit L2 norm, plus the bool mask of degenerate units.

    With ``centered=True`` each column's mean is removed first (Pearson geometry). A unit is degenerate
    (its column is set to zero) when it has zero norm, or, centred, when it is constant: its centred norm
    is then only rounding noise, at most ~100 machine epsilons times its uncentred norm.
    """
    raw_norms = _column_norms(m)
    x = m - m.mean(dim=0, keepdim=True) if centered else m
    norms = _column_norms(x) if centered else raw_norms
    degenerate = norms <= 100 * torch.finfo(m.dtype).eps * raw_norms
    safe_norms = torch.where(degenerate, torch.ones_like(norms), norms)
    unit_columns = x.div_(safe_norms) if centered else x / safe_norms  # ``x`` is a fresh copy when centred
    if bool(degenerate.any()):
        unit_columns[:, degenerate] = 0.0
    return unit_columns, degenerate


def _leaky_relu(z: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(z, negative_slope=0.01)


ACTIVATION_NAMES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "elu": F.elu,
    "selu": F.selu,
    "celu": F.celu,
    "leaky_relu": _leaky_relu,
    "leakyrelu": _leaky_relu,
    "softplus": F.softplus,
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "relu6": F.relu6,
    "hardtanh": F.hardtanh,
    "softsign": F.softsign,
    "identity": lambda z: z,
    "linear": lambda z: z,
}


def resolve_activation(activation: ActivationLike) -> Callable[[torch.Tensor], torch.Tensor]:
    """Map an ``nn.Module``, a callable or a name such as ``"tanh"`` to a tensor -> tensor function."""
    if isinstance(activation, str):
        key = activation.strip().lower().replace("-", "_")
        if key not in ACTIVATION_NAMES:
            raise ValueError(
                f"unknown activation name {activation!r}; use one of {sorted(ACTIVATION_NAMES)} "
                "or pass an nn.Module / callable instead"
            )
        return ACTIVATION_NAMES[key]
    if callable(activation):
        return activation
    raise ValueError(
        f"activation must be an nn.Module, a callable or a name, got {type(activation).__name__}"
    )


def activation_derivative(z: torch.Tensor, activation: ActivationLike) -> torch.Tensor:
    """Elementwise derivative f'(z) of an elementwise activation, computed by autograd on a detached copy.

    Works for any elementwise activation (``nn.Module`` incl. in-place ones, callable or name) without
    hand-written formulas. ``z`` is never modified and no graph is kept; the result has ``z``'s shape.
    Where autograd defines the derivative at a kink (e.g. ReLU at 0), its convention is used.
    """
    fn = resolve_activation(activation)
    if not isinstance(z, torch.Tensor):
        z = torch.as_tensor(z)
    dtype = z.dtype if z.dtype in (torch.float32, torch.float64) else torch.float32
    if type(fn) is nn.ReLU or fn is torch.relu:
        # autograd's ReLU derivative (threshold_backward): 0 where z <= 0 (the kink included), else 1 (NaN too)
        return (z.detach() <= 0).logical_not_().to(dtype)
    with torch.inference_mode(False), torch.enable_grad():
        leaf = z.detach().to(dtype).clone().requires_grad_(True)
        # clone() again so in-place activations (nn.ReLU(inplace=True)) do not touch the leaf
        out = fn(leaf.clone())
        if not isinstance(out, torch.Tensor) or out.shape != leaf.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"activation must be elementwise (same output shape as input); input {tuple(leaf.shape)} "
                f"gave {got}"
            )
        if not out.requires_grad:
            # a piecewise-constant function (e.g. a step) has zero derivative almost everywhere
            return torch.zeros_like(leaf.detach())
        (grad,) = torch.autograd.grad(out.sum(), leaf, allow_unused=True)
    if grad is None:
        return torch.zeros_like(leaf.detach())
    return grad.detach()
