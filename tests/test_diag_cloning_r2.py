"""Tests for cloning R^2 (variance version and the authors' std-ratio version) and block means."""

import math

import numpy as np
import pytest
import torch

from lopkit.diagnostics.cloning import block_means, cloning_r2
from lopkit.diagnostics.errors import LopkitWarning


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _clone_layout(base: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Unit j of the cloned layer is an exact copy of base unit block_ids[j]."""
    return base[:, block_ids]


def _bruteforce_r2(h: np.ndarray, block_ids: np.ndarray) -> float:
    h = h.astype(np.float64)
    residual_ss, total_ss = 0.0, 0.0
    for i in range(h.shape[0]):
        row_mean = h[i].mean()
        for j in range(h.shape[1]):
            members = [k for k in range(h.shape[1]) if block_ids[k] == block_ids[j]]
            residual_ss += (h[i, j] - h[i, members].mean()) ** 2
            total_ss += (h[i, j] - row_mean) ** 2
    return 1.0 - residual_ss / total_ss


def _bruteforce_legacy(h: np.ndarray, factor: int) -> float:
    """The authors' formula with interleaved clones: slices a[:, j::E], unbiased stds."""
    slices = np.stack([h[:, j::factor] for j in range(factor)]).astype(np.float64)
    within = slices.std(axis=0, ddof=1)
    across = h.astype(np.float64).std(axis=1, ddof=1, keepdims=True)
    return 1.0 - float((within / (across + 1e-10)).mean())


@pytest.mark.parametrize(
    "block_ids",
    [
        torch.arange(6).repeat_interleave(2),  # interleaved-by-unit: 0,0,1,1,...
        torch.arange(6).repeat(3),  # contiguous copies: 0..5,0..5,0..5
        torch.tensor([4, 0, 2, 4, 1, 0, 3, 2, 5, 1, 4, 3, 5]),  # scattered, unequal sizes
        torch.tensor([10, -3, 7, 10, 7, -3]),  # arbitrary integer labels
    ],
)
def test_exact_clones_give_r2_one(gen, block_ids):
    labels = torch.unique(block_ids, return_inverse=True)[1]
    base = torch.randn(64, int(labels.max()) + 1, generator=gen)
    h = _clone_layout(base, labels)
    assert cloning_r2(h, block_ids) == pytest.approx(1.0, abs=1e-6)


def test_noise_lowers_r2_and_matches_bruteforce(gen):
    block_ids = torch.tensor([2, 0, 1, 2, 0, 1, 1, 3, 3])
    base = torch.randn(25, 4, generator=gen)
    h = _clone_layout(base, block_ids) + 0.3 * torch.randn(25, 9, generator=gen)
    r2 = cloning_r2(h, block_ids)
    assert r2 < 0.99
    assert r2 == pytest.approx(_bruteforce_r2(h.numpy(), block_ids.numpy()), rel=1e-9)
    more_noise = _clone_layout(base, block_ids) + 1.0 * torch.randn(25, 9, generator=gen)
    assert cloning_r2(more_noise, block_ids) < r2


def test_independent_units_have_low_r2(gen):
    h = torch.randn(2000, 40, generator=gen)
    block_ids = torch.arange(20).repeat_interleave(2)
    # a block of 2 independent units explains about half the variance by chance: E[R^2] ~ 1 - 1/2
    assert cloning_r2(h, block_ids) == pytest.approx(0.5, abs=0.05)


def test_conv_layers_use_channels(gen):
    base = torch.randn(3, 4, 5, 5, generator=gen)
    block_ids = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    h = base[:, block_ids]
    assert cloning_r2(h, block_ids) == pytest.approx(1.0, abs=1e-6)
    h = h + 0.5 * torch.randn(h.shape, generator=gen)
    flat = h.permute(0, 2, 3, 1).reshape(-1, 8).numpy()
    assert cloning_r2(h, block_ids) == pytest.approx(_bruteforce_r2(flat, block_ids.numpy()), rel=1e-9)


def test_legacy_std_ratio_matches_authors_formula(gen):
    factor, n_base = 3, 5
    interleaved = torch.arange(n_base).repeat_interleave(factor)  # clone j of unit k at k*E + j
    base = torch.randn(30, n_base, generator=gen)
    h = base[:, interleaved] + 0.2 * torch.randn(30, n_base * factor, generator=gen)
    legacy = cloning_r2(h, interleaved, legacy_std_ratio=True)
    assert legacy == pytest.approx(_bruteforce_legacy(h.numpy(), factor), rel=1e-9)
    assert legacy != pytest.approx(cloning_r2(h, interleaved), rel=1e-3)  # a different quantity
    # the result depends on the partition, not on where the clones sit
    perm = torch.randperm(h.shape[1], generator=gen)
    assert cloning_r2(h[:, perm], interleaved[perm], legacy_std_ratio=True) == pytest.approx(legacy, rel=1e-9)
    exact = base[:, interleaved]
    assert cloning_r2(exact, interleaved, legacy_std_ratio=True) == pytest.approx(1.0, abs=1e-6)


def test_legacy_needs_equal_block_sizes():
    with pytest.raises(ValueError, match="same size"):
        cloning_r2(torch.randn(5, 3), torch.tensor([0, 0, 1]), legacy_std_ratio=True)


def test_block_means_matches_loop(gen):
    h = torch.randn(7, 6, generator=gen)
    block_ids = torch.tensor([5, 1, 5, 9, 1, 5])
    means = block_means(h, block_ids)
    assert means.shape == (7, 3)
    for column, block in enumerate([1, 5, 9]):
        np.testing.assert_allclose(means[:, column].numpy(), h[:, block_ids == block].mean(1).numpy(), rtol=1e-6)


def test_validation_errors():
    h = torch.randn(4, 6)
    with pytest.raises(ValueError, match="5 entries.*6 units"):
        cloning_r2(h, torch.arange(5))
    with pytest.raises(ValueError, match="1-D"):
        cloning_r2(h, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        cloning_r2(h, torch.zeros(6))
    with pytest.raises(ValueError, match="integers"):
        cloning_r2(h, torch.zeros(6, dtype=torch.bool))
    assert cloning_r2(h, [0, 0, 1, 1, 2, 2]) <= 1.0  # lists are accepted


def test_undefined_cases_warn():
    with pytest.warns(LopkitWarning, match="total variance"):
        assert math.isnan(cloning_r2(torch.ones(5, 4) * torch.arange(5.0)[:, None], torch.tensor([0, 0, 1, 1])))
    h = torch.randn(5, 4)
    h[0, 0] = float("inf")
    with pytest.warns(LopkitWarning):
        assert math.isnan(cloning_r2(h, torch.tensor([0, 0, 1, 1])))
    with pytest.warns(LopkitWarning):
        assert math.isnan(cloning_r2(torch.zeros(0, 4), torch.tensor([0, 0, 1, 1])))


def test_std_ratio_barriers_matches_hand_computation():
    # Two samples, blocks {0, 1} and {2, 3}; stds are unbiased (ddof 1), as in the authors' code.
    # Sample 1, h = [0, 2, 4, 4]: block stds sqrt(2) and 0; across-layer std sqrt(11/3).
    # Sample 2, h = [1, 1, 1, 3]: block stds 0 and sqrt(2); across-layer std 1.
    h = torch.tensor([[0.0, 2.0, 4.0, 4.0], [1.0, 1.0, 1.0, 3.0]])
    blocks = torch.tensor([0, 0, 1, 1])
    by_hand = 1.0 - (math.sqrt(2.0) / math.sqrt(11.0 / 3.0) + 0.0 + 0.0 + math.sqrt(2.0) / 1.0) / 4.0
    assert cloning_r2(h, blocks, definition="std_ratio_barriers") == pytest.approx(by_hand, rel=1e-9)
    assert cloning_r2(h, blocks, legacy_std_ratio=True) == pytest.approx(by_hand, rel=1e-9)  # older spelling
    # The paper text's variance ratio on the same numbers: residual SS 2 + 2, total SS 11 + 3.
    assert cloning_r2(h, blocks, definition="variance_ratio") == pytest.approx(1.0 - 4.0 / 14.0, rel=1e-9)
    assert cloning_r2(h, blocks) == pytest.approx(1.0 - 4.0 / 14.0, rel=1e-9)  # the default


def test_definition_errors():
    h = torch.randn(4, 4)
    with pytest.raises(ValueError, match="definition must be one of"):
        cloning_r2(h, torch.tensor([0, 0, 1, 1]), definition="std")
    with pytest.raises(ValueError, match="contradicts"):
        cloning_r2(h, torch.tensor([0, 0, 1, 1]), legacy_std_ratio=True, definition="variance_ratio")
