"""Tests for unit-matrix reshaping, activation derivatives and the dead/saturated/frozen/dormant criteria."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lopkit.diagnostics.activations import (
    dead_fraction,
    dead_unit_mask,
    dormant_fraction,
    dormant_scores,
    dormant_unit_mask,
    frozen_fraction,
    frozen_unit_mask,
    saturated_fraction,
    saturated_unit_mask,
)
from lopkit.diagnostics.errors import LopkitWarning, warn_nan
from lopkit.diagnostics.units import activation_derivative, as_unit_matrix, check_finite


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# ----------------------------------------------------------------- units.py


def test_as_unit_matrix_2d_is_passthrough(gen):
    h = torch.randn(5, 3, generator=gen)
    assert as_unit_matrix(h) is h


def test_as_unit_matrix_conv_channels_are_units(gen):
    h = torch.randn(2, 3, 4, 5, generator=gen)  # (N, C, H, W)
    m = as_unit_matrix(h)
    assert m.shape == (2 * 4 * 5, 3)
    expected = np.transpose(h.numpy(), (0, 2, 3, 1)).reshape(-1, 3)
    np.testing.assert_array_equal(m.numpy(), expected)
    # column c holds exactly the values of channel c
    for c in range(3):
        assert sorted(m[:, c].tolist()) == sorted(h[:, c].flatten().tolist())


def test_as_unit_matrix_conv1d_and_sequence(gen):
    h = torch.randn(2, 6, 7, generator=gen)
    assert as_unit_matrix(h).shape == (14, 6)  # Conv1d: channels (axis 1) are units
    seq = as_unit_matrix(h, channels_last=True)  # (N, T, D) sequence
    assert seq.shape == (12, 7)
    np.testing.assert_array_equal(seq.numpy(), h.numpy().reshape(12, 7))


def test_as_unit_matrix_rejects_1d():
    with pytest.raises(ValueError, match="shape"):
        as_unit_matrix(torch.ones(4))


@pytest.mark.parametrize(
    "name,reference",
    [
        ("tanh", lambda z: 1 - np.tanh(z) ** 2),
        ("sigmoid", lambda z: (1 / (1 + np.exp(-z))) * (1 - 1 / (1 + np.exp(-z)))),
        ("relu", lambda z: (z > 0).astype(float)),
        ("softplus", lambda z: 1 / (1 + np.exp(-z))),
        ("elu", lambda z: np.where(z > 0, 1.0, np.exp(z))),
        ("leaky_relu", lambda z: np.where(z > 0, 1.0, 0.01)),
        ("silu", lambda z: 1 / (1 + np.exp(-z)) * (1 + z * (1 - 1 / (1 + np.exp(-z))))),
    ],
)
def test_activation_derivative_matches_closed_form(name, reference):
    z = torch.linspace(-4, 4, 81, dtype=torch.float64).reshape(9, 9) + 0.013  # avoid the kink at 0
    d = activation_derivative(z, name)
    np.testing.assert_allclose(d.numpy(), reference(z.numpy()), rtol=1e-9, atol=1e-12)


def test_activation_derivative_gelu_matches_finite_difference():
    z = torch.linspace(-3, 3, 50, dtype=torch.float64)
    step = 1e-6
    fd = (torch.nn.functional.gelu(z + step) - torch.nn.functional.gelu(z - step)) / (2 * step)
    np.testing.assert_allclose(activation_derivative(z, nn.GELU()).numpy(), fd.numpy(), atol=1e-8)


def test_activation_derivative_module_callable_inplace_and_no_mutation(gen):
    z = torch.randn(6, 4, generator=gen)
    original = z.clone()
    for act in (nn.ReLU(inplace=True), nn.Tanh(), torch.tanh, lambda t: 3 * t):
        d = activation_derivative(z, act)
        assert d.shape == z.shape and not d.requires_grad
    np.testing.assert_array_equal(z.numpy(), original.numpy())
    np.testing.assert_allclose(activation_derivative(z, lambda t: 3 * t).numpy(), 3.0)
    with torch.no_grad():
        np.testing.assert_allclose(activation_derivative(z, "relu").numpy(), (z > 0).float().numpy())
    with torch.inference_mode():
        zi = torch.randn(3, 3)
        assert activation_derivative(zi, "tanh").shape == (3, 3)


def test_activation_derivative_errors():
    with pytest.raises(ValueError, match="unknown activation"):
        activation_derivative(torch.zeros(2, 2), "not_an_activation")
    with pytest.raises(ValueError, match="elementwise"):
        activation_derivative(torch.zeros(2, 3), lambda t: t.sum(dim=1))


def test_check_finite_and_warn_nan():
    assert check_finite(torch.ones(2, 2), "x")
    with pytest.warns(LopkitWarning, match="1 NaN/inf"):
        assert not check_finite(torch.tensor([[1.0, float("inf")]]), "x")
    with pytest.warns(LopkitWarning, match="because"):
        assert math.isnan(warn_nan("because"))
    assert issubclass(LopkitWarning, UserWarning)


# ----------------------------------------------------------------- dead units


def test_dead_units_constructed(gen):
    h = torch.rand(200, 10, generator=gen) + 0.1
    h[:, [1, 4]] = 0.0  # always dead
    h[:8, 7] = 0.0  # dead on 4 % of samples: alive
    h[:195, 8] = 0.0  # dead on 97.5 % of samples (> 95 %): dead
    h[:190, 9] = 0.0  # dead on exactly 95 % of samples: not > 95 %, alive
    mask = dead_unit_mask(h)
    assert mask.dtype == torch.bool and mask.shape == (10,)
    assert torch.nonzero(mask).flatten().tolist() == [1, 4, 8]
    assert dead_fraction(h) == pytest.approx(0.3)
    # |h| below the 1e-7 threshold counts as dead, including negative values
    h2 = torch.full((50, 2), -5e-8)
    h2[:, 1] = 1e-6
    assert dead_unit_mask(h2).tolist() == [True, False]


def test_dead_fraction_conv_channels(gen):
    h = torch.rand(4, 6, 5, 5, generator=gen) + 0.1
    h[:, 2] = 0.0
    h[:, 5] = 0.0
    assert dead_fraction(h) == pytest.approx(2 / 6)


def test_dead_fraction_nan_and_empty():
    h = torch.rand(10, 4)
    h[3, 1] = float("nan")
    with pytest.warns(LopkitWarning):
        assert math.isnan(dead_fraction(h))
    with pytest.warns(LopkitWarning):
        assert math.isnan(dead_fraction(torch.zeros(0, 4)))
    with pytest.warns(LopkitWarning):
        assert math.isnan(dead_fraction(torch.zeros(5, 0)))
    with pytest.raises(ValueError):
        dead_fraction(torch.zeros(5, 4), sample_fraction=1.5)


# ----------------------------------------------------------------- saturated units


def test_saturated_units_match_bruteforce(gen):
    n, d = 300, 8
    h = torch.rand(n, d, generator=gen) + 0.5
    g = torch.randn(n, d, generator=gen)
    g[:, 2] = 1e-9  # gradient tiny relative to the activations
    g[:, 5] = 1e-9
    g[:4, 5] = 1.0  # ... except on 4/300 > 1 % samples: not saturated
    g[:2, 6] = 1.0
    g[2:, 6] = 0.0  # large on only 2/300 samples (< 1 %): saturated
    mask = saturated_unit_mask(h, g)
    hn, gn = h.numpy().astype(np.float64), g.numpy().astype(np.float64)
    mu = np.maximum(np.abs(hn).mean(0), 1e-8)
    expected = ((np.abs(gn) / mu) < 1e-4).mean(0) > 0.99
    np.testing.assert_array_equal(mask.numpy(), expected)
    assert torch.nonzero(mask).flatten().tolist() == [2, 6]
    assert saturated_fraction(h, g) == pytest.approx(2 / 8)
    # bit-flipping settings: 0.05 ratio, 80 %
    assert saturated_fraction(h, g, ratio_threshold=0.05, sample_fraction=0.8) >= 2 / 8


def test_saturated_shape_mismatch_and_nan_grad(gen):
    with pytest.raises(ValueError, match="same shape"):
        saturated_fraction(torch.ones(4, 3), torch.ones(4, 2))
    g = torch.ones(4, 3)
    g[0, 0] = float("nan")
    with pytest.warns(LopkitWarning, match="gradients"):
        assert math.isnan(saturated_fraction(torch.ones(4, 3), g))


# ----------------------------------------------------------------- derivative-frozen units


def test_frozen_fraction_tanh_large_preactivations(gen):
    z = torch.randn(500, 10, generator=gen)
    z[:, :3] = z[:, :3] * 0.1 + 8.0  # tanh'(8) ~ 4.5e-7: frozen
    z[:, 3] = -z[:, 3].abs() * 0.1 - 6.0  # tanh'(-6) ~ 2.5e-5: frozen
    mask = frozen_unit_mask(z, "tanh")
    assert torch.nonzero(mask).flatten().tolist() == [0, 1, 2, 3]
    assert frozen_fraction(z, nn.Tanh()) == pytest.approx(0.4)
    # independent check with the closed-form derivative
    deriv = 1 - np.tanh(z.numpy().astype(np.float64)) ** 2
    np.testing.assert_array_equal(mask.numpy(), (np.abs(deriv) < 0.01).mean(0) >= 0.99)


def test_frozen_relu_with_negative_bias_and_sample_fraction(gen):
    z = torch.randn(1000, 4, generator=gen)
    z[:, 0] -= 100.0  # always negative: f' = 0
    z[:, 1] = -1.0
    z[:10, 1] = 1.0  # active on exactly 1 %: frozen on exactly 99 % (>= p): frozen
    z[:, 2] = -1.0
    z[:11, 2] = 1.0  # active on 1.1 %: not frozen
    assert frozen_unit_mask(z, "relu").tolist() == [True, True, False, False]
    assert frozen_fraction(z, "relu", sample_fraction=0.5) == pytest.approx(0.75)


def test_frozen_conv_and_nan(gen):
    z = torch.randn(2, 5, 4, 4, generator=gen)
    z[:, 1] = 50.0
    assert frozen_fraction(z, "sigmoid") == pytest.approx(1 / 5)
    z[0, 0, 0, 0] = float("nan")
    with pytest.warns(LopkitWarning):
        assert math.isnan(frozen_fraction(z, "sigmoid"))


# ----------------------------------------------------------------- ReDo dormant units


def test_dormant_scores_match_definition(gen):
    h = torch.randn(100, 6, generator=gen)
    h[:, 0] *= 0.01
    h[:, 3] = 0.0
    scores = dormant_scores(h)
    activity = np.abs(h.numpy().astype(np.float64)).mean(0)
    np.testing.assert_allclose(scores.numpy(), activity / activity.mean(), rtol=1e-5)
    assert scores.mean().item() == pytest.approx(1.0, rel=1e-5)
    # tau = 0: only exactly silent units; tau = 0.1 also the nearly silent one
    assert dormant_unit_mask(h).tolist() == [False, False, False, True, False, False]
    assert dormant_unit_mask(h, tau=0.1).tolist() == [True, False, False, True, False, False]
    assert dormant_fraction(h, tau=0.1) == pytest.approx(2 / 6)
    assert dormant_fraction(h, tau=0.025) == pytest.approx(2 / 6)


def test_dormant_all_zero_layer_and_bad_tau():
    h = torch.zeros(10, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dormant_scores(h).tolist() == [0.0] * 4
        assert dormant_fraction(h) == 1.0
    with pytest.raises(ValueError, match="tau"):
        dormant_fraction(h, tau=-0.1)
    h = torch.ones(10, 4)
    h[2, 2] = float("inf")
    with pytest.warns(LopkitWarning):
        assert math.isnan(dormant_fraction(h))
    with pytest.warns(LopkitWarning):
        assert not dormant_unit_mask(h).any()


def test_masks_do_not_mark_units_on_nan_input():
    h = torch.full((20, 3), float("nan"))
    with pytest.warns(LopkitWarning):
        assert not dead_unit_mask(h).any()
    with pytest.warns(LopkitWarning):
        assert not frozen_unit_mask(h, "tanh").any()
