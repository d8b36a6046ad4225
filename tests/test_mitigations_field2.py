"""Issue-17 methods DASH, SWR, TRAC and CCBP against hand computations of one step."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from scipy.special import erfi
from torch import nn

from lopkit.benchmarks.base import get_benchmark
from lopkit.configs import ConfigError
from lopkit.mitigations.field2 import (
    CCBP,
    DASH,
    SWR,
    TRAC,
    LeakyReLUSwap,
    OptimizerReset,
    ccbp_reset_proportion,
    dash_shrink_factors,
    swr_select,
)
from lopkit.mitigations.layers import _sample, _weight_scale, activation_gain
from lopkit.mitigations.registry import build_methods, get_method
from lopkit.runner.execute import execute_run, resolve_methods
from lopkit.runner.store import ResultStore


def round_trip(state: dict) -> dict:
    """``state`` through torch.save/torch.load, as a checkpoint stores it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def close(actual, expected, rel: float = 1e-6) -> None:
    """Element-wise comparison of nested lists or tensors (relative tolerance ``rel``, float32 round-off)."""
    def array(x):
        return x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=float)

    np.testing.assert_allclose(array(actual), array(expected), rtol=rel, atol=1e-12)


def set_grads(model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        p.grad = grads[name].clone() if name in grads else None


# ---------------------------------------------------------------------------------------------- DASH


def test_dash_factors_by_hand_for_rows_kernels_and_bias():
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    neg_g = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-3.0, -4.0]])
    # cos: 1 (aligned), 0 (orthogonal) -> lam, -1 (opposed) -> lam
    close(dash_shrink_factors(w, neg_g, 0.3), [1.0, 0.3, 0.3])
    bias, neg_gb = torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])
    assert float(dash_shrink_factors(bias, neg_gb, 0.3)) == pytest.approx(1 / math.sqrt(2))
    kernels = torch.zeros(1, 2, 2, 2)
    kernels[0, 0] = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    kernels[0, 1] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    neg_gk = torch.zeros(1, 2, 2, 2)
    neg_gk[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    neg_gk[0, 1] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    close(dash_shrink_factors(kernels, neg_gk, 0.1), [[1 / math.sqrt(2), 1.0]])


def test_dash_shrinks_at_a_task_start_with_the_ema_of_collected_gradients():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model[0].bias.copy_(torch.tensor([1.0, 1.0]))
        model[2].weight.copy_(torch.tensor([[2.0, 2.0]]))
    method = DASH(DASH.Config(alpha=0.5, lam=0.2, collect_steps=2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    method.attach(model, optimizer)
    g1 = {"0.weight": torch.tensor([[-1.0, 0.0], [0.0, 1.0]]), "0.bias": torch.tensor([-1.0, 0.0]),
          "2.weight": torch.tensor([[-1.0, 1.0]])}
    g2 = {"0.weight": torch.tensor([[-1.0, 0.0], [-3.0, 0.0]]), "0.bias": torch.tensor([-1.0, -1.0]),
          "2.weight": torch.tensor([[-1.0, 1.0]])}
    method.on_task_start(model, optimizer, 0)  # task 0: no warm start, nothing collected
    set_grads(model, g1)
    method.before_step(model, optimizer, 0)
    assert method.shrinks == 0 and model[0].weight[1, 1].item() == 1.0
    method.on_task_start(model, optimizer, 1)
    for grads in (g1, g2):
        set_grads(model, grads)
        method.before_step(model, optimizer, 0)
    assert method.shrinks == 1
    # EMA of -g: 0.5*(0.5*(-g1)) + 0.5*(-g2) = 0.25*(-g1) + 0.5*(-g2)
    # row 0: 0.25*[1,0] + 0.5*[1,0] = [0.75, 0] -> cos with [1,0] = 1 -> kept
    # row 1: 0.25*[0,-1] + 0.5*[3,0] = [1.5, -0.25] -> cos with [0,1] = -0.25/|.| < 0.2 -> 0.2
    close(model[0].weight, [[1.0, 0.0], [0.0, 0.2]])
    # bias: 0.25*[1,0] + 0.5*[1,1] = [0.75, 0.5], cos with [1,1] = 1.25/(sqrt(0.8125)*sqrt(2))
    c = 1.25 / (math.sqrt(0.8125) * math.sqrt(2))
    close(model[0].bias, [c, c])
    # output row: -g = [1,-1] against [2,2]: cos 0 -> lam
    close(model[2].weight, [[0.4, 0.4]])
    set_grads(model, g1)
    method.before_step(model, optimizer, 0)  # collection over: no second shrink
    assert method.shrinks == 1


def test_dash_state_round_trip_mid_collection_and_optimizer_reset():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    method = DASH(DASH.Config(collect_steps=2, reset_optimizer=True))
    method.attach(model, optimizer)
    method.on_task_start(model, optimizer, 1)
    method.before_step(model, optimizer, 0)
    other = DASH(DASH.Config(collect_steps=2, reset_optimizer=True))
    other.attach(model, optimizer)
    other.load_state_dict(round_trip(method.state_dict()))
    assert other.pending == 1 and set(other.ema) == set(method.ema)
    other.before_step(model, optimizer, 1)
    assert other.shrinks == 1 and not optimizer.state


# ---------------------------------------------------------------------------------------------- SWR


def test_swr_selection_by_hand():
    generator = torch.Generator().manual_seed(0)
    u = torch.tensor([[0.5, 0.1], [0.3, 0.2]])
    assert swr_select(u, "proportional", 0.5, generator).tolist() == [[False, True], [False, True]]
    assert swr_select(u, "threshold", 1.0, generator).tolist() == [[False, True], [False, True]]  # mean 0.275
    assert swr_select(u, "proportional", 0.0, generator).sum() == 0
    counts = [int(swr_select(u, "proportional", 0.125, generator).sum()) for _ in range(400)]
    assert set(counts) == {0, 1} and 0.35 < sum(counts) / 400 < 0.65  # 4 * 0.125 = 0.5 expected


def swr_model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
        model[2].weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, 2.0]]))
    return model


def test_swr_redraws_the_lowest_gradient_utility_weight_and_zeroes_its_adam_moments():
    model = swr_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    method = SWR(SWR.Config(rate=0.25, every=2, decay=0.0, reinit="mean"))
    method.attach(model, optimizer)
    grads = {"0.weight": torch.tensor([[1.0, 1.0], [1.0, 1.0]]), "2.weight": torch.tensor([[2.0, 0.1], [1.0, 1.0]])}
    for step in range(2):
        set_grads(model, grads)
        method.before_step(model, optimizer, step)
        optimizer.step()
        if step == 0:
            method.after_step(model, optimizer, step)
            assert method.total_replaced == 0  # every=2: nothing after the first step
    # |w g|: layer 0 [[1, 2], [0.5, 3]] -> entry (1, 0); layer 2 [[2, 0.1], [1, 2]] -> entry (0, 1)
    method.after_step(model, optimizer, 1)
    assert model[0].weight.tolist() == [[1.0, -2.0], [0.0, 3.0]]
    assert model[2].weight.tolist() == [[1.0, 0.0], [-1.0, 2.0]]
    assert method.total_replaced == 2
    assert method.utilities["0.weight"][1, 0] == 0.0 and method.utilities["0.weight"][0, 0] == 1.0
    m0 = optimizer.state[model[0].weight]["exp_avg"]
    assert m0[1, 0] == 0.0 and m0[0, 0] != 0.0
    assert optimizer.state[model[2].weight]["exp_avg_sq"][0, 1] == 0.0


def test_swr_resample_draws_from_the_init_law_and_is_seeded_and_resumable():
    def run(state=None):
        model = swr_model()
        method = SWR(SWR.Config(rate=0.25, every=1, decay=0.5, utility="magnitude", seed=3))
        method.attach(model, None)
        if state is not None:
            method.load_state_dict(round_trip(state))
        method.before_step(model, None, 0)
        method.after_step(model, None, 0)
        return model, method

    a, ma = run()
    b, _ = run()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # magnitude utility: the smallest |w| of layer 0 is 0.5 at (1, 0); the new value is in U(+-1/sqrt(2))
    new = a[0].weight[1, 0].item()
    assert new != 0.5 and abs(new) <= 1 / math.sqrt(2)
    c, mc = run(ma.state_dict())  # a resumed method continues its generator: a different draw
    assert mc.total_replaced == 2 * ma.total_replaced and c[0].weight[1, 0].item() != new


def test_swr_config_is_validated():
    with pytest.raises(ConfigError, match="rate must be <= 1"):
        get_method("swr", {"rate": "2"})
    with pytest.raises(ConfigError, match="every must be"):
        get_method("swr", {"every": "0"})


# ---------------------------------------------------------------------------------------------- TRAC


def test_trac_two_sgd_steps_on_a_scalar_by_hand():
    w = nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    model = nn.Module()
    model.w = w
    lr, cs = 0.1, [2.0, -1.0]
    optimizer = torch.optim.SGD([w], lr=lr)
    method = TRAC(TRAC.Config(betas=3))
    method.attach(model, optimizer)
    betas = np.array([0.9, 0.99, 0.999])
    s_init, eps = 1e-8, 1e-8
    ref, delta = 0.5, 0.0
    variance, sigma = np.zeros(3), np.full(3, 1e-8)
    for c in cs:  # loss = c * w
        optimizer.zero_grad()
        (c * w).sum().backward()
        method.before_step(model, optimizer, 0)
        optimizer.step()
        method.after_step(model, optimizer, 0)
        h = delta * c
        delta = delta - lr * c  # the base optimizer's (SGD's) update
        variance = betas**2 * variance + h * h
        sigma = betas * sigma - h
        s = s_init / erfi(1 / math.sqrt(2)) * erfi(sigma / (np.sqrt(2 * variance) + eps))
        scale = float(s.sum())
        theta = ref + delta * max(scale, 0.0)
        assert w.item() == pytest.approx(theta, rel=1e-12)
        assert method.scale == pytest.approx(scale, rel=1e-12)
    assert w.item() != 0.5 - lr * sum(cs)  # not plain SGD


def test_trac_recovers_from_a_negative_scale_and_keeps_outside_changes():
    """A first disagreeing gradient makes S < 0 (weights at theta_ref); Delta keeps accumulating, so S recovers."""
    w = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    model = nn.Module()
    model.w = w
    optimizer = torch.optim.SGD([w], lr=0.1)
    method = TRAC()
    method.attach(model, optimizer)
    scales = []
    for c in [1.0, -1.0] + [1.0] * 60:  # loss = c * w: the second gradient disagrees, then a steady descent
        optimizer.zero_grad()
        (c * w).sum().backward()
        method.before_step(model, optimizer, 0)
        optimizer.step()
        method.after_step(model, optimizer, 0)
        scales.append(method.scale)
    assert scales[1] < 0 and scales[-1] > 1e-3 and w.item() < -1e-3
    with torch.no_grad():
        w.add_(5.0)  # another method moves the weight: kept as a shift of the reference
    reference = method.reference["w"].item()
    optimizer.zero_grad()
    (1.0 * w).sum().backward()
    method.before_step(model, optimizer, 0)
    assert method.reference["w"].item() == pytest.approx(reference + 5.0)


def test_trac_scale_grows_on_a_consistent_descent_and_state_round_trips():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    method = TRAC()
    method.attach(model, optimizer)
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    scales, losses = [], []
    for _ in range(100):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(float(loss.detach()))
        loss.backward()
        method.before_step(model, optimizer, 0)
        optimizer.step()
        method.after_step(model, optimizer, 0)
        scales.append(method.scale)
    # S starts at the scale of s_init (1e-8 per beta) and grows by orders of magnitude once h keeps its sign
    assert scales[0] < 1e-6 and scales[-1] > 1e4 * scales[0] and losses[-1] < 0.9 * losses[0]
    other = TRAC()
    other.attach(model, optimizer)
    other.load_state_dict(round_trip(method.state_dict()))
    assert other.scale == method.scale and other.steps == 100


# ---------------------------------------------------------------------------------------------- CCBP


def test_ccbp_reset_proportion_by_hand():
    u = torch.tensor([0.5, 0.95, 1.0, 2.0], dtype=torch.float64)
    p = ccbp_reset_proportion(u, 0.5, 0.95, 16.0)
    close(p, [0.5, 0.5, 0.5 * math.exp(-0.8), 0.5 * math.exp(-16.8)])


def test_ccbp_partial_reset_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    method = CCBP(CCBP.Config(every=2, decay=0.0, seed=5))
    method.attach(model, optimizer)
    grads = {"0.weight": torch.tensor([[1.0, -1.0], [3.0, 3.0]]), "0.bias": torch.ones(2),
             "2.weight": torch.ones(1, 2), "2.bias": torch.ones(1)}
    for step in range(2):
        set_grads(model, grads)
        method.before_step(model, optimizer, step)
        optimizer.step()
        if step == 0:
            method.after_step(model, optimizer, step)
            assert method.events == 0
    w_in, w_out = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    buffer = optimizer.state[model[0].weight]["momentum_buffer"].clone()
    method.after_step(model, optimizer, 1)
    # m = [1, 3], mean 2 -> u = [0.5, 1.5]; p = [0.5, 0.5 * exp(-16 * 0.55)]
    p = torch.tensor([0.5, 0.5 * math.exp(-16 * 0.55)], dtype=torch.float64)
    close(method.last_proportions[0], p.tolist())
    generator = torch.Generator().manual_seed(method.method_seed(5))
    scale = _weight_scale(model[0].weight, "kaiming_uniform", activation_gain(nn.ReLU()))
    fresh = _sample((2, 2), "kaiming_uniform", scale, generator)
    expected_in = (1 - p[:, None]) * w_in.double() + p[:, None] * fresh
    close(model[0].weight.detach().double(), expected_in.tolist(), rel=1e-6)
    close(model[2].weight.detach().double(), (w_out.double() * (1 - p)).tolist(), rel=1e-6)
    new_buffer = optimizer.state[model[0].weight]["momentum_buffer"].double()
    close(new_buffer, (buffer.double() * (1 - p[:, None])).tolist(), rel=1e-6)
    assert method.utilities[0].tolist() == [1.0, 1.0]


def test_ccbp_conv_outgoing_factor_and_round_trip():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4, 2))
    method = CCBP(CCBP.Config(every=1, decay=0.0))
    method.attach(model, None)
    keep = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    factor = CCBP._outgoing_keep(method.groups[0], keep)
    assert factor.shape == (2, 12) and factor[0, :4].tolist() == [1.0] * 4 and factor[1, 8:].tolist() == [0.25] * 4
    model(torch.randn(2, 1, 4, 4)).sum().backward()
    method.before_step(model, None, 0)
    method.after_step(model, None, 0)
    other = CCBP(CCBP.Config(every=1, decay=0.0))
    other.attach(model, None)
    other.load_state_dict(round_trip(method.state_dict()))
    assert other.events == 1 and other.steps == 1


# ------------------------------------------------------------------------------------ optimizer reset, leaky ReLU


def test_optimizer_reset_restarts_adam_so_the_next_step_is_lr_times_the_sign():
    w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    model = nn.Module()
    model.w = w
    optimizer = torch.optim.Adam([w], lr=0.1)
    method = OptimizerReset(OptimizerReset.Config(every=0))
    method.attach(model, optimizer)
    for c in (3.0, 3.0):  # loss = c * w
        optimizer.zero_grad()
        (c * w).sum().backward()
        optimizer.step()
    method.on_task_start(model, optimizer, 0)
    assert optimizer.state[w]["step"] == 2  # task 0: kept
    method.on_task_start(model, optimizer, 1)
    assert not optimizer.state and method.resets == 1
    before = w.item()
    optimizer.zero_grad()
    (-5.0 * w).sum().backward()
    optimizer.step()
    assert w.item() - before == pytest.approx(0.1, rel=1e-6)  # a fresh Adam's first step: lr * sign(-g)
    periodic = OptimizerReset(OptimizerReset.Config(every=2, at_task_start=False))
    periodic.attach(model, optimizer)
    periodic.after_step(model, optimizer, 0)
    assert optimizer.state
    periodic.after_step(model, optimizer, 1)
    assert not optimizer.state and periodic.state_dict() == {"steps": 2, "resets": 1}


def test_leaky_relu_swaps_every_relu_in_a_copy():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 1))
    swapped = LeakyReLUSwap(LeakyReLUSwap.Config(negative_slope=0.2)).prepare_model(model)
    assert isinstance(model[1], nn.ReLU)
    assert isinstance(swapped[1], nn.LeakyReLU) and isinstance(swapped[2][1], nn.LeakyReLU)
    assert swapped[1](torch.tensor([-3.0, 2.0])).tolist() == pytest.approx([-0.6, 2.0])
    assert torch.equal(swapped[0].weight, model[0].weight)
    with pytest.raises(ConfigError, match="no nn.ReLU"):
        LeakyReLUSwap().prepare_model(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))


# ---------------------------------------------------------------------------------------------- runs


FIELD2_SPECS = ["dash", "swr:every=3:rate=0.05", "trac", "ccbp:every=5", "optimizer_reset:every=7", "leaky_relu",
                "dash+swr:every=4:rate=0.05+ccbp:every=5"]
SHORT_CLASS_SPLIT = {"num_tasks": 2, "steps_per_task": 12}


def sorted_rows(frame) -> list[tuple]:
    """Rows of a metrics frame as sorted tuples."""
    return sorted(zip(frame["step"], frame["task"], frame["layer"], frame["metric"], frame["value"]))


@pytest.mark.parametrize("spec", FIELD2_SPECS)
def test_benchmark_run_with_the_method_resumes_exactly(tmp_path, spec):
    cls = get_benchmark("class_split")
    config = cls.make_config("smoke", SHORT_CLASS_SPLIT)
    with ResultStore(tmp_path / "whole") as whole:
        execute_run(whole, cls, config, 1, [spec], checkpoint_every=5, progress=False)
        expected = sorted_rows(whole.metrics())
    with ResultStore(tmp_path / "split") as split:
        paused = execute_run(split, cls, config, 1, [spec], checkpoint_every=5, progress=False, stop_after_steps=13)
        assert paused.status == "paused"
        result = execute_run(split, cls, config, 1, [spec], checkpoint_every=5, progress=False)
        assert (result.status, result.resumed_from) == ("finished", 13)
        got = sorted_rows(split.metrics())
    assert len(got) == len(expected) > 0
    assert got == expected


def test_methods_are_registered_composable_and_change_training():
    names = [type(m).__name__ for m in resolve_methods("dash+swr+trac+ccbp+optimizer_reset+leaky_relu+cbp")]
    assert names == ["DASH", "SWR", "TRAC", "CCBP", "OptimizerReset", "LeakyReLUSwap", "ContinualBackprop"]
    assert type(build_methods("direction_aware_shrinking")) is DASH
    assert type(build_methods("selective_weight_reinit")) is SWR
    assert type(build_methods("continuous_cbp")) is CCBP
    cls = get_benchmark("class_split")
    config = cls.make_config("smoke", SHORT_CLASS_SPLIT)
    baseline = cls(config, 0, [])
    base = [r["value"] for r in baseline.run(baseline.total_steps) if r["metric"] == "loss"]
    specs = ["dash:lam=0.05", "swr:every=2:rate=0.2", "trac", "ccbp:every=3", "optimizer_reset:every=3", "leaky_relu"]
    for spec in specs:
        bench = cls(config, 0, resolve_methods(spec))
        assert [r["value"] for r in bench.run(bench.total_steps) if r["metric"] == "loss"] != base, spec
