"""Tests for parameter/gradient norms and the top Hessian eigenvalue by power iteration."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from lopkit.diagnostics.curvature import gradient_norm, parameter_norm, top_hessian_eigenvalue
from lopkit.diagnostics.errors import LopkitWarning


def _symmetric_with_spectrum(eigenvalues, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def test_norms_match_numpy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 2))
    flat = np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])
    assert parameter_norm(model.parameters()) == pytest.approx(np.linalg.norm(flat), rel=1e-6)
    assert parameter_norm(model) == pytest.approx(np.linalg.norm(flat), rel=1e-6)
    grads = [torch.tensor([3.0, 0.0]), None, torch.tensor([[4.0]])]
    assert gradient_norm(grads) == pytest.approx(5.0)
    assert gradient_norm([]) == 0.0
    with pytest.warns(LopkitWarning):
        assert math.isnan(gradient_norm([torch.tensor([float("nan")])]))


def test_top_eigenvalue_of_quadratic_matches_numpy():
    a = _symmetric_with_spectrum([5.0, 2.0, 1.0, -0.5, 0.1])
    x = nn.Parameter(torch.randn(5, dtype=torch.float64))
    value = top_hessian_eigenvalue(lambda: 0.5 * x @ a @ x, [x], iterations=200, tol=1e-10)
    assert value == pytest.approx(np.linalg.eigvalsh(a.numpy()).max(), rel=1e-6)


def test_top_eigenvalue_keeps_sign_of_dominant_negative_curvature():
    a = _symmetric_with_spectrum([-4.0, 1.0, 0.5, 2.0], seed=1)
    x = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    value = top_hessian_eigenvalue(lambda: 0.5 * x @ a @ x, [x], iterations=200, tol=1e-10)
    assert value == pytest.approx(-4.0, rel=1e-6)


def test_top_eigenvalue_across_several_tensors_and_never_touches_grad():
    # loss = 0.5 u^T A u + 0.5 v^T B v with two parameter tensors: the Hessian is block diagonal
    a = _symmetric_with_spectrum([1.0, 3.0], seed=2)
    b = _symmetric_with_spectrum([0.5, 7.0, 2.0], seed=3)
    u = nn.Parameter(torch.randn(2, dtype=torch.float64))
    v = nn.Parameter(torch.randn(3, dtype=torch.float64))
    unused = nn.Parameter(torch.randn(2, dtype=torch.float64))
    value = top_hessian_eigenvalue(
        lambda: 0.5 * u @ a @ u + 0.5 * v @ b @ v, [u, v, unused], iterations=300, tol=1e-12
    )
    assert value == pytest.approx(7.0, rel=1e-6)
    assert u.grad is None and v.grad is None and unused.grad is None


def test_top_eigenvalue_small_network_matches_dense_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def loss_of_flat(flat):
        pieces = torch.split(flat, sizes)
        tensors = [piece.reshape(shape) for piece, shape in zip(pieces, shapes)]
        out = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], tensors)), (x,))
        return ((out - y) ** 2).mean()

    flat = torch.cat([p.detach().flatten() for p in params])
    dense = torch.autograd.functional.hessian(loss_of_flat, flat).numpy()
    eig = np.linalg.eigvalsh(dense)
    dominant = eig[np.argmax(np.abs(eig))]
    value = top_hessian_eigenvalue(lambda: ((model(x) - y) ** 2).mean(), model.parameters(), iterations=500, tol=1e-10)
    assert value == pytest.approx(dominant, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_top_eigenvalue_is_deterministic_and_handles_linear_loss():
    a = _symmetric_with_spectrum([3.0, 2.9, 1.0])
    x = nn.Parameter(torch.randn(3, dtype=torch.float64))
    first = top_hessian_eigenvalue(lambda: 0.5 * x @ a @ x, [x], iterations=5, seed=4)
    assert first == top_hessian_eigenvalue(lambda: 0.5 * x @ a @ x, [x], iterations=5, seed=4)
    assert top_hessian_eigenvalue(lambda: (3 * x).sum(), [x]) == 0.0


def test_top_eigenvalue_errors():
    x = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="requires_grad"):
        top_hessian_eigenvalue(lambda: x.sum(), [torch.zeros(3)])
    with pytest.raises(ValueError, match="scalar"):
        top_hessian_eigenvalue(lambda: x * 2, [x])
    with pytest.raises(ValueError, match="does not depend"):
        top_hessian_eigenvalue(lambda: torch.tensor(1.0), [x])
    with pytest.warns(LopkitWarning):
        assert math.isnan(top_hessian_eigenvalue(lambda: (x * float("nan")).sum(), [x]))
