"""Unit-reset mitigations: CBP schedule/maturity/bias correction, ReDo, frozen-unit reset, clone breaking."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lopkit.configs import ConfigError, build_config
from lopkit.diagnostics.activations import dormant_scores, frozen_unit_mask
from lopkit.diagnostics.similarity import cosine_similarity_matrix, duplicate_clusters, duplicate_unit_mask
from lopkit.mitigations.layers import UnitGroup, unit_activations
from lopkit.mitigations.registry import available_methods, build_methods, get_method
from lopkit.mitigations.resets import (
    AggressiveCBPConfig,
    AggressiveContinualBackprop,
    BreakClones,
    BreakClonesConfig,
    CBPConfig,
    ContinualBackprop,
    ReDo,
    ReDoConfig,
    ResetFrozen,
    ResetFrozenConfig,
    clusters_from_gram,
)


def mlp(widths=(4, 8, 1), activation=nn.ReLU, seed=0) -> nn.Sequential:
    """Linear/activation stack ending with a Linear layer."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def train_step(model, optimizer, method, step, x, y=None):
    """One step of the plain loop the methods are written for."""
    model.train()
    out = model(x)
    loss = (out - (y if y is not None else torch.zeros_like(out))).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    method.before_step(model, optimizer, step)
    optimizer.step()
    method.after_step(model, optimizer, step)
    return loss


# --------------------------------------------------------------------------- registry and configs


def test_methods_are_registered():
    names = available_methods()
    for name in ("cbp", "cbp_aggressive", "redo", "reset_frozen", "break_clones"):
        assert name in names
    method = build_methods("cbp:replacement_rate=1e-3:maturity=50")
    assert isinstance(method, ContinualBackprop)
    assert method.config.replacement_rate == 1e-3 and method.config.maturity == 50


@pytest.mark.parametrize(
    "name,params",
    [
        ("cbp", {"replacement_rate": "-0.1"}),
        ("cbp", {"replacement_rate": "2"}),
        ("cbp", {"decay_rate": "1.0"}),
        ("cbp", {"maturity": "-1"}),
        ("cbp", {"utility_type": "weight"}),
        ("cbp", {"init": "orthogonal"}),
        ("cbp", {"seed": "-3"}),
        ("cbp_aggressive", {"replacement_rate": "nan"}),
        ("redo", {"tau": "-0.5"}),
        ("redo", {"every": "0"}),
        ("redo", {"window_steps": "-1"}),
        ("redo", {"bias_init": "ones"}),
        ("reset_frozen", {"eps": "0"}),
        ("reset_frozen", {"sample_fraction": "1.5"}),
        ("break_clones", {"threshold": "1.0"}),
        ("break_clones", {"noise_scale": "0"}),
        ("break_clones", {"unknown": "1"}),
    ],
)
def test_bad_hyper_parameters_raise_config_error(name, params):
    with pytest.raises(ConfigError):
        get_method(name, params)


def test_direct_construction_validates():
    with pytest.raises(ConfigError):
        ContinualBackprop(CBPConfig(replacement_rate=-1.0))
    assert build_config(ReDoConfig, {"tau": "0.1"}).tau == 0.1


# --------------------------------------------------------------------------- CBP schedule and maturity


def _run_frozen_weights(method, model, steps, batch=4, in_features=4, seed=0):
    """Drive a method with lr = 0, so incoming rows change only when a unit is replaced; yield per-step resets."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    method.attach(model, optimizer)
    group = method.groups[0]
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        before = group.incoming.weight.detach().clone()
        train_step(model, optimizer, method, step, torch.randn(batch, in_features, generator=gen))
        changed = (group.incoming.weight.detach() != before).any(dim=1)
        yield step, changed


def test_cbp_replaces_rate_times_eligible_and_respects_maturity():
    units, maturity, rate, steps = 10, 20, 0.02, 1200
    method = ContinualBackprop(CBPConfig(replacement_rate=rate, maturity=maturity, schedule="accumulate", seed=0))
    ages = np.zeros(units, dtype=int)  # independent bookkeeping from the observed weight changes
    expected = 0.0
    replaced = 0
    for _step, changed in _run_frozen_weights(method, mlp((4, units, 1)), steps):
        ages += 1
        expected += rate * int((ages > maturity).sum())
        changed = changed.numpy()
        assert np.all(ages[changed] > maturity), "a unit younger than the maturity threshold was replaced"
        replaced += int(changed.sum())
        ages[changed] = 0
    # the accumulator keeps the fractional remainder, so the total is floor(sum of rate * eligible), +- rounding
    assert abs(replaced - expected) < 1.0 + 1e-9
    assert method.total_replaced == replaced and replaced > 150


def test_cbp_all_mature_gives_floor_rate_units_steps():
    units, rate, steps = 10, 0.006, 500
    method = ContinualBackprop(CBPConfig(replacement_rate=rate, maturity=10**6, schedule="accumulate", seed=0))
    list(_run_frozen_weights(method, mlp((4, units, 1)), 200))
    assert method.total_replaced == 0  # nobody is mature
    method = ContinualBackprop(CBPConfig(replacement_rate=rate, maturity=0, schedule="accumulate", seed=0))
    list(_run_frozen_weights(method, mlp((4, units, 1)), steps))
    assert abs(method.total_replaced - rate * units * steps) < 1.0 + 1e-9  # 30 (float accumulation may give 29)


def test_cbp_full_rate_replaces_each_unit_exactly_when_it_matures():
    maturity = 5
    method = ContinualBackprop(CBPConfig(replacement_rate=1.0, maturity=maturity, seed=0))
    history = [changed.clone() for _s, changed in _run_frozen_weights(method, mlp((4, 6, 1)), 30)]
    for step, changed in enumerate(history):
        expected = (step + 1) % (maturity + 1) == 0  # age maturity + 1 first exceeds the threshold
        assert bool(changed.all()) == expected and bool(changed.any()) == expected


def test_cbp_aggressive_replaces_one_unit_per_step_after_maturity():
    maturity, steps = 5, 60
    method = AggressiveContinualBackprop(
        AggressiveCBPConfig(replacement_rate=1e-4, maturity=maturity, redraw_incoming=True, seed=0)
    )
    counts = [int(changed.sum()) for _s, changed in _run_frozen_weights(method, mlp((4, 10, 1)), steps)]
    assert counts == [0] * maturity + [1] * (steps - maturity)
    method = AggressiveContinualBackprop(
        AggressiveCBPConfig(replacement_rate=0.25, maturity=maturity, redraw_incoming=True, seed=0)
    )
    counts = [int(changed.sum()) for _s, changed in _run_frozen_weights(method, mlp((4, 10, 1)), 8)]
    assert counts[maturity] == 2  # max(1, floor(10 * 0.25))


def test_cbp_replaces_lowest_utility_units():
    model = mlp((4, 8, 1))
    with torch.no_grad():
        model[2].weight[:, [2, 5]] = 0.0  # zero outgoing weights: zero contribution utility
        model[0].bias.fill_(1.0)  # every unit active, so the others have positive utility
    method = ContinualBackprop(CBPConfig(replacement_rate=0.25, maturity=3, seed=0))
    history = [changed.clone() for _s, changed in _run_frozen_weights(method, model, 4)]
    assert not any(bool(c.any()) for c in history[:3])
    assert history[3].nonzero().flatten().tolist() == [2, 5]  # 0.25 * 8 = 2 units at the first mature step


def test_cbp_contribution_utility_matches_closed_form():
    """With lr = 0, u_t = (1-eta) sum_s eta^(t-s) mean|h_s| * sum|w_out| for every unit (no replacement)."""
    eta, steps = 0.9, 25
    model = mlp((4, 6, 1))
    method = ContinualBackprop(
        CBPConfig(replacement_rate=0.0, decay_rate=eta, utility_type="contribution", weight_magnitude="sum", seed=0)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    method.attach(model, optimizer)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(3, 4, generator=gen) for _ in range(steps)]
    for step, x in enumerate(inputs):
        train_step(model, optimizer, method, step, x)
    with torch.no_grad():
        h = np.stack([torch.relu(model[0](x)).abs().mean(0).numpy() for x in inputs]).astype(np.float64)
        out_mag = model[2].weight.abs().sum(0).numpy().astype(np.float64)
    weights = (1 - eta) * eta ** np.arange(steps - 1, -1, -1)
    expected = (weights[:, None] * h).sum(0) * out_mag
    np.testing.assert_allclose(method.stats[0]["utility"].numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(method.corrected_utility(0).numpy(), expected / (1 - eta**steps), rtol=1e-6)


# --------------------------------------------------------------------------- function preservation


def test_cbp_bias_correction_exact_for_constant_unit_and_predictable_otherwise():
    model = mlp((4, 6, 2))
    with torch.no_grad():
        model[0].weight[3] = 0.0
        model[0].bias[3] = 0.8  # unit 3 is constant: relu(0.8)
        model[2].weight[:, 3] *= 1e-3  # ... and has by far the lowest contribution utility
    method = ContinualBackprop(
        CBPConfig(replacement_rate=1.0 / 6, maturity=4, utility_type="contribution", bias_correction=True, seed=0)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    method.attach(model, optimizer)
    probe = torch.randn(16, 4)
    for step in range(4):
        train_step(model, optimizer, method, step, torch.randn(4, 4))
    with torch.no_grad():
        before = model(probe)
    train_step(model, optimizer, method, 4, torch.randn(4, 4))  # first mature step: replaces exactly one unit
    assert method.total_replaced == 1 and float(model[2].weight.detach()[:, 3].abs().sum()) == 0.0
    with torch.no_grad():
        torch.testing.assert_close(model(probe), before, rtol=0, atol=1e-6)


def test_cbp_bias_correction_changes_output_by_deviation_from_running_mean():
    """Approximate case: the output moves by -w_out * (h(x) - hbar), hbar the bias-corrected running mean."""
    eta = 0.99
    model = mlp((4, 6, 2), seed=3)
    with torch.no_grad():
        model[0].bias.fill_(0.5)
        model[2].weight[:, 1] *= 1e-3  # unit 1: lowest utility, but its activation varies with x
    method = ContinualBackprop(
        CBPConfig(
            replacement_rate=1.0 / 6, maturity=4, decay_rate=eta, utility_type="contribution", bias_correction=True,
            seed=0,
        )
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    method.attach(model, optimizer)
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randn(4, 4, generator=gen) for _ in range(5)]
    probe = torch.randn(16, 4, generator=gen)
    for step in range(4):
        train_step(model, optimizer, method, step, inputs[step])
    with torch.no_grad():
        before = model(probe).double()
        h_probe = torch.relu(model[0](probe))[:, 1].double()
        batch_means = [float(torch.relu(model[0](x))[:, 1].mean()) for x in inputs]
        w_out = model[2].weight[:, 1].double().clone()
    train_step(model, optimizer, method, 4, inputs[4])
    assert method.replaced_per_group == [1] and float(model[2].weight.detach()[:, 1].abs().sum()) == 0.0
    running = sum((1 - eta) * eta ** (4 - s) * batch_means[s] for s in range(5)) / (1 - eta**5)
    predicted = before - (h_probe - running)[:, None] * w_out[None, :]
    with torch.no_grad():
        torch.testing.assert_close(model(probe).double(), predicted, rtol=0, atol=1e-6)


def test_cbp_resets_adam_moments_of_replaced_units_only():
    model = mlp((4, 6, 2))
    method = ContinualBackprop(CBPConfig(replacement_rate=1.0 / 6, maturity=3, seed=0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    method.attach(model, optimizer)
    fc1, fc2 = model[0], model[2]
    for step in range(4):
        model.train()
        loss = model(torch.randn(5, 4)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        snapshot = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
        weights = fc1.weight.detach().clone()
        method.after_step(model, optimizer, step)
    replaced = (fc1.weight.detach() != weights).any(dim=1)
    assert int(replaced.sum()) == 1
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.all(optimizer.state[fc1.weight][key][replaced] == 0)
        assert torch.all(optimizer.state[fc1.bias][key][replaced] == 0)
        assert torch.all(optimizer.state[fc2.weight][key][:, replaced] == 0)
        assert torch.equal(optimizer.state[fc1.weight][key][~replaced], snapshot[id(fc1.weight)][key][~replaced])
        assert torch.equal(optimizer.state[fc2.weight][key][:, ~replaced], snapshot[id(fc2.weight)][key][:, ~replaced])
        assert torch.equal(optimizer.state[fc2.bias][key], snapshot[id(fc2.bias)][key])


def test_cbp_warns_without_training_forward():
    model = mlp((4, 6, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method = ContinualBackprop(CBPConfig(seed=0))
    method.attach(model, optimizer)
    with pytest.warns(UserWarning, match="no training-mode forward"):
        method.after_step(model, optimizer, 0)


# --------------------------------------------------------------------------- ReDo


def _dormant_model():
    model = mlp((5, 8, 3), seed=4)
    with torch.no_grad():
        model[0].bias.fill_(0.5)  # living units fire often
        for unit in (1, 6):  # dead: h = 0 on every input
            model[0].weight[unit] = 0.0
            model[0].bias[unit] = -1.0
        model[0].weight[3] *= 1e-3  # nearly silent: score ~ 0.003-0.01 < 0.025
        model[0].bias[3] = 1e-3
    return model


def test_redo_recycles_exactly_the_dormant_units_and_keeps_function():
    model = _dormant_model()
    method = ReDo(ReDoConfig(every=5, window_steps=5, tau=0.025, seed=0))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)  # lr 0: the activations stay fixed
    method.attach(model, optimizer)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(6, 5, generator=gen) for _ in range(5)]
    for step in range(4):
        train_step(model, optimizer, method, step, inputs[step])
    # independent score on the window's stacked activations
    with torch.no_grad():
        h = torch.cat([torch.relu(model[0](x)) for x in inputs])
    expected = (dormant_scores(h) <= 0.025).nonzero().flatten().tolist()
    assert expected == [1, 3, 6]
    probe = torch.randn(10, 5, generator=gen)
    weights = model[0].weight.detach().clone()
    train_step(model, optimizer, method, 4, inputs[4])
    with torch.no_grad():
        after = model(probe)
    changed = (model[0].weight.detach() != weights).any(dim=1).nonzero().flatten().tolist()
    assert changed == expected and method.total_replaced == 3
    assert torch.all(model[2].weight.detach()[:, expected] == 0)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.all(optimizer.state[model[0].weight][key][expected] == 0)
    # dead units contributed exactly 0, so the output equals the original net without unit 3's outgoing weights
    with torch.no_grad():
        ref = _dormant_model()
        ref[2].weight[:, 3] = 0.0
        torch.testing.assert_close(after, ref(probe), rtol=0, atol=1e-6)


def test_redo_only_dead_units_is_exactly_function_preserving():
    model = mlp((5, 8, 3), seed=6)
    with torch.no_grad():
        model[0].bias.fill_(0.3)
        model[0].weight[2] = 0.0
        model[0].bias[2] = -2.0
    method = ReDo(ReDoConfig(every=3, window_steps=0, tau=0.0, seed=0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    method.attach(model, optimizer)
    probe = torch.randn(10, 5)
    with torch.no_grad():
        before = model(probe)
    for step in range(3):
        train_step(model, optimizer, method, step, torch.randn(4, 5))
    assert method.total_replaced == 1
    with torch.no_grad():
        torch.testing.assert_close(model(probe), before, rtol=0, atol=0)


# --------------------------------------------------------------------------- frozen units


def test_reset_frozen_resets_dead_and_saturated_units_and_keeps_function():
    model = mlp((4, 6, 2), activation=nn.Tanh, seed=7)
    with torch.no_grad():
        model[0].weight[1] = 0.01
        model[0].bias[1] = 8.0  # tanh'(8) ~ 4.5e-7: saturated at +1
        model[0].weight[4] = -0.01
        model[0].bias[4] = -9.0  # saturated at -1
    method = ResetFrozen(ResetFrozenConfig(every=4, window_steps=4, seed=0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    method.attach(model, optimizer)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(8, 4, generator=gen) for _ in range(4)]
    probe = torch.randn(12, 4, generator=gen)
    with torch.no_grad():
        z = torch.cat([model[0](x) for x in inputs])
        before = model(probe)
    expected = frozen_unit_mask(z, nn.Tanh(), eps=0.01, sample_fraction=0.99).nonzero().flatten().tolist()
    assert expected == [1, 4]
    weights = model[0].weight.detach().clone()
    for step in range(4):
        train_step(model, optimizer, method, step, inputs[step])
    changed = (model[0].weight.detach() != weights).any(dim=1).nonzero().flatten().tolist()
    assert changed == expected
    with torch.no_grad():  # absorb_mean: the saturated units' (almost) constant output moved into the bias
        torch.testing.assert_close(model(probe), before, rtol=0, atol=1e-5)


def test_reset_frozen_matches_diagnostic_rule_on_relu():
    model = mlp((3, 10, 1), seed=8)
    method = ResetFrozen(ResetFrozenConfig(every=10**6, window_steps=0, seed=0, sample_fraction=0.9))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    method.attach(model, optimizer)
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randn(2, 3, generator=gen) + 0.5 for _ in range(20)]
    for step, x in enumerate(inputs):
        train_step(model, optimizer, method, step, x)
    with torch.no_grad():
        z = torch.cat([model[0](x) for x in inputs])
    assert torch.equal(method.frozen_mask(0), frozen_unit_mask(z, nn.ReLU(), eps=0.01, sample_fraction=0.9))


# --------------------------------------------------------------------------- cloned units


def _cloned_model():
    model = mlp((6, 8, 2), seed=9)
    with torch.no_grad():
        for src, dst in ((0, 1), (0, 2), (3, 4)):
            model[0].weight[dst] = model[0].weight[src]
            model[0].bias[dst] = model[0].bias[src]
    return model


@pytest.mark.parametrize("centered,absolute", [(False, False), (True, False), (True, True)])
def test_clusters_from_gram_match_duplicate_clusters(centered, absolute):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(200, 5, generator=gen)
    h = torch.cat([base, base[:, :2] * 2 + 1e-3 * torch.randn(200, 2, generator=gen), -base[:, 3:4]], dim=1)
    h[:, 4] = 0.0  # a silent unit
    h = h.double()
    gram = h.T @ h
    raw = torch.diagonal(gram).clone()
    if centered:
        gram = gram - h.shape[0] * torch.outer(h.mean(0), h.mean(0))
    got = clusters_from_gram(gram, 0.95, raw_diagonal=raw, absolute=absolute)
    assert got == duplicate_clusters(h, 0.95, centered=centered, absolute=absolute)
    assert len(got) >= 2


def test_break_clones_perturbs_all_but_one_per_cluster():
    model = _cloned_model()
    method = BreakClones(BreakClonesConfig(every=3, window_steps=3, noise_scale=0.1, seed=0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    method.attach(model, optimizer)
    gen = torch.Generator().manual_seed(4)
    inputs = [torch.randn(10, 6, generator=gen) for _ in range(3)]
    probe = torch.randn(256, 6, generator=gen)
    group = method.groups[0]
    h_before = unit_activations(model, group, probe)
    assert duplicate_clusters(h_before, 0.95)[:2] == [[0, 1, 2], [3, 4]]
    weights = model[0].weight.detach().clone()
    for step in range(3):
        train_step(model, optimizer, method, step, inputs[step])
    changed = (model[0].weight.detach() != weights).any(dim=1).nonzero().flatten().tolist()
    with torch.no_grad():  # the window's activations, recomputed with the weights before the perturbation
        stacked = torch.cat([torch.relu(nn.functional.linear(x, weights, model[0].bias)) for x in inputs])
    expected = sorted(u for c in duplicate_clusters(stacked, 0.95) for u in c[1:])
    assert changed == expected and {1, 2, 4} <= set(changed)
    h_after = unit_activations(model, group, probe)
    similarity = cosine_similarity_matrix(h_after)
    assert float(similarity[0, 1]) < 1 - 1e-5 and float(similarity[3, 4]) < 1 - 1e-5  # no longer exact clones


def test_break_clones_large_noise_removes_duplicates_and_training_separates_them():
    model = _cloned_model()
    method = BreakClones(BreakClonesConfig(every=2, window_steps=2, noise_scale=1.0, seed=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    method.attach(model, optimizer)
    gen = torch.Generator().manual_seed(5)
    for step in range(2):
        train_step(model, optimizer, method, step, torch.randn(10, 6, generator=gen))
    h = unit_activations(model, method.groups[0], torch.randn(512, 6, generator=gen))
    duplicates = duplicate_unit_mask(h, 0.95)
    assert not bool(duplicates[[0, 1, 2, 3, 4]].any())


# --------------------------------------------------------------------------- determinism and resume


METHOD_SETTINGS = {
    "cbp": {"replacement_rate": "0.02", "maturity": "5"},
    "cbp_aggressive": {"maturity": "5"},
    "redo": {"every": "7", "window_steps": "3", "tau": "0.5"},
    "reset_frozen": {"every": "7", "window_steps": "0", "sample_fraction": "0.5"},
    "break_clones": {"every": "7", "window_steps": "0", "threshold": "0.5"},
}


def _train(name, params, steps, seed_data=0, state=None, model_seed=0):
    model = mlp((4, 12, 12, 1), seed=model_seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    method = get_method(name, dict(params, seed="11"))
    method.attach(model, optimizer)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        method.load_state_dict(state["method"])
    gen = torch.Generator().manual_seed(seed_data)
    start = 0 if state is None else state["step"]
    for _ in range(start):
        torch.randn(3, 4, generator=gen)
    for step in range(start, start + steps):
        x = torch.randn(3, 4, generator=gen)
        train_step(model, optimizer, method, step, x, x.sum(1, keepdim=True).sin())
    saved = {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "method": copy.deepcopy(method.state_dict()),
        "step": start + steps,
    }
    return model, method, saved


@pytest.mark.parametrize("name", sorted(METHOD_SETTINGS))
def test_state_dict_round_trip_resumes_exactly(name):
    params = METHOD_SETTINGS[name]
    full_model, full_method, _ = _train(name, params, 40)
    _, _, half = _train(name, params, 19)  # 19: resume in the middle of a window
    resumed_model, resumed_method, _ = _train(name, params, 21, state=half)
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    assert full_method.total_replaced == resumed_method.total_replaced > 0
    assert full_method.state_dict()["total_replaced"] == full_method.total_replaced


def test_same_seed_same_run_different_seed_differs():
    a, _, _ = _train("cbp", METHOD_SETTINGS["cbp"], 30)
    b, _, _ = _train("cbp", METHOD_SETTINGS["cbp"], 30)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    model = mlp((4, 12, 12, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    other = get_method("cbp", dict(METHOD_SETTINGS["cbp"], seed="12"))
    other.attach(model, optimizer)
    gen = torch.Generator().manual_seed(0)
    for step in range(30):
        x = torch.randn(3, 4, generator=gen)
        train_step(model, optimizer, other, step, x, x.sum(1, keepdim=True).sin())
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), model.parameters()))


def test_load_state_before_attach_is_applied_at_attach():
    _, method, saved = _train("redo", METHOD_SETTINGS["redo"], 10)
    fresh = get_method("redo", dict(METHOD_SETTINGS["redo"], seed="11"))
    fresh.load_state_dict(saved["method"])
    model = mlp((4, 12, 12, 1))
    fresh.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert fresh.total_replaced == method.total_replaced
    assert torch.equal(fresh.generator.get_state(), method.generator.get_state())


def test_groups_can_be_passed_for_non_sequential_models():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 1)

        def forward(self, x):
            return self.b(self.act(self.a(x)))

    net = Net()
    method = ContinualBackprop(
        CBPConfig(replacement_rate=0.5, maturity=1, seed=0),
        groups=lambda m: [UnitGroup(m.a, m.b, activation=m.act)],
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    method.attach(net, optimizer)
    for step in range(6):
        train_step(net, optimizer, method, step, torch.randn(4, 3))
    assert method.total_replaced > 0
    with pytest.raises(ValueError, match="nn.Sequential"):
        ContinualBackprop(CBPConfig()).attach(net, optimizer)


# --------------------------------------------------------------------------- one replacement step by hand


def _hand_cbp_setup(in_features=4, units=4, seed=7):
    """A lr-0 learner (last input column constant 1), three batch-1 inputs and their ReLU features."""
    model = mlp((in_features, units, 1), seed=seed)
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.05]))
        model[2].bias.fill_(0.25)
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.cat([torch.randn(1, in_features - 1, generator=gen), torch.ones(1, 1)], dim=1) for _ in range(3)]
    return model, xs


def _hand_utilities(model, xs, eta, magnitude, constant_column):
    """Bias-corrected adaptable-contribution utilities and activation means after len(xs) steps (NumPy, float64)."""
    w_in = model[0].weight.detach().double().numpy()
    b_in = model[0].bias.detach().double().numpy()
    w_out = model[2].weight.detach().double().numpy()[0]
    cols = w_in[:, :-1] if constant_column else w_in
    in_mag = np.abs(cols).mean(1) if magnitude == "mean" else np.abs(cols).sum(1)
    out_mag = np.abs(w_out)
    mean = np.zeros(w_in.shape[0])
    util = np.zeros(w_in.shape[0])
    for t, x in enumerate(xs, start=1):
        h = np.maximum(w_in @ x.double().numpy()[0] + b_in, 0.0)
        mean = eta * mean + (1 - eta) * h
        hbar = mean / (1 - eta**t)
        util = eta * util + (1 - eta) * np.abs(h - hbar) * out_mag / in_mag
    n = len(xs)
    return util / (1 - eta**n), mean / (1 - eta**n)


def test_cbp_one_replacement_step_matches_hand_computation():
    """Dohare's gnt.py: mean magnitudes, constant column out of |w_in| and zeroed, bias 0, no bias absorption."""
    eta = 0.9
    model, xs = _hand_cbp_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    corrected, _means = _hand_utilities(model, xs, eta, "mean", constant_column=True)
    chosen = int(np.argmin(corrected))
    method = ContinualBackprop(CBPConfig(replacement_rate=0.25, maturity=2, decay_rate=eta, constant_column=True, seed=0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    method.attach(model, optimizer)
    for step, x in enumerate(xs):
        train_step(model, optimizer, method, step, x)
    assert method.total_replaced == 1  # rate * eligible = 0.25 * 4 = 1: no coin flip
    w, b = model[0].weight.detach(), model[0].bias.detach()
    others = [u for u in range(4) if u != chosen]
    assert torch.equal(w[others], before["0.weight"][others]) and torch.equal(b[others], before["0.bias"][others])
    assert float(b[chosen]) == 0.0 and float(w[chosen, -1]) == 0.0  # bias and constant-column weight: 0
    bound = nn.init.calculate_gain("relu") * np.sqrt(3.0 / 4)
    assert not torch.equal(w[chosen, :-1], before["0.weight"][chosen, :-1])
    assert float(w[chosen, :-1].abs().max()) <= bound
    assert float(model[2].weight.detach()[0, chosen]) == 0.0
    assert torch.equal(model[2].bias.detach(), before["2.bias"])  # his absorbed mean was already zeroed: adds 0
    assert int(method.stats[0]["age"][chosen]) == 0 and float(method.stats[0]["utility"][chosen]) == 0.0


def test_cbp_coin_flip_replaces_with_probability_rate_times_eligible():
    method = ContinualBackprop(CBPConfig(replacement_rate=0.05, seed=3))
    method.attach(mlp((4, 4, 1)), torch.optim.SGD(mlp((4, 4, 1)).parameters(), lr=0.0))
    counts = [method.num_to_replace(0, 4) for _ in range(4000)]  # p = 0.05 * 4 = 0.2
    assert set(counts) == {0, 1} and abs(np.mean(counts) - 0.2) < 0.03
    assert method.num_to_replace(0, 0) == 0
    method.config.replacement_rate = 0.6
    assert method.num_to_replace(0, 4) == 2  # floor(2.4) once the expectation is >= 1


def test_cbp_aggressive_one_replacement_step_matches_hand_computation():
    """The Barriers script: summed magnitudes over all columns, rows kept, whole fc1 bias zeroed, mean absorbed."""
    eta = 0.9
    model, xs = _hand_cbp_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    corrected, means = _hand_utilities(model, xs, eta, "sum", constant_column=False)
    chosen = int(np.argmin(corrected))
    method = AggressiveContinualBackprop(AggressiveCBPConfig(maturity=2, decay_rate=eta, seed=0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    method.attach(model, optimizer)
    for step, x in enumerate(xs):
        train_step(model, optimizer, method, step, x)
    assert method.total_replaced == 1  # max(1, floor(4 * 1e-4))
    assert torch.equal(model[0].weight.detach(), before["0.weight"])  # the script's redraw hits a copy
    assert torch.all(model[0].bias.detach() == 0)
    w_out_before = before["2.weight"][0].double().numpy()
    expected_bias = float(before["2.bias"][0]) + w_out_before[chosen] * means[chosen]
    np.testing.assert_allclose(float(model[2].bias.detach()[0]), expected_bias, rtol=1e-6)
    w_out = model[2].weight.detach()[0]
    assert float(w_out[chosen]) == 0.0
    assert torch.equal(w_out[[u for u in range(4) if u != chosen]], before["2.weight"][0][[u for u in range(4) if u != chosen]])
