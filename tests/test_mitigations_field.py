"""Issue-17 methods (proper_adam ... infer, cchain) against hand computations of one step."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from lopkit.benchmarks.base import get_benchmark
from lopkit.configs import ConfigError
from lopkit.mitigations.field import (
    FIRE,
    UPGD,
    CChain,
    HareTortoise,
    InFeR,
    Parseval,
    PeriodicReset,
    PlasticityInjection,
    ProperAdam,
    ReGraMa,
    SelfNormalizedResets,
    Spectral,
    grama_scores,
    grama_weight_magnitude,
    newton_schulz,
    snr_reset_mask,
    upgd_gate,
)
from lopkit.mitigations.registry import build_methods, get_method
from lopkit.runner.execute import execute_run, resolve_methods
from lopkit.runner.store import ResultStore
from lopkit.seeding import derive_seed, stable_key


def mlp(seed: int = 0, sizes=(4, 6, 5, 3), bias: bool = True) -> nn.Sequential:
    """A small ReLU MLP."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def round_trip(state: dict) -> dict:
    """``state`` through torch.save/torch.load, as a checkpoint stores it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# ---------------------------------------------------------------------------------------------- proper Adam


def test_proper_adam_sets_equal_betas_and_two_adam_steps_match_the_hand_computation():
    w = nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    model = nn.Module()
    model.w = w
    optimizer = torch.optim.Adam([w], lr=0.1, eps=1e-8)
    ProperAdam(ProperAdam.Config(beta=0.9)).attach(model, optimizer)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.9)
    grads = [2.0, -1.0]
    for c in grads:  # loss = c * w, so g = c
        optimizer.zero_grad()
        (c * w).sum().backward()
        optimizer.step()
    b, g1, g2 = 0.9, grads[0], grads[1]
    step1 = 0.1 * g1 / (abs(g1) + 1e-8)  # bias-corrected first step is lr * sign(g)
    m = b * (1 - b) * g1 + (1 - b) * g2
    v = b * (1 - b) * g1**2 + (1 - b) * g2**2
    step2 = 0.1 * (m / (1 - b**2)) / (math.sqrt(v / (1 - b**2)) + 1e-8)
    assert w.item() == pytest.approx(0.5 - step1 - step2, rel=1e-12)
    # with the default betas (0.9, 0.999) the second step differs: the test can fail
    m_default = 0.9 * 0.1 * g1 + 0.1 * g2
    v_default = 0.999 * 0.001 * g1**2 + 0.001 * g2**2
    other = 0.1 * (m_default / (1 - 0.81)) / (math.sqrt(v_default / (1 - 0.999**2)) + 1e-8)
    assert abs(other - step2) > 1e-4  # far above the 1e-12 tolerance of the check above


def test_proper_adam_reaches_parameter_groups_added_later_by_other_methods():
    model = mlp(15)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    build_methods("proper_adam:beta=0.95+infer").attach(model, optimizer)
    assert len(optimizer.param_groups) == 2
    assert all(group["betas"] == (0.95, 0.95) for group in optimizer.param_groups)


def test_proper_adam_refuses_an_optimizer_without_betas_and_bad_beta():
    model = mlp()
    with pytest.raises(ConfigError, match="Adam-family optimizer"):
        ProperAdam().attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match=r"beta must be in \[0, 1\)"):
        get_method("proper_adam", {"beta": "1.0"})


# ---------------------------------------------------------------------------------------------- Parseval


def test_parseval_penalty_and_gradient_on_a_2x2_weight_by_hand():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    method = Parseval(Parseval.Config(strength=0.5, scale=1.0))
    term = method.loss_term(model)
    # W W^T - I = [[4, 2], [2, 0]] -> ||.||_F^2 = 24, times 0.5
    assert term.item() == pytest.approx(12.0)
    term.backward()
    # d/dW ||W W^T - I||^2 = 4 (W W^T - I) W = 4 [[4, 10], [2, 4]], times 0.5
    np.testing.assert_allclose(model[0].weight.grad.numpy(), [[8.0, 20.0], [4.0, 8.0]], rtol=1e-6)
    assert model[2].weight.grad is None  # the output head is excluded by default


def test_parseval_scale_and_output_layer_option():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2) * math.sqrt(2.0))  # W W^T = 2 I: zero penalty at s = 2
        model[2].weight.copy_(torch.tensor([[1.0, 1.0]]))  # W W^T = [[2]]
    assert Parseval(Parseval.Config(strength=1.0, scale=2.0)).loss_term(model).item() == pytest.approx(0.0, abs=1e-9)
    with_head = Parseval(Parseval.Config(strength=1.0, scale=1.0, include_output=True)).loss_term(model).item()
    assert with_head == pytest.approx(2 * (2 - 1) ** 2 + (2 - 1) ** 2)
    assert Parseval(Parseval.Config(strength=0.0)).loss_term(model) is None
    with pytest.raises(ConfigError, match="scale must be"):
        get_method("parseval", {"scale": "-1"})


# ---------------------------------------------------------------------------------------------- spectral


def test_spectral_one_power_step_penalty_and_gradient_by_hand():
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    method = Spectral(Spectral.Config(strength=0.1, power=2.0, iterations=1))
    method.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    method.vectors = [torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2)]
    term = method.loss_term(model)
    # v = W^T u / |.| = (3, 1)/sqrt(10); u = W v / |.| = (9, 1)/sqrt(82); sigma = u^T W v = sqrt(8.2)
    sigma = math.sqrt(8.2)
    assert method.last_sigmas[0] == pytest.approx(sigma, rel=1e-6)
    assert term.item() == pytest.approx(0.1 * (sigma**2 - 1) ** 2, rel=1e-6)
    term.backward()
    u = np.array([9.0, 1.0]) / math.sqrt(82)
    v = np.array([3.0, 1.0]) / math.sqrt(10)
    expected = 0.1 * 2 * (sigma**2 - 1) * 2 * sigma * np.outer(u, v)
    np.testing.assert_allclose(model[0].weight.grad.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(method.vectors[0].numpy(), u, rtol=1e-6)  # the vector persists


def test_spectral_power_iteration_tracks_the_true_top_singular_value():
    model = mlp(1)
    method = Spectral(Spectral.Config(strength=1.0))
    method.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(60):
        method.sigmas(model)
    true = [torch.linalg.matrix_norm(m.weight.detach(), ord=2).item() for m in model if isinstance(m, nn.Linear)]
    np.testing.assert_allclose(method.last_sigmas, true, rtol=1e-4)


def test_spectral_state_round_trip_and_seeded_vectors():
    model = mlp(2)
    a, b = Spectral(), Spectral()
    a.seed_from_run(5)
    b.seed_from_run(5)
    a.attach(model, None)
    b.attach(model, None)
    assert all(torch.equal(x, y) for x, y in zip(a.vectors, b.vectors))
    a.sigmas(model)
    c = Spectral()
    c.load_state_dict(round_trip(a.state_dict()))
    assert all(torch.equal(x, y) for x, y in zip(a.vectors, c.vectors))
    assert [s.item() for s in a.sigmas(model)] == [s.item() for s in c.sigmas(model)]


# ---------------------------------------------------------------------------------------------- resets


def test_head_reset_redraws_only_the_head_and_adam_restarts_it_fresh():
    model = mlp(3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    method = PeriodicReset(PeriodicReset.Config(scope="head", every=2))
    method.seed_from_run(4)
    method.attach(model, optimizer)
    x = torch.randn(8, 4)

    def step(i: int) -> None:
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
        method.after_step(model, optimizer, i)

    step(0)
    first = model[0].weight.detach().clone()
    head_before = model[4].weight.detach().clone()
    step(1)  # second step: the head is reset after it
    assert method.resets == 1 and method.total_replaced == 3
    head = model[4].weight.detach()
    assert not torch.allclose(head, head_before, atol=1e-2)
    assert head.abs().max() <= 1 / math.sqrt(5)  # PyTorch's default law U(+-1/sqrt(fan_in))
    assert model[4].weight not in optimizer.state and model[4].bias not in optimizer.state
    assert model[0].weight in optimizer.state and int(optimizer.state[model[0].weight]["step"]) == 2
    assert not torch.equal(model[0].weight.detach(), first)  # the body kept training, it was not re-drawn
    # next step: fresh Adam state on the head -> each entry moves by exactly lr (bias-corrected first step)
    reset_head = model[4].weight.detach().clone()
    optimizer.zero_grad()
    model(x).pow(2).mean().backward()
    live = model[4].weight.grad != 0  # columns reading a dead ReLU unit get no gradient
    assert int(live.sum()) >= 3
    optimizer.step()
    moved = (model[4].weight.detach() - reset_head).abs()
    np.testing.assert_allclose(moved[live].numpy(), 0.01, rtol=1e-3)
    # the draw comes from the run's seed
    generator = torch.Generator()
    generator.manual_seed(derive_seed(4, stable_key("reset")))
    expected = (torch.rand((3, 5), generator=generator, dtype=torch.float64) * 2 - 1) / math.sqrt(5)
    np.testing.assert_allclose(reset_head.numpy(), expected.float().numpy(), rtol=1e-6)


def test_full_and_layer_scopes_and_task_schedule():
    model = mlp(5)
    before = [p.detach().clone() for p in model.parameters()]
    method = PeriodicReset(PeriodicReset.Config(scope="layers", layers=2, every=0, at_task_start=True))
    method.attach(model, None)
    method.on_task_start(model, None, 0)
    assert method.resets == 0
    method.on_task_start(model, None, 1)
    after = [p.detach() for p in model.parameters()]
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert all(not torch.equal(a, b) for a, b in zip(after[2:], before[2:]))
    full = PeriodicReset(PeriodicReset.Config(scope="full", every=1))
    full.attach(model, None)
    kept = [p.detach().clone() for p in model.parameters()]
    full.after_step(model, None, 0)
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), kept))
    with pytest.raises(ConfigError, match="needs 4 Linear/Conv layers"):
        PeriodicReset(PeriodicReset.Config(scope="layers", layers=4)).attach(mlp(), None)
    with pytest.raises(ConfigError, match="must be one of full, layers, head"):
        get_method("reset", {"scope": "body"})


# ---------------------------------------------------------------------------------------------- Hare & Tortoise


def test_hare_tortoise_ema_and_reset_by_hand():
    w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    model = nn.Module()
    model.w = w
    optimizer = torch.optim.SGD([w], lr=0.5)
    method = HareTortoise(HareTortoise.Config(tau=0.9, every=2))
    method.attach(model, optimizer)
    hare, tortoise = 1.0, 1.0
    for i in range(2):  # loss = w^2 -> g = 2w, SGD: w <- w - 0.5 * 2w = 0
        optimizer.zero_grad()
        (w**2).sum().backward()
        optimizer.step()
        hare = hare - 0.5 * 2 * hare
        tortoise = 0.9 * tortoise + 0.1 * hare
        method.after_step(model, optimizer, i)
    assert method.tortoise["w"].item() == pytest.approx(tortoise)
    assert tortoise == pytest.approx(0.81)  # 0.9 * (0.9*1 + 0.1*0) + 0.1*0
    assert w.item() == pytest.approx(tortoise) and method.resets == 1  # the hare became the tortoise


def test_hare_tortoise_clears_the_optimizer_state_and_round_trips():
    model = mlp(6)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    method = HareTortoise(HareTortoise.Config(every=1))
    method.attach(model, optimizer)
    optimizer.zero_grad()
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    method.after_step(model, optimizer, 0)
    assert len(optimizer.state) == 0
    other = HareTortoise()
    other.load_state_dict(round_trip(method.state_dict()))
    assert all(torch.equal(other.tortoise[k], v) for k, v in method.tortoise.items())
    with pytest.raises(ConfigError, match=r"tau must be in \[0, 1\)"):
        get_method("hare_tortoise", {"tau": "1"})


# ---------------------------------------------------------------------------------------------- UPGD


def two_weights(values) -> tuple[nn.Module, nn.Parameter]:
    """A module holding one 2-entry parameter ``w``."""
    model = nn.Module()
    model.w = nn.Parameter(torch.tensor(values, dtype=torch.float64))
    return model, model.w


def sigmoid(x: float) -> float:
    """The logistic function."""
    return 1.0 / (1.0 + math.exp(-x))


def test_upgd_update_on_two_parameters_by_hand():
    model, w = two_weights([1.0, -2.0])
    optimizer = torch.optim.SGD([w], lr=0.1)
    method = UPGD(UPGD.Config(sigma=0.0, beta_utility=0.5))
    method.attach(model, optimizer)
    a = torch.tensor([2.0, 1.0], dtype=torch.float64)
    # step 1: g = a; utility -g*w = (-2, 2); bias-corrected trace = (-2, 2); global max 2; gate sigmoid(-1), sigmoid(1)
    optimizer.zero_grad()
    (a * w).sum().backward()
    method.before_step(model, optimizer, 0)
    optimizer.step()
    w1 = [1.0 - 0.1 * 2.0 * (1 - sigmoid(-1.0)), -2.0 - 0.1 * 1.0 * (1 - sigmoid(1.0))]
    np.testing.assert_allclose(w.detach().numpy(), w1, rtol=1e-12)
    # step 2: trace = 0.5*(1-0.5)*(-2, 2) ... = 0.5*prev + 0.5*(-g*w1), bias correction 1 - 0.5^2
    optimizer.zero_grad()
    (a * w).sum().backward()
    method.before_step(model, optimizer, 1)
    optimizer.step()
    trace = [0.5 * 0.5 * u + 0.5 * (-g * x) for u, g, x in zip([-2.0, 2.0], [2.0, 1.0], w1)]
    corrected = [u / (1 - 0.25) for u in trace]
    top = max(corrected)
    w2 = [x - 0.1 * g * (1 - sigmoid(u / top)) for x, g, u in zip(w1, [2.0, 1.0], corrected)]
    np.testing.assert_allclose(w.detach().numpy(), w2, rtol=1e-12)


def test_upgd_noise_is_gated_and_drawn_from_the_run_seed():
    model, w = two_weights([1.0, -2.0])
    optimizer = torch.optim.SGD([w], lr=1.0)
    method = UPGD(UPGD.Config(sigma=0.3, beta_utility=0.9, weight_decay=0.01))
    method.seed_from_run(9)
    method.attach(model, optimizer)
    optimizer.zero_grad()
    (torch.tensor([2.0, 1.0], dtype=torch.float64) * w).sum().backward()
    method.before_step(model, optimizer, 0)
    generator = torch.Generator()
    generator.manual_seed(derive_seed(9, stable_key("upgd")))
    xi = torch.randn(2, generator=generator, dtype=torch.float64) * 0.3
    gates = torch.tensor([sigmoid(-1.0), sigmoid(1.0)], dtype=torch.float64)
    weights = torch.tensor([1.0, -2.0], dtype=torch.float64)
    expected = (torch.tensor([2.0, 1.0], dtype=torch.float64) + xi) * (1 - gates) + 0.01 * weights
    np.testing.assert_allclose(w.grad.numpy(), expected.numpy(), rtol=1e-12)


def test_upgd_gate_global_max_and_state_round_trip():
    gates = upgd_gate([torch.tensor([1.0, -4.0]), torch.tensor([2.0])])
    np.testing.assert_allclose(torch.cat(gates).numpy(), [sigmoid(0.5), sigmoid(-2.0), sigmoid(1.0)], rtol=1e-6)
    model = mlp(7)
    method = UPGD()
    method.attach(model, None)
    model(torch.randn(3, 4)).sum().backward()
    method.before_step(model, None, 0)
    other = UPGD()
    other.attach(mlp(7), None)
    other.load_state_dict(round_trip(method.state_dict()))
    assert other.t == 1 and all(torch.equal(other.utilities[k], v) for k, v in method.utilities.items())
    with pytest.raises(ConfigError, match="sigma must be"):
        get_method("upgd", {"sigma": "-0.1"})


# ---------------------------------------------------------------------------------------------- InFeR


def test_infer_loss_and_one_sgd_step_of_its_heads_by_hand():
    model = mlp(8, sizes=(3, 4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    method = InFeR(InFeR.Config(heads=2, strength=0.3, target_scale=2.0))
    method.seed_from_run(1)
    method.attach(model, optimizer)
    assert method.head.weight in optimizer.param_groups[-1]["params"]  # the heads train with the model
    w1_0, b1_0 = model[0].weight.detach().double().numpy().copy(), model[0].bias.detach().double().numpy().copy()
    h_w, h_b = method.head.weight.detach().double().numpy().copy(), method.head.bias.detach().double().numpy().copy()
    with torch.no_grad():
        model[0].weight.add_(0.2)  # the live features move away from the initial ones
    x = torch.randn(5, 3)
    model(x)  # loss_term uses the batch of this training forward
    term = method.loss_term(model)
    xn = x.double().numpy()
    phi0 = np.maximum(xn @ w1_0.T + b1_0, 0)
    phi = np.maximum(xn @ (w1_0 + 0.2).T + b1_0, 0)
    target = 2.0 * (phi0 @ h_w.T + h_b)
    pred = phi @ h_w.T + h_b
    assert term.item() == pytest.approx(0.3 * ((pred - target) ** 2).mean(), rel=1e-5)
    optimizer.zero_grad()
    term.backward()
    optimizer.step()
    grad_w = 0.3 * 2 * (pred - target).T @ phi / pred.size  # d/dH of strength * mean((H phi + b - t)^2)
    np.testing.assert_allclose(method.head.weight.detach().numpy(), h_w - 0.5 * grad_w, rtol=1e-4, atol=1e-6)
    assert method.initial_head.weight.detach().double().numpy() == pytest.approx(h_w)  # the target head is frozen


def test_infer_is_zero_at_attach_with_unit_scale_and_ignores_eval_forwards():
    model = mlp(9)
    method = InFeR()
    method.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model.eval()
    model(torch.randn(4, 4))
    assert method.loss_term(model) is None  # no training forward yet
    model.train()
    model(torch.randn(4, 4))
    assert method.loss_term(model).item() == pytest.approx(0.0, abs=1e-12)
    other = InFeR()
    other.attach(mlp(10), None)
    other.load_state_dict(round_trip(method.state_dict()))
    assert torch.equal(other.head.weight, method.head.weight)
    assert all(torch.equal(a, b) for a, b in zip(other.frozen.parameters(), method.frozen.parameters()))
    with pytest.raises(ConfigError, match="heads must be"):
        get_method("infer", {"heads": "0"})


# ---------------------------------------------------------------------------------------------- C-CHAIN


def test_cchain_churn_of_the_last_update_and_its_gradient_by_hand():
    model = nn.Sequential(nn.Linear(2, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method = CChain(CChain.Config(strength=0.5))
    method.attach(model, optimizer)
    x0, x1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, -1.0], [0.0, 3.0]])
    loss = model(x0).sum()
    assert method.loss_term(model) is None  # no update yet, so no churn
    optimizer.zero_grad()
    loss.backward()
    method.before_step(model, optimizer, 0)
    optimizer.step()  # d/dw sum(w.x + b) = x0, d/db = 1: w moves by -0.1*x0, b by -0.1
    model(x1)  # the next batch is the reference batch
    term = method.loss_term(model)
    delta_w, delta_b = -0.1 * np.array([1.0, 2.0]), -0.1
    diffs = x1.numpy() @ delta_w + delta_b  # f_theta(x) - f_theta-(x) per reference sample
    assert term.item() == pytest.approx(0.5 * np.mean(diffs**2), rel=1e-5)
    optimizer.zero_grad()
    term.backward()
    expected_grad = 0.5 * 2 * (diffs[:, None] * x1.numpy()).mean(0)
    np.testing.assert_allclose(model[0].weight.grad.numpy()[0], expected_grad, rtol=1e-5)
    assert model[0].bias.grad.item() == pytest.approx(0.5 * 2 * diffs.mean(), rel=1e-5)
    method.on_task_start(model, optimizer, 1)
    model(x1)
    assert method.loss_term(model) is None  # a task change is not churn
    other = CChain()
    method.before_step(model, optimizer, 1)
    other.load_state_dict(round_trip(method.state_dict()))
    assert all(torch.equal(other.previous[k], v) for k, v in method.previous.items())


def test_cchain_reference_forwards_are_invisible_to_other_methods_hooks():
    model = mlp(11)
    seen = []
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    method = CChain()
    method.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model(torch.randn(3, 4))
    method.before_step(model, None, 0)
    model(torch.randn(3, 4))
    assert method.loss_term(model) is not None
    assert len(seen) == 2  # only the two training forwards
    with pytest.raises(ConfigError, match="strength must be"):
        get_method("c-chain", {"strength": "-1"})


# ---------------------------------------------------------------------------------------------- plasticity injection


def test_injection_keeps_the_function_and_moves_learning_to_the_new_head():
    model = mlp(12)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method = PlasticityInjection(PlasticityInjection.Config(when="step", at=2))
    method.seed_from_run(3)
    method.attach(model, optimizer)
    x = torch.randn(6, 4)
    before = model(x).detach()
    method.after_step(model, optimizer, 0)
    assert not method.injected
    method.after_step(model, optimizer, 1)
    assert method.injected
    assert torch.equal(model(x).detach(), before)  # h_new - h_new0 is exactly 0 at injection
    generator = torch.Generator()
    generator.manual_seed(derive_seed(3, stable_key("injection")))
    expected = (torch.rand((3, 5), generator=generator, dtype=torch.float64) * 2 - 1) / math.sqrt(5)
    np.testing.assert_allclose(method.new.weight.detach().numpy(), expected.float().numpy(), rtol=1e-6)
    head_before, new_before = model[4].weight.detach().clone(), method.new.weight.detach().clone()
    features = model[:4](x).detach()
    optimizer.zero_grad()
    model(x).sum().backward()
    optimizer.step()
    assert model[4].weight.grad is None and torch.equal(model[4].weight, head_before)  # the old head is frozen
    # d sum(out) / d W_new = sum over the batch of the features, for every output row
    np.testing.assert_allclose(method.new.weight.detach().numpy(),
                               (new_before - 0.1 * features.sum(0).expand(3, 5)).numpy(), rtol=1e-5, atol=1e-6)
    other = PlasticityInjection()
    other_model = mlp(13)
    other.attach(other_model, torch.optim.SGD(other_model.parameters(), lr=0.1))
    other.load_state_dict(round_trip(method.state_dict()))
    assert other.injected and not other_model[4].weight.requires_grad and other.new.weight.requires_grad
    assert torch.equal(other.new.weight, method.new.weight)


# ---------------------------------------------------------------------------------------------- FIRE


def test_newton_schulz_one_step_by_hand_and_its_limit_is_the_polar_factor():
    one = newton_schulz(torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64), 1)
    # X0 = diag(0.6, 0.8); 1.5x - 0.5x^3 = 0.792, 0.944
    np.testing.assert_allclose(one.numpy(), np.diag([0.792, 0.944]), rtol=1e-12)
    torch.manual_seed(0)
    w = torch.randn(5, 3, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(newton_schulz(w, 60).numpy(), (u @ vh).numpy(), atol=1e-8)


def test_fire_orthogonalises_hidden_layers_at_task_starts_and_clears_their_optimizer_state():
    model = mlp(14)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    optimizer.zero_grad()
    model(torch.randn(4, 4)).sum().backward()
    optimizer.step()
    head = model[4].weight.detach().clone()
    method = FIRE(FIRE.Config(scale=2.0, iterations=60))
    method.attach(model, optimizer)
    method.on_task_start(model, optimizer, 0)
    assert method.applications == 0
    method.on_task_start(model, optimizer, 1)
    w0, w1 = model[0].weight.detach().double(), model[2].weight.detach().double()
    np.testing.assert_allclose((w0.T @ w0).numpy(), 4.0 * np.eye(4), atol=1e-5)  # 6x4: orthogonal columns, scale 2
    np.testing.assert_allclose((w1 @ w1.T).numpy(), 4.0 * np.eye(5), atol=1e-5)  # 5x6: orthogonal rows
    assert torch.equal(model[4].weight, head)
    assert model[0].weight not in optimizer.state and model[4].weight in optimizer.state
    with pytest.raises(ConfigError, match="scale must be"):
        get_method("fire", {"scale": "0"})


# ---------------------------------------------------------------------------------------------- ReGraMa


@pytest.mark.parametrize("gradient", ["weights", "pre_activation", "post_activation"])
def test_regrama_scores_units_by_gradient_magnitude_by_hand_and_resets_them(gradient):
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.copy_(torch.tensor([1.0, 1.0]))  # both units active (h > 0) on the inputs below
        model[2].weight.copy_(torch.tensor([[1.0, 0.01]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    method = ReGraMa(ReGraMa.Config(every=1, window_steps=1, tau=0.025, gradient=gradient))
    method.attach(model, optimizer)
    x = torch.tensor([[0.5, 2.0], [1.0, 3.0]])
    optimizer.zero_grad()
    model(x).sum().backward()
    optimizer.step()
    if gradient != "weights":  # the hooks saw this step's gradients; weights are read in after_step
        # dL/dz = dL/dh = W2 for every sample (both units active): |g| = (1, 0.01), mean 0.505
        np.testing.assert_allclose(method.scores(0).numpy(), [1 / 0.505, 0.01 / 0.505])
    # dL/dW1 row i = w2_i * sum_x x = w2_i * (1.5, 5): mean |.| = (3.25, 0.0325); scores (1.98, 0.0198) again
    assert method.dormant_mask(0).tolist() == ([False, False] if gradient == "weights" else [False, True])
    # ReDo, on activations (h = x + 1: large for unit 1), would keep it
    mean_h = (x + 1).mean(0)
    assert float(mean_h[1] / mean_h.mean()) > 0.025
    method.after_step(model, optimizer, 0)
    assert method.total_replaced == 1
    assert model[2].weight[0, 1].item() == 0.0 and model[2].weight[0, 0].item() == 1.0  # outgoing zeroed
    assert model[0].weight[1].tolist() != [0.0, 1.0] and model[0].weight[0].tolist() == [1.0, 0.0]


def dead_unit_net() -> nn.Sequential:
    """2-3-1 ReLU net: units 0 and 1 fire on every input below, unit 2 (bias -100) never does."""
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model[0].bias.copy_(torch.tensor([1.0, 1.0, -100.0]))
        model[2].weight.copy_(torch.tensor([[1.0, 0.5, 2.0]]))
    return model


def test_regrama_weight_gradient_score_by_hand_after_one_step():
    model = dead_unit_net()
    x = torch.tensor([[0.5, 2.0], [1.0, 3.0]])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method = ReGraMa(ReGraMa.Config(every=2, window_steps=2))  # the paper's tau = 0.01, incoming-weight gradients
    method.attach(model, optimizer)
    optimizer.zero_grad()
    model(x).sum().backward()
    # L = sum of outputs: dL/dW1[i, j] = w2_i * 1[z_i > 0] * sum_x x_j = w2_i * 1[z_i > 0] * (1.5, 5.0)
    # per-unit mean |dL/dW1[i, :]| = (3.25, 1.625, 0); layer mean 1.625; GraMa scores (2, 1, 0)
    np.testing.assert_allclose(grama_weight_magnitude(model[0].weight.grad).numpy(), [3.25, 1.625, 0.0])
    optimizer.step()
    method.after_step(model, optimizer, 0)  # step 0 of a 2-step window: collected, not checked yet
    np.testing.assert_allclose(method.scores(0).numpy(), [2.0, 1.0, 0.0])
    assert method.total_replaced == 0
    np.testing.assert_allclose(grama_scores(torch.tensor([3.0, 0.0, 0.0])).numpy(), [3.0, 0.0, 0.0])


@pytest.mark.parametrize("gradient", ["weights", "pre_activation"])
def test_regrama_resets_a_unit_with_zero_gradient_and_keeps_the_live_ones(gradient):
    model = dead_unit_net()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    method = ReGraMa(ReGraMa.Config(every=1, tau=0.01, gradient=gradient))
    method.seed_from_run(3)
    method.attach(model, optimizer)
    optimizer.zero_grad()
    model(torch.tensor([[0.5, 2.0], [1.0, 3.0]])).sum().backward()
    optimizer.step()
    method.after_step(model, optimizer, 0)
    assert method.total_replaced == 1 and method.replaced_per_group == [1]
    w1, b1, w2, _ = [p.detach() for p in model.parameters()]
    assert torch.equal(w1[:2], before[0][:2]) and torch.equal(b1[:2], before[1][:2])  # live units untouched
    assert not torch.equal(w1[2], before[0][2]) and b1[2].item() == 0.0  # the dead unit: fresh weights, zero bias
    assert w2[0].tolist() == [1.0, 0.5, 0.0]  # its outgoing weight zeroed, the others kept
    assert float(optimizer.state[model[0].weight]["exp_avg_sq"][2].abs().sum()) == 0.0


def test_regrama_reading_dl_dh_misses_a_dead_relu_unit():
    """GraMa's Eq. 2 read literally (post-activation dL/dh) cannot see a dead ReLU unit: dL/dh = w2 regardless."""
    model = dead_unit_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    method = ReGraMa(ReGraMa.Config(every=1, tau=0.01, gradient="post_activation"))
    method.attach(model, optimizer)
    optimizer.zero_grad()
    model(torch.tensor([[0.5, 2.0], [1.0, 3.0]])).sum().backward()
    optimizer.step()
    np.testing.assert_allclose(method.scores(0).numpy(), np.array([1.0, 0.5, 2.0]) / (3.5 / 3))
    method.after_step(model, optimizer, 0)
    assert method.total_replaced == 0
    with pytest.raises(ConfigError, match="gradient must be one of"):
        get_method("regrama", {"gradient": "inputs"})


# ---------------------------------------------------------------------------------------------- SNR


def test_snr_test_by_hand():
    fires = torch.tensor([50.0, 0.0, 900.0, 10.0, 50.0], dtype=torch.float64)
    samples = torch.tensor([100.0, 100.0, 1000.0, 50.0, 100.0], dtype=torch.float64)
    silent = torch.tensor([14.0, 100.0, 3.0, 50.0, 13.0], dtype=torch.float64)
    mask = snr_reset_mask(fires, samples, silent, threshold=1e-4, maturity=100)
    # p = 0.5: 0.5^14 = 6.1e-5 < 1e-4 (reset), 0.5^13 = 1.2e-4 (kept); never fired and mature: reset;
    # p = 0.9: 0.1^3 = 1e-3 (kept); 50 samples < maturity 100: not tested
    assert mask.tolist() == [True, True, False, False, False]


def test_snr_counts_silent_runs_and_resets_a_dead_unit():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.copy_(torch.tensor([0.0, -100.0]))  # unit 1 never fires
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    method = SelfNormalizedResets(SelfNormalizedResets.Config(maturity=4, threshold=1e-3))
    method.seed_from_run(2)
    method.attach(model, optimizer)
    model(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]]))  # unit 0 fires on sample 1 only
    state = method.stats[0]
    assert state["silent"].tolist() == [2.0, 3.0] and state["fires"].tolist() == [1.0, 0.0]
    method.after_step(model, optimizer, 0)  # 3 samples < maturity 4: nothing tested
    assert method.total_replaced == 0
    model(torch.tensor([[-1.0, 0.0]]))
    assert state["silent"].tolist() == [3.0, 4.0] and state["samples"].tolist() == [4.0, 4.0]
    method.after_step(model, optimizer, 1)  # unit 0: p = 1/4, 0.75^3 = 0.42 (kept); unit 1 never fired: reset
    assert method.total_replaced == 1
    assert model[0].bias[1].item() == 0.0 and model[2].weight[0, 1].item() == 0.0
    assert method.stats[0]["samples"].tolist() == [4.0, 0.0]
    with pytest.raises(ConfigError, match="threshold must be"):
        get_method("snr", {"threshold": "1"})


# ---------------------------------------------------------------------------------------------- integration

FIELD_SPECS = [
    "proper_adam",
    "parseval:strength=0.01",
    "spectral:strength=0.01",
    "reset:scope=layers:layers=2:every=7",
    "hare_tortoise:every=7:tau=0.9",
    "upgd:sigma=0.01",
    "infer:strength=1.0",
    "cchain:strength=1.0",
    "injection:when=step:at=7",
    "fire",
    "regrama:every=5:window_steps=5:tau=0.5",
    "regrama:every=5:window_steps=3:tau=0.5:gradient=pre_activation",
    "snr:maturity=64:threshold=0.01",
    "reset:every=9+upgd+spectral+infer+cchain",
]
SHORT_CLASS_SPLIT = {"num_tasks": 2, "steps_per_task": 12}


def sorted_rows(frame) -> list[tuple]:
    """Rows of a metrics frame as sorted tuples."""
    return sorted(zip(frame["step"], frame["task"], frame["layer"], frame["metric"], frame["value"]))


@pytest.mark.parametrize("spec", FIELD_SPECS)
def test_benchmark_run_with_the_method_resumes_exactly(tmp_path, spec):
    cls = get_benchmark("class_split")
    config = cls.make_config("smoke", SHORT_CLASS_SPLIT)
    with ResultStore(tmp_path / "whole") as whole:
        execute_run(whole, cls, config, 1, [spec], checkpoint_every=5, progress=False)
        expected = sorted_rows(whole.metrics())
    with ResultStore(tmp_path / "split") as split:
        paused = execute_run(split, cls, config, 1, [spec], checkpoint_every=5, progress=False, stop_after_steps=11)
        assert paused.status == "paused"
        result = execute_run(split, cls, config, 1, [spec], checkpoint_every=5, progress=False)
        assert (result.status, result.resumed_from) == ("finished", 11)
        got = sorted_rows(split.metrics())
    assert len(got) == len(expected) > 0
    assert got == expected


def test_methods_are_registered_composable_and_change_training():
    spec = "proper_adam+parseval+spectral+reset+hare_tortoise+upgd+infer+cchain+injection+fire"
    names = [type(m).__name__ for m in resolve_methods(spec)]
    assert names == ["ProperAdam", "Parseval", "Spectral", "PeriodicReset", "HareTortoise", "UPGD", "InFeR", "CChain",
                     "PlasticityInjection", "FIRE"]
    assert type(build_methods("re_grama")) is ReGraMa
    assert type(build_methods("self_normalized_resets")) is SelfNormalizedResets
    assert type(build_methods("hat")) is HareTortoise
    cls = get_benchmark("class_split")
    config = cls.make_config("smoke", SHORT_CLASS_SPLIT)
    baseline = cls(config, 0, [])
    base_rows = baseline.run(baseline.total_steps)
    for spec in ["parseval:strength=0.1", "upgd:sigma=0.1", "reset:every=5", "infer:strength=10", "cchain:strength=10",
                 "injection:when=step:at=3", "fire"]:
        bench = cls(config, 0, resolve_methods(spec))
        rows = bench.run(bench.total_steps)
        assert [r["value"] for r in rows if r["metric"] == "loss"] != [
            r["value"] for r in base_rows if r["metric"] == "loss"
        ], spec
