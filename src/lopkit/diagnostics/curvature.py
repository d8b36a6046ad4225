"""Parameter and gradient norms, and the top Hessian eigenvalue by power iteration on Hessian-vector products.

None of these touch ``param.grad``: gradients are taken with :func:`torch.autograd.grad`, so they can run
in the middle of training without disturbing the optimizer.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from .errors import warn_nan

__all__ = ["parameter_norm", "gradient_norm", "top_hessian_eigenvalue"]


def _tensors(items: Iterable[Optional[torch.Tensor]] | nn.Module | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(items, nn.Module):
        items = items.parameters()
    elif isinstance(items, torch.Tensor):
        items = [items]
    return [t for t in items if t is not None]


# Norms outside this range may have lost accuracy to float32 squares that underflow (entries below ~1e-19)
# or overflow (above ~1e19); they are recomputed in float64 (a zero norm too, which is cheap to redo).
_FLOAT32_SAFE_NORM = (1e-15, 1e15)


def _tensor_l2(t: torch.Tensor) -> float:
    """L2 norm of one tensor without a float64 copy: float32/float64 norms directly, float64 only on overflow."""
    t = t.detach()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float64 if not t.is_floating_point() else torch.float32)
    norm = float(torch.linalg.vector_norm(t))
    if t.dtype == torch.float32 and not _FLOAT32_SAFE_NORM[0] <= norm <= _FLOAT32_SAFE_NORM[1]:
        norm = float(torch.linalg.vector_norm(t.to(torch.float64)))  # squares may under/overflow float32
    return norm


def _global_l2(tensors: list[torch.Tensor]) -> float:
    """sqrt of the sum of squared per-tensor norms, combined in Python floats (float64)."""
    total = 0.0
    for t in tensors:  # loop over tensors (a handful per layer), not over elements
        total += _tensor_l2(t) ** 2
    return math.sqrt(total) if math.isfinite(total) else float("nan")


def parameter_norm(params: Iterable[torch.Tensor] | nn.Module) -> float:
    """Global L2 norm of all parameters (an ``nn.Module`` or an iterable of tensors); weight growth symptom."""
    norm = _global_l2(_tensors(params))
    return norm if math.isfinite(norm) else warn_nan("parameters contain NaN/inf; the norm is undefined.")


def gradient_norm(grads: Iterable[Optional[torch.Tensor]]) -> float:
    """Global L2 norm of a list of gradients; ``None`` entries (unused parameters) are skipped."""
    norm = _global_l2(_tensors(grads))
    return norm if math.isfinite(norm) else warn_nan("gradients contain NaN/inf; the norm is undefined.")


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def top_hessian_eigenvalue(
    loss_fn: Callable[[], torch.Tensor],
    params: Iterable[torch.Tensor] | nn.Module,
    iterations: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
) -> float:
    """Largest-magnitude eigenvalue of the loss Hessian (with its sign), by power iteration on Hessian-vector products.

    ``loss_fn`` is a zero-argument callable returning a scalar loss that depends on ``params``; it is
    called once and its graph reused. Stops after ``iterations`` products or when the Rayleigh quotient
    changes by less than ``tol`` relative. The start vector is drawn from a generator seeded by ``seed``.
    If the two extreme eigenvalues have (nearly) equal magnitude and opposite sign, power iteration
    does not settle and the value returned lies between them.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    param_list = [p for p in _tensors(params) if p.requires_grad]
    if not param_list:
        raise ValueError("params holds no tensor with requires_grad=True; pass model.parameters()")
    with torch.enable_grad():
        loss = loss_fn()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar loss tensor")
        if not loss.requires_grad:
            raise ValueError("the loss returned by loss_fn does not depend on params (requires_grad is False)")
        if not torch.isfinite(loss):
            return warn_nan("the loss is NaN/inf; the Hessian eigenvalue is undefined.")
        grads = torch.autograd.grad(loss, param_list, create_graph=True, allow_unused=True)
        pairs = [(p, g) for p, g in zip(param_list, grads) if g is not None and g.requires_grad]
        if not pairs:
            return 0.0  # the loss is at most linear in params: the Hessian is zero
        used_params = [p for p, _ in pairs]
        used_grads = [g for _, g in pairs]

        generator = torch.Generator().manual_seed(seed)
        vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in used_params]
        norm = torch.sqrt(_dot(vector, vector))
        vector = [v / norm for v in vector]

        eigenvalue = float("nan")
        for _ in range(iterations):
            products = torch.autograd.grad(
                used_grads, used_params, grad_outputs=vector, retain_graph=True, allow_unused=True
            )
            products = [torch.zeros_like(p) if hv is None else hv.detach() for p, hv in zip(used_params, products)]
            new_eigenvalue = float(_dot(vector, products))  # Rayleigh quotient v^T H v with ||v|| = 1
            product_norm = float(torch.sqrt(_dot(products, products)))
            if not math.isfinite(new_eigenvalue):
                return warn_nan("a Hessian-vector product is NaN/inf; the Hessian eigenvalue is undefined.")
            if product_norm == 0.0:
                return 0.0  # v is in the null space; for a random start that means H = 0
            converged = abs(new_eigenvalue - eigenvalue) <= tol * max(abs(new_eigenvalue), 1e-12)
            eigenvalue = new_eigenvalue
            if converged:
                break
            vector = [hv / product_norm for hv in products]
    return eigenvalue
