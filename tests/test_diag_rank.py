"""Tests for effective, stable, correlation and numerical ranks against numpy and closed forms."""

import math
import warnings

import numpy as np
import pytest
import torch

from lopkit.diagnostics.errors import LopkitWarning
from lopkit.diagnostics.rank import (
    correlation_effective_rank,
    correlation_matrix,
    correlation_rank,
    effective_rank,
    numerical_rank,
    renyi2_rank,
    singular_values,
    stable_rank,
)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _numpy_erank(x: np.ndarray) -> float:
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_effective_rank_of_equal_singular_values_is_the_rank(gen):
    q, _ = torch.linalg.qr(torch.randn(50, 8, generator=gen, dtype=torch.float64))
    assert effective_rank(q) == pytest.approx(8.0, rel=1e-9)
    assert effective_rank(3.0 * q[:, :5]) == pytest.approx(5.0, rel=1e-9)
    # rank one
    u = torch.randn(30, 1, generator=gen)
    assert effective_rank(u @ torch.randn(1, 10, generator=gen)) == pytest.approx(1.0, abs=1e-4)


def test_effective_rank_matches_numpy_svd(gen):
    h = torch.randn(200, 40, generator=gen) @ torch.diag(torch.logspace(0, -3, 40))
    assert effective_rank(h) == pytest.approx(_numpy_erank(h.numpy()), rel=1e-6)
    hc = h - h.mean(0)
    assert effective_rank(h, center=True) == pytest.approx(_numpy_erank(hc.numpy()), rel=1e-6)
    wide = torch.randn(30, 100, generator=gen).relu()
    assert effective_rank(wide) == pytest.approx(_numpy_erank(wide.numpy()), rel=1e-6)


def test_effective_rank_of_low_rank_float32_matrix_is_not_inflated(gen):
    h = torch.randn(512, 10, generator=gen) @ torch.randn(10, 300, generator=gen)
    assert effective_rank(h) == pytest.approx(_numpy_erank(h.numpy()), rel=1e-4)
    assert effective_rank(h) <= 10.0 + 1e-6


def test_singular_values_match_numpy(gen):
    for shape in [(20, 50), (50, 20)]:
        h = torch.randn(*shape, generator=gen, dtype=torch.float64)
        np.testing.assert_allclose(
            singular_values(h).numpy(), np.linalg.svd(h.numpy(), compute_uv=False), rtol=1e-8
        )


def test_effective_rank_subsampling_is_deterministic_and_bounded(gen):
    h = torch.randn(3000, 20, generator=gen)
    first = effective_rank(h, max_samples=256)
    assert first == effective_rank(h, max_samples=256)
    assert first == pytest.approx(effective_rank(h, max_samples=None), rel=0.05)
    # a matrix whose first 1024 rows are all identical: a strided / head-only subset would see rank 1
    h2 = torch.randn(2048, 5, generator=gen)
    h2[:1024] = h2[0]
    assert effective_rank(h2, max_samples=1024) > 2.0


def test_effective_rank_undefined_cases():
    with pytest.warns(LopkitWarning, match="all-zero"):
        assert math.isnan(effective_rank(torch.zeros(10, 4)))
    with pytest.warns(LopkitWarning, match="2 samples"):
        assert math.isnan(effective_rank(torch.ones(1, 4)))
    with pytest.warns(LopkitWarning):
        assert math.isnan(effective_rank(torch.zeros(10, 0)))
    h = torch.randn(10, 4)
    h[1, 1] = float("nan")
    with pytest.warns(LopkitWarning, match="NaN"):
        assert math.isnan(effective_rank(h))


def test_stable_rank_matches_numpy_and_is_below_numerical_rank(gen):
    for shape in [(100, 30), (30, 100)]:
        h = torch.randn(*shape, generator=gen) @ torch.diag(torch.linspace(1, 0.1, shape[1]))
        x = h.numpy().astype(np.float64)
        x = x - x.mean(0)
        gram = x.T @ x
        expected = np.linalg.norm(x, "fro") ** 4 / np.trace(gram @ gram)
        assert stable_rank(h) == pytest.approx(expected, rel=1e-6)
        assert stable_rank(h) <= np.linalg.matrix_rank(x) + 1e-9
    # orthonormal, mean-zero columns: equal singular values after centring, so stable rank = rank
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(0))
    assert q.mean(0).abs().max() < 1e-12
    assert stable_rank(q) == pytest.approx(6.0, rel=1e-9)


def test_stable_rank_constant_rows_warn():
    with pytest.warns(LopkitWarning, match="centred"):
        assert math.isnan(stable_rank(torch.ones(8, 3)))


def test_renyi2_rank_closed_forms():
    assert renyi2_rank(torch.eye(7)) == pytest.approx(7.0)
    v = torch.arange(1.0, 5.0)
    assert renyi2_rank(torch.outer(v, v)) == pytest.approx(1.0)
    lam = np.array([3.0, 1.0, 0.5])
    assert renyi2_rank(torch.diag(torch.tensor(lam))) == pytest.approx(lam.sum() ** 2 / (lam**2).sum())
    with pytest.raises(ValueError, match="square"):
        renyi2_rank(torch.ones(2, 3))
    with pytest.warns(LopkitWarning):
        assert math.isnan(renyi2_rank(torch.zeros(3, 3)))


def test_correlation_matrix_matches_numpy_and_drops_constant_units(gen):
    h = torch.randn(100, 6, generator=gen)
    h[:, 2] = 4.0
    with pytest.warns(LopkitWarning, match="dropped 1 constant"):
        corr, kept = correlation_matrix(h, return_kept=True)
    assert kept.tolist() == [0, 1, 3, 4, 5]
    expected = np.corrcoef(h.numpy()[:, [0, 1, 3, 4, 5]].astype(np.float64), rowvar=False)
    np.testing.assert_allclose(corr.numpy(), expected, atol=1e-5)


def test_correlation_rank_identity_and_duplicates(gen):
    d = 20
    h = torch.randn(20000, d, generator=gen)
    assert correlation_rank(h) == pytest.approx(d, rel=0.03)
    # every base unit repeated k times: er2 of the correlation matrix -> d / k
    k = 4
    base = torch.randn(20000, d // k, generator=gen)
    dup = base.repeat_interleave(k, dim=1)
    assert correlation_rank(dup) == pytest.approx(d / k, rel=0.03)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # exact closed form on the sample correlation matrix
        c = np.corrcoef(dup.numpy().astype(np.float64), rowvar=False)
        assert correlation_rank(dup) == pytest.approx(d**2 / (c**2).sum(), rel=1e-5)


def test_correlation_effective_rank_matches_eigenvalues(gen):
    h = torch.randn(300, 12, generator=gen) @ torch.randn(12, 12, generator=gen)
    c = np.corrcoef(h.numpy().astype(np.float64), rowvar=False)
    lam = np.clip(np.linalg.eigvalsh(c), 0, None)
    p = lam / lam.sum()
    p = p[p > 0]
    assert correlation_effective_rank(h) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)


def test_correlation_rank_all_constant_warns():
    with pytest.warns(LopkitWarning, match="constant"):
        assert math.isnan(correlation_rank(torch.ones(10, 3)))


def test_numerical_rank_matches_numpy(gen):
    h = torch.randn(60, 8, generator=gen) @ torch.randn(8, 25, generator=gen)
    assert numerical_rank(h) == np.linalg.matrix_rank(h.numpy()) == 8
    assert numerical_rank(torch.randn(10, 30, generator=gen)) == 10
    assert numerical_rank(torch.zeros(0, 5)) == 0
    assert numerical_rank(torch.zeros(4, 5)) == 0
    h64 = torch.randn(60, 8, generator=gen, dtype=torch.float64) @ torch.randn(8, 25, generator=gen, dtype=torch.float64)
    assert numerical_rank(h64) == np.linalg.matrix_rank(h64.numpy()) == 8
    assert numerical_rank(h.double()) == np.linalg.matrix_rank(h.double().numpy())  # float32 rounding is rank
    # float32 path (Gram eigenvalues) agrees with numpy's SVD on low-rank matrices with spread spectra
    for trial in range(30):
        n, d, r = 40 + 7 * trial, 200 - 5 * trial, 1 + trial
        spread = torch.logspace(0, -5, r)
        m = (torch.randn(n, r, generator=gen) * spread) @ torch.randn(r, d, generator=gen)
        assert numerical_rank(m) == np.linalg.matrix_rank(m.numpy())
    h2 = torch.diag(torch.tensor([1.0, 1e-3, 1e-6]))
    assert numerical_rank(h2, rtol=1e-4) == 2
    bad = torch.ones(3, 3)
    bad[0, 0] = float("nan")
    with pytest.warns(LopkitWarning):
        assert math.isnan(numerical_rank(bad))


def test_conv_input_uses_channels(gen):
    h = torch.randn(4, 3, 6, 6, generator=gen)
    m = h.permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    assert effective_rank(h) == pytest.approx(_numpy_erank(m), rel=1e-6)


# ---------------------------------------------------------------------------- fused rank metrics
from lopkit.diagnostics.rank import (  # noqa: E402
    RANK_METRIC_NAMES,
    RankWorkspace,
    gram_matrix,
    rank_metrics,
    symmetric_product,
)


def _pure_ranks(h: torch.Tensor) -> dict:
    """The four pure rank functions on all rows of h."""
    return {
        "effective_rank": effective_rank(h, max_samples=None),
        "stable_rank": stable_rank(h),
        "correlation_rank": correlation_rank(h),
        "numerical_rank": numerical_rank(h),
    }


def _assert_same_ranks(fused: dict, pure: dict, rel: float = 1e-10) -> None:
    assert list(fused) == list(RANK_METRIC_NAMES)
    assert fused["numerical_rank"] == pure["numerical_rank"]
    for name in ("effective_rank", "stable_rank", "correlation_rank"):
        assert fused[name] == pytest.approx(pure[name], rel=rel), name


@pytest.mark.parametrize("shape", [(5, 3), (64, 40), (65, 200), (300, 130), (513, 1000)])
def test_symmetric_product_matches_matmul(shape, gen):
    a = torch.randn(*shape, generator=gen, dtype=torch.float64)
    expected = a.numpy() @ a.numpy().T
    np.testing.assert_allclose(symmetric_product(a).numpy(), expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())
    # a transposed (non-contiguous) view works too: gram_matrix takes the smaller side
    wide = torch.randn(shape[1], shape[0], generator=gen, dtype=torch.float64).T
    gram = gram_matrix(wide)
    side = wide.numpy().T @ wide.numpy() if shape[0] > shape[1] else wide.numpy() @ wide.numpy().T
    assert gram.shape == (min(shape), min(shape))
    np.testing.assert_allclose(gram.numpy(), side, rtol=1e-12, atol=1e-12 * np.abs(side).max())


@pytest.mark.parametrize("shape", [(200, 300), (300, 120), (40, 12)])
def test_rank_metrics_equal_pure_functions(shape, gen):
    n, d = shape
    relu = (torch.randn(n, d, generator=gen) @ torch.randn(d, d, generator=gen) + 0.5).relu()
    relu[:, 3] = 0.0  # a dead (constant) unit: dropped by correlation_rank with a warning
    low_rank = torch.randn(n, 5, generator=gen) @ torch.randn(5, d, generator=gen)
    double = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.logspace(0, -4, d, dtype=torch.float64)
    for h in (relu, low_rank, double):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LopkitWarning)
            fused, pure = rank_metrics(h), _pure_ranks(h)
        _assert_same_ranks(fused, pure)
    # independent check of the derived (P G P) stable rank against numpy on the centred rows
    x = relu.numpy().astype(np.float64)
    x = x - x.mean(0)
    gram = x @ x.T
    assert rank_metrics(relu, ["stable_rank"])["stable_rank"] == pytest.approx(
        np.trace(gram) ** 2 / (gram**2).sum(), rel=1e-10
    )
    assert rank_metrics(low_rank, ["numerical_rank"]) == {"numerical_rank": 5.0}


def test_rank_metrics_max_samples_uses_the_same_rows_for_all(gen):
    h = torch.randn(700, 30, generator=gen).relu()
    fused = rank_metrics(h, max_samples=256)
    rows = torch.randperm(700, generator=torch.Generator().manual_seed(0))[:256].sort().values
    _assert_same_ranks(fused, _pure_ranks(h[rows]))
    assert fused["effective_rank"] == pytest.approx(effective_rank(h, max_samples=256), rel=1e-12)


def test_rank_metrics_stable_rank_of_nearly_constant_samples(gen):
    """Large offsets make P G P cancel; the workspace then centres the rows itself, like stable_rank."""
    for offset in (30.0, 1e4):  # centred energy fraction ~1e-3 (derived from G) and ~1e-8 (fallback)
        h = torch.randn(100, 150, generator=gen, dtype=torch.float64) + offset
        x = h.numpy() - h.numpy().mean(0)
        gram = x @ x.T
        expected = np.trace(gram) ** 2 / (gram**2).sum()
        assert rank_metrics(h, ["stable_rank"])["stable_rank"] == pytest.approx(expected, rel=1e-10)
        assert stable_rank(h) == pytest.approx(expected, rel=1e-10)
    with pytest.warns(LopkitWarning, match="centred"):
        assert math.isnan(rank_metrics(torch.full((8, 80), 0.1), ["stable_rank"])["stable_rank"])


def test_rank_workspace_undefined_cases_warn_like_pure_functions():
    with pytest.warns(LopkitWarning, match="2 samples"):
        values = rank_metrics(torch.ones(1, 4))
    assert math.isnan(values["effective_rank"]) and math.isnan(values["stable_rank"])
    bad = torch.randn(10, 4)
    bad[2, 3] = float("inf")
    with pytest.warns(LopkitWarning, match="NaN/inf"):
        values = rank_metrics(bad)
    assert all(math.isnan(v) for v in values.values())
    with pytest.warns(LopkitWarning, match="all-zero"):
        assert math.isnan(RankWorkspace(torch.zeros(10, 4)).effective_rank())
    with pytest.raises(ValueError, match="unknown rank metric"):
        rank_metrics(torch.randn(10, 4), ["rank"])
    with pytest.raises(ValueError, match="unknown rank metric"):
        RankWorkspace(torch.randn(10, 4)).value("dead_fraction")


def test_rank_workspace_computes_the_spectrum_once(gen, monkeypatch):
    import lopkit.diagnostics.rank as rank_module

    calls = []
    original = rank_module._singular_values_of_gram
    monkeypatch.setattr(rank_module, "_singular_values_of_gram", lambda g: calls.append(1) or original(g))
    workspace = RankWorkspace(torch.randn(50, 20, generator=gen))
    workspace.effective_rank(), workspace.numerical_rank(), workspace.stable_rank()
    assert len(calls) == 1


def test_eigendecomposition_restores_the_thread_count(gen):
    """singular_values runs eigvalsh on one CPU thread and gives the caller's thread count back."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        h = torch.randn(30, 70, generator=gen, dtype=torch.float64)
        np.testing.assert_allclose(singular_values(h).numpy(), np.linalg.svd(h.numpy(), compute_uv=False), rtol=1e-10)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
