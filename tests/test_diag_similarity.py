"""Tests for duplicate-unit detection: cosine/Pearson similarity, the paper's counting rule and clusters."""

import math

import numpy as np
import pytest
import torch

from lopkit.diagnostics.errors import LopkitWarning
from lopkit.diagnostics.similarity import (
    cosine_similarity_matrix,
    degenerate_unit_mask,
    duplicate_clusters,
    duplicate_fraction,
    duplicate_unit_mask,
)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _bruteforce_duplicates(h: np.ndarray, threshold: float, centered: bool, absolute: bool) -> np.ndarray:
    """Reference implementation with explicit loops over unit pairs."""
    x = h.astype(np.float64)
    if centered:
        x = x - x.mean(axis=0)
    d = x.shape[1]
    mask = np.zeros(d, dtype=bool)
    for j in range(d):
        for k in range(j + 1, d):
            nj, nk = np.linalg.norm(x[:, j]), np.linalg.norm(x[:, k])
            if nj == 0 or nk == 0:
                continue
            s = x[:, j] @ x[:, k] / (nj * nk)
            if (abs(s) if absolute else s) > threshold:
                mask[j] = True
    return mask


def test_cosine_matrix_matches_numpy(gen):
    h = torch.randn(40, 7, generator=gen)
    x = h.numpy().astype(np.float64)
    cos = (x.T @ x) / np.outer(np.linalg.norm(x, axis=0), np.linalg.norm(x, axis=0))
    np.testing.assert_allclose(cosine_similarity_matrix(h).numpy(), cos, atol=1e-5)
    np.testing.assert_allclose(
        cosine_similarity_matrix(h, centered=True).numpy(), np.corrcoef(x, rowvar=False), atol=1e-5
    )


def test_cluster_of_identical_units_counts_m_minus_one(gen):
    base = torch.randn(100, 5, generator=gen)
    # units 0, 3, 6, 8 are copies of base unit 0 (scaled copies count: cosine is scale invariant)
    h = torch.cat([base, torch.randn(100, 4, generator=gen)], dim=1)  # 9 units
    h[:, 3] = 2.5 * base[:, 0]
    h[:, 6] = 0.1 * base[:, 0]
    h[:, 8] = base[:, 0]
    mask = duplicate_unit_mask(h)
    assert torch.nonzero(mask).flatten().tolist() == [0, 3, 6]  # 8 is the last of its cluster
    assert duplicate_fraction(h) == pytest.approx(3 / 9)
    assert duplicate_clusters(h) == [[0, 3, 6, 8]]


def test_anticorrelated_units_need_absolute(gen):
    h = torch.randn(200, 4, generator=gen)
    h[:, 2] = -h[:, 0]
    assert duplicate_fraction(h) == 0.0
    assert duplicate_unit_mask(h, absolute=True).tolist() == [True, False, False, False]
    assert duplicate_clusters(h, absolute=True) == [[0, 2]]


def test_uncentred_vs_pearson_on_shifted_units(gen):
    # two independent units with a large common offset look alike uncentred but not after centring
    h = torch.randn(500, 2, generator=gen) + 20.0
    assert duplicate_fraction(h) == 0.5
    assert duplicate_fraction(h, centered=True) == 0.0
    # an affine copy (scale and shift) is a Pearson duplicate
    g = torch.randn(500, 2, generator=gen)
    g[:, 1] = 3.0 * g[:, 0] - 7.0
    assert duplicate_fraction(g, centered=True) == 0.5


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("absolute", [False, True])
def test_matches_bruteforce_on_noisy_clusters(gen, centered, absolute):
    n, base_units = 60, 6
    base = torch.randn(n, base_units, generator=gen)
    columns = [base[:, i % base_units] * (1 if i % 4 else -1) + 0.3 * torch.randn(n, generator=gen) for i in range(20)]
    h = torch.stack(columns, dim=1)
    expected = _bruteforce_duplicates(h.numpy(), 0.9, centered, absolute)
    np.testing.assert_array_equal(duplicate_unit_mask(h, 0.9, centered, absolute).numpy(), expected)
    assert duplicate_fraction(h, 0.9, centered, absolute) == pytest.approx(expected.mean())


def test_zero_and_constant_units_are_never_duplicates(gen):
    h = torch.randn(50, 5, generator=gen)
    h[:, 1] = 0.0
    h[:, 3] = 0.0
    assert duplicate_fraction(h, threshold=-1.0) == pytest.approx(2 / 5)  # only non-zero units 0, 2, 4 pair up
    assert duplicate_unit_mask(h, threshold=-1.0).tolist() == [True, False, True, False, False]
    assert degenerate_unit_mask(h).tolist() == [False, True, False, True, False]
    g = torch.randn(50, 3, generator=gen)
    g[:, 0] = 0.7
    g[:, 2] = 0.7
    assert duplicate_fraction(g) == pytest.approx(1 / 3)  # constant columns are identical directions
    assert duplicate_fraction(g, centered=True) == 0.0  # but have no Pearson correlation
    assert degenerate_unit_mask(g, centered=True).tolist() == [True, False, True]


def test_clusters_ordering_and_threshold(gen):
    a, b = torch.randn(80, generator=gen), torch.randn(80, generator=gen)
    noise = torch.randn(80, 7, generator=gen)
    h = noise.clone()
    for j in (5, 1, 6):
        h[:, j] = a
    for j in (4, 2):
        h[:, j] = b
    assert duplicate_clusters(h) == [[1, 5, 6], [2, 4]]
    assert duplicate_clusters(torch.randn(80, 5, generator=gen)) == []
    with pytest.raises(ValueError, match="threshold"):
        duplicate_fraction(h, threshold=1.0)


def test_conv_input_uses_channels(gen):
    h = torch.randn(3, 4, 5, 5, generator=gen)
    h[:, 2] = 2 * h[:, 0]
    assert duplicate_fraction(h) == pytest.approx(1 / 4)


def test_bad_inputs_warn():
    h = torch.randn(10, 3)
    h[0, 0] = float("nan")
    with pytest.warns(LopkitWarning):
        assert math.isnan(duplicate_fraction(h))
    with pytest.warns(LopkitWarning):
        assert duplicate_clusters(h) == []
    with pytest.warns(LopkitWarning):
        assert not duplicate_unit_mask(h).any()
    with pytest.warns(LopkitWarning):
        assert math.isnan(duplicate_fraction(torch.zeros(0, 3)))
