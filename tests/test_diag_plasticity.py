"""Plasticity metrics (issue 17): each against a hand computation on a tiny network where the answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lopkit.diagnostics.monitor import Monitor
from lopkit.diagnostics.metric_registry import available_metrics, unregister_metric
from lopkit.diagnostics.plasticity import (
    PLASTICITY_METRICS,
    active_fraction,
    churn,
    churn_metric,
    distance_from_init,
    distance_from_init_metric,
    feature_norm,
    grama_dormant_fraction,
    pre_activation_grad,
    one_step_plasticity,
    parameter_snapshot,
    plasticity_probe,
    register_plasticity_metrics,
    upgd_plasticity,
)


def tiny_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_probe_leaves_model_untouched_and_is_seeded():
    net = tiny_net()
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    before = parameter_snapshot(net)
    a = plasticity_probe(net, x, steps=20, seed=3)
    b = plasticity_probe(net, x, steps=20, seed=3)
    c = plasticity_probe(net, x, steps=20, seed=4)
    assert a == b and a["loss_before"] != c["loss_before"]
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())
    assert a["drop"] == pytest.approx(a["loss_before"] - a["loss_after"])
    assert a["gain"] == pytest.approx(1 - a["loss_after"] / a["loss_before"])
    assert a["loss_after"] < a["loss_before"]


def test_probe_zero_steps_loss_is_mse_to_seeded_target():
    """With 0 steps, loss_before = loss_after = mean (f(x) - y)^2 for the target given."""
    net = tiny_net()
    x = torch.randn(8, 3)
    y = torch.zeros(8, 2)
    out = plasticity_probe(net, x, steps=0, y=y)
    expected = float(net(x).detach().pow(2).mean())
    assert out["loss_before"] == pytest.approx(expected) and out["loss_after"] == pytest.approx(expected)
    assert out["gain"] == 0.0


def test_probe_one_sgd_step_matches_hand_computation():
    """A linear model y = w x, MSE to target 0: one SGD step multiplies w by (1 - 2 lr mean x^2)."""
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(2.0)
    x = torch.tensor([[1.0], [3.0]])
    lr = 0.01
    out = plasticity_probe(net, x, steps=1, y=torch.zeros(2, 1), optimizer="sgd", lr=lr)
    w1 = 2.0 * (1 - 2 * lr * 5.0)  # d/dw mean (w x)^2 = 2 w mean x^2 = 2 w * 5
    assert out["loss_before"] == pytest.approx(4.0 * 5.0)
    assert out["loss_after"] == pytest.approx(w1 * w1 * 5.0)


def test_probe_fresh_head_replaces_last_linear():
    """target=head: the copy's head is redrawn, so the first loss differs from the random-target probe's."""
    net = tiny_net()
    x = torch.randn(8, 3)
    random = plasticity_probe(net, x, steps=0, seed=0)
    head = plasticity_probe(net, x, steps=0, seed=0, target="head")
    assert random["loss_before"] != head["loss_before"]
    with pytest.raises(ValueError, match="nn.Linear head"):
        plasticity_probe(nn.Sequential(nn.ReLU()), x, steps=1, target="head")


def _two_scalar_layers(w1: float, w2: float) -> nn.Sequential:
    """f(x) = w2 * w1 * x, the first factor frozen (requires_grad=False)."""
    net = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(w1)
        net[1].weight.fill_(w2)
    net[0].weight.requires_grad_(False)
    return net


def test_probe_keeps_frozen_parameters_frozen_unless_train_all():
    """One SGD step on mean (w2 w1 x)^2: only w2 moves by default; with train_all both move (hand computation)."""
    w1, w2, lr = 2.0, 1.5, 0.01
    x = torch.tensor([[1.0], [3.0]])  # mean x^2 = 5
    net = _two_scalar_layers(w1, w2)
    frozen = plasticity_probe(net, x, steps=1, y=torch.zeros(2, 1), optimizer="sgd", lr=lr)
    w2_new = w2 - lr * 2 * w2 * w1 * w1 * 5.0  # dL/dw2 = 2 w2 w1^2 mean x^2
    assert frozen["loss_after"] == pytest.approx((w2_new * w1) ** 2 * 5.0)
    both = plasticity_probe(net, x, steps=1, y=torch.zeros(2, 1), optimizer="sgd", lr=lr, train_all=True)
    w1_new = w1 - lr * 2 * w1 * w2 * w2 * 5.0  # dL/dw1 = 2 w1 w2^2 mean x^2, at the old w2
    assert both["loss_after"] == pytest.approx((w2_new * w1_new) ** 2 * 5.0)
    assert not net[0].weight.requires_grad and net[1].weight.requires_grad  # the model's flags are untouched


def test_probe_with_nothing_trainable_does_not_move():
    net = _two_scalar_layers(2.0, 1.5)
    net[1].weight.requires_grad_(False)
    out = plasticity_probe(net, torch.tensor([[1.0], [3.0]]), steps=3, y=torch.zeros(2, 1))
    assert out["loss_after"] == out["loss_before"] == pytest.approx(9.0 * 5.0) and out["gain"] == 0.0


def test_probe_fit_is_the_explained_variance_of_the_target():
    """fit = 1 - L_after / L_constant, L_constant the MSE of each output's mean target; auc the mean of the losses."""
    net = nn.Linear(1, 2)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.copy_(torch.tensor([1.0, -1.0]))
    x = torch.randn(3, 1)
    y = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])
    out = plasticity_probe(net, x, steps=0, y=y)
    # output (1, -1) on every row; per-output means (2, 2); variances (8/3, 2); MSE to (1, -1): (1+1+9 + 4+4+25)/6
    assert out["loss_constant"] == pytest.approx((8 / 3 + 2) / 2)
    assert out["loss_after"] == pytest.approx(44 / 6)
    assert out["fit"] == pytest.approx(1 - (44 / 6) / ((8 / 3 + 2) / 2))
    assert out["loss_auc"] == pytest.approx(out["loss_before"])
    fitted = plasticity_probe(net, x, steps=2, y=y, optimizer="sgd", lr=0.1)
    sgd = plasticity_probe(net, x, steps=1, y=y, optimizer="sgd", lr=0.1)
    assert fitted["loss_auc"] == pytest.approx((fitted["loss_before"] + sgd["loss_after"] + fitted["loss_after"]) / 3)


def test_probe_residual_target_starts_at_the_noise_whatever_the_output_scale():
    """target=residual: y = own output + N(0, 1), so L_before and L_constant do not grow when the outputs are scaled."""
    net = tiny_net()
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(2))
    big = tiny_net()
    with torch.no_grad():
        big[2].weight.mul_(100.0)
        big[2].bias.add_(50.0)
    small_out = plasticity_probe(net, x, steps=0, seed=5, target="residual")
    big_out = plasticity_probe(big, x, steps=0, seed=5, target="residual")
    assert small_out["loss_before"] == pytest.approx(big_out["loss_before"], rel=1e-4)
    assert small_out["loss_constant"] == pytest.approx(big_out["loss_constant"], rel=1e-4)
    assert plasticity_probe(big, x, steps=0, seed=5)["loss_before"] > 100 * small_out["loss_before"]


def test_probe_rejects_bad_arguments():
    net = tiny_net()
    with pytest.raises(ValueError, match="steps"):
        plasticity_probe(net, torch.randn(2, 3), steps=-1)
    with pytest.raises(ValueError, match="target"):
        plasticity_probe(net, torch.randn(2, 3), target="x")
    with pytest.raises(ValueError, match="train_all"):
        plasticity_probe(net, torch.randn(2, 3), train_all="yes")


def test_upgd_plasticity_hand_values():
    assert upgd_plasticity(2.0, 0.5) == pytest.approx(0.75)
    assert upgd_plasticity(1.0, 3.0) == 0.0  # loss rose: clipped at 0
    assert upgd_plasticity(0.0, 0.0) == 1.0


def test_one_step_plasticity_hand_computation():
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    x, y = torch.tensor([[2.0]]), torch.tensor([[0.0]])
    lr = 0.05
    # L = (w x)^2 = 4 w^2; dL/dw = 8 w = 8; w' = 1 - 0.4 = 0.6; L' = 4 * 0.36 = 1.44
    got = one_step_plasticity(net, x, y, nn.functional.mse_loss, lr)
    assert got == pytest.approx(1 - 1.44 / 4.0)
    assert float(net.weight) == 1.0


def test_churn_zero_when_nothing_changed_and_hand_value():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert churn(a, a.clone()) == 0.0
    assert churn(a, a + torch.tensor([[1.0, 0.0], [0.0, 3.0]])) == pytest.approx((1 + 9) / 4)
    with pytest.raises(ValueError, match="one shape"):
        churn(a, a[:1])


def test_feature_norm_and_active_fraction_hand_values():
    h = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    assert feature_norm(h) == pytest.approx(2.5)  # (5 + 0) / 2
    assert active_fraction(h) == pytest.approx(2 / 6)


def test_grama_flags_a_unit_with_zero_gradient():
    g = torch.tensor([[1.0, 0.0, -2.0], [1.0, 0.0, 2.0]])
    assert grama_dormant_fraction(g, tau=0.0) == pytest.approx(1 / 3)
    # scores: E|g| = (1, 0, 2), mean 1 -> (1, 0, 2); tau = 1 also flags the first unit
    assert grama_dormant_fraction(g, tau=1.0) == pytest.approx(2 / 3)


def test_monitor_grama_flags_a_dead_relu_unit_whose_dl_dh_is_not_zero():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        net[0].bias.copy_(torch.tensor([1.0, 1.0, -100.0]))  # unit 2 never fires
        net[2].weight.copy_(torch.tensor([[1.0, 0.5, 2.0]]))
    x = torch.tensor([[0.5, 2.0], [1.0, 3.0]])
    monitor = Monitor(net, extra_metrics=PLASTICITY_METRICS, metrics=["grama_dormant_fraction"])
    rows = monitor.measure(x, torch.zeros(2, 1), lambda out, y: out.sum())
    # dL/dh = (1, 0.5, 2) on every sample (unit 2 included); dL/dz = dL/dh * ReLU'(z) = (1, 0.5, 0): 1 unit of 3
    assert [r["value"] for r in rows if r["layer"] == "1"] == [pytest.approx(1 / 3)]
    assert grama_dormant_fraction(torch.tensor([[1.0, 0.5, 2.0]] * 2), tau=0.0) == 0.0  # what dL/dh alone would say
    np.testing.assert_allclose(
        pre_activation_grad(torch.ones(2, 3), torch.tensor([[1.0, -1.0, 0.0]] * 2), nn.ReLU()).numpy(),
        [[1.0, 0.0, 0.0]] * 2)


def test_distance_from_init_zero_at_init_and_exact_after_a_known_step():
    net = tiny_net()
    init = parameter_snapshot(net)
    d0 = distance_from_init(net, init)
    assert d0["total"] == 0.0 and d0["0"] == 0.0 and d0["2"] == 0.0
    with torch.no_grad():
        net[0].weight[0, 0] += 3.0
        net[2].bias[1] -= 4.0
    d = distance_from_init(net, init)
    assert d["0"] == pytest.approx(3.0) and d["2"] == pytest.approx(4.0) and d["total"] == pytest.approx(5.0)


def test_monitor_metrics_rows():
    """Registered metrics appear in a Monitor; churn is NaN first, 0 when unchanged; distance is exact."""
    net = tiny_net()
    x = torch.randn(8, 3)
    monitor = Monitor(net, extra_metrics=[*PLASTICITY_METRICS, churn_metric(), distance_from_init_metric(net)],
                      metrics=["feature_norm", "active_fraction", "churn", "distance_from_init"])

    def rows(step):
        return {(r["layer"], r["metric"]): r["value"] for r in monitor.measure(x, step=step)}

    first = rows(0)
    assert math.isnan(first[("1", "churn")]) and first[("0", "distance_from_init")] == 0.0
    assert first[("1", "active_fraction")] == pytest.approx(active_fraction(net[1](net[0](x))))
    assert first[("1", "feature_norm")] == pytest.approx(feature_norm(net[1](net[0](x))))
    assert rows(1)[("1", "churn")] == 0.0
    with torch.no_grad():
        net[2].weight[0, 0] += 2.0
    third = rows(2)
    assert third[("2", "distance_from_init")] == pytest.approx(2.0)
    h = net[1](net[0](x))
    assert third[("2", "churn")] == pytest.approx(float((2.0 * h[:, 0]).pow(2).sum() / 16))


def test_registration_is_opt_in_and_idempotent():
    """Importing the module registers nothing; register_plasticity_metrics adds the three cheap metrics once."""
    names = [spec.name for spec in PLASTICITY_METRICS]
    assert not set(names) & set(available_metrics())
    try:
        assert register_plasticity_metrics() == tuple(names) == register_plasticity_metrics()
        assert set(names) <= set(available_metrics())
        rows = Monitor(tiny_net(), metrics=["active_fraction"]).measure(torch.randn(4, 3))
        assert [r["layer"] for r in rows] == ["1"]
    finally:
        for name in names:
            unregister_metric(name)
