"""Tests of the l2 and l2init loss-term regularisers against direct numpy computations."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from lopkit.configs import ConfigError, build_config
from lopkit.mitigations.registry import build_methods, get_method
from lopkit.mitigations.regularizers import L2, L2Init, regularized_parameters


def small_model(seed: int = 0) -> nn.Sequential:
    """A tiny MLP with a LayerNorm, so bias/norm exclusions have something to exclude."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.ReLU(), nn.Linear(7, 3))


def numpy_params(model: nn.Module) -> dict[str, np.ndarray]:
    """Every parameter as a float64 numpy array, by name."""
    return {name: p.detach().double().numpy().copy() for name, p in model.named_parameters()}


def sgd(model: nn.Module, lr: float) -> torch.optim.SGD:
    """Plain SGD over the model."""
    return torch.optim.SGD(model.parameters(), lr=lr)


# ---------------------------------------------------------------------------------------------- l2


def test_l2_loss_equals_direct_sum_of_squares():
    model = small_model()
    method = L2(L2.Config(strength=3e-3))
    method.attach(model, sgd(model, 0.1))
    expected = 3e-3 * sum(float((a**2).sum()) for a in numpy_params(model).values())
    assert method.loss_term(model).item() == pytest.approx(expected, rel=1e-6)


def test_l2_exclusions_drop_biases_and_norm_parameters():
    model = small_model()
    params = numpy_params(model)
    no_bias = L2(L2.Config(strength=1.0, include_bias=False))
    kept = {"0.weight", "3.weight", "1.weight", "1.bias"}  # LayerNorm parameters are not "biases of weight layers"
    expected = sum(float((a**2).sum()) for n, a in params.items() if n in kept)
    assert no_bias.loss_term(model).item() == pytest.approx(expected, rel=1e-6)
    no_norm = L2(L2.Config(strength=1.0, include_norm=False))
    expected = sum(float((a**2).sum()) for n, a in params.items() if not n.startswith("1."))
    assert no_norm.loss_term(model).item() == pytest.approx(expected, rel=1e-6)
    names = [n for n, _ in regularized_parameters(model, include_bias=False, include_norm=False)]
    assert names == ["0.weight", "3.weight"]


def test_l2_gradient_pushes_every_weight_toward_zero():
    model = small_model()
    before = numpy_params(model)
    method = L2(L2.Config(strength=0.05))
    optimizer = sgd(model, lr=0.5)
    method.attach(model, optimizer)
    optimizer.zero_grad()
    method.loss_term(model).backward()
    optimizer.step()
    after = numpy_params(model)
    for name, old in before.items():
        # d/dp lambda*p^2 = 2*lambda*p, so one SGD step multiplies p by (1 - 2*lr*lambda) = 0.95
        np.testing.assert_allclose(after[name], old * (1 - 2 * 0.5 * 0.05), rtol=1e-5, atol=1e-7)


def test_l2_zero_strength_adds_nothing():
    model = small_model()
    assert L2(L2.Config(strength=0.0)).loss_term(model) is None


# ---------------------------------------------------------------------------------------------- l2init


def test_l2init_is_zero_at_init_and_equals_direct_distance_after_a_change():
    model = small_model()
    method = L2Init(L2Init.Config(strength=0.2))
    method.attach(model, sgd(model, 0.1))
    initial = numpy_params(model)
    assert method.loss_term(model).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    now = numpy_params(model)
    expected = 0.2 * sum(float(((now[n] - initial[n]) ** 2).sum()) for n in now)
    assert method.loss_term(model).item() == pytest.approx(expected, rel=1e-6)


def test_l2init_gradient_pulls_toward_initial_parameters_not_zero():
    model = small_model()
    method = L2Init(L2Init.Config(strength=0.1))
    optimizer = sgd(model, lr=1.0)
    method.attach(model, optimizer)
    initial = numpy_params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    moved = numpy_params(model)
    optimizer.zero_grad()
    method.loss_term(model).backward()
    optimizer.step()
    after = numpy_params(model)
    for name in initial:
        # p <- p - lr * 2 * lambda * (p - p0): the distance to p0 shrinks by (1 - 0.2), the point p0 is the target
        np.testing.assert_allclose(
            after[name] - initial[name], 0.8 * (moved[name] - initial[name]), rtol=1e-5, atol=1e-6
        )
    # plain L2 would have pulled toward zero instead: check the two differ on a weight far from zero
    assert not np.allclose(after["0.weight"], 0.8 * moved["0.weight"], atol=1e-3)


def test_l2init_needs_attach_first():
    with pytest.raises(RuntimeError, match="attach"):
        L2Init().loss_term(small_model())


def test_l2init_state_dict_round_trip_restores_the_anchor():
    model = small_model(seed=0)
    method = L2Init(L2Init.Config(strength=0.3))
    method.attach(model, sgd(model, 0.1))
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    # a resumed run re-attaches to a freshly built (different) model, then loads the saved state
    resumed_model = small_model(seed=1)
    resumed_model.load_state_dict(model.state_dict())
    resumed = L2Init(L2Init.Config(strength=0.3))
    resumed.attach(resumed_model, sgd(resumed_model, 0.1))
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.loss_term(resumed_model).item() == pytest.approx(method.loss_term(model).item(), rel=1e-7)
    assert method.loss_term(model).item() > 0


def test_l2init_trains_a_few_steps_in_a_plain_loop():
    torch.manual_seed(0)
    model = small_model()
    method = get_method("l2init", {"strength": "1e-2"})
    optimizer = sgd(model, lr=0.05)
    method.attach(model, optimizer)
    x, y = torch.randn(32, 5), torch.randn(32, 3)
    losses = []
    for step in range(20):
        loss = nn.functional.mse_loss(model(x), y) + method.loss_term(model)
        optimizer.zero_grad()
        loss.backward()
        method.before_step(model, optimizer, step)
        optimizer.step()
        method.after_step(model, optimizer, step)
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("cls", [L2, L2Init])
@pytest.mark.parametrize("strength", [-1e-3, float("nan"), float("inf")])
def test_bad_strength_is_a_config_error(cls, strength):
    with pytest.raises(ConfigError, match="strength"):
        build_config(cls.Config, {"strength": strength})
    with pytest.raises(ConfigError):
        cls(cls.Config(strength=strength))


def test_registry_builds_and_rejects_unknown_keys():
    method = build_methods("l2:strength=1e-3:include_bias=false,l2init")
    assert method.name == "l2+l2init"
    with pytest.raises(ConfigError, match="unknown config key"):
        get_method("l2", {"lambda": "1"})
