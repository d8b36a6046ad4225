"""Unit groups and per-unit surgery: discovery, re-initialisation, outgoing zeroing, optimizer state, capture."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lopkit.benchmarks.models import build_cnn, build_mlp
from lopkit.mitigations.layers import (
    UnitCapture,
    UnitGroup,
    absorb_into_outgoing_bias,
    add_incoming_noise,
    find_unit_groups,
    incoming_weight_magnitude,
    outgoing_weight_magnitude,
    outgoing_weight_mask,
    reinit_incoming,
    reset_norm_units,
    reset_optimizer_state,
    resolve_unit_groups,
    unit_activations,
    unit_mask_tensor,
    zero_outgoing,
)


def _force_unit(module: nn.Module, unit: int, value_fn, conv: bool):
    """Forward hook replacing one unit of ``module``'s output by ``value_fn(shape)`` (brute-force probe)."""

    def hook(_m, _i, out):
        out = out.clone()
        if conv:
            out[:, unit] = value_fn(out[:, unit].shape)
        else:
            out[..., unit] = value_fn(out[..., unit].shape)
        return out

    return module.register_forward_hook(hook)


# --------------------------------------------------------------------------- discovery


def test_find_groups_mlp_with_norm_and_dropout():
    model = build_mlp(10, (8, 6), 3, norm="batch", dropout=0.1)
    groups = find_unit_groups(model)
    assert [g.name for g in groups] == ["act1", "act2"]
    assert groups[0].incoming is model.fc1 and groups[0].outgoing is model.fc2
    assert groups[0].norm is model.norm1 and groups[0].activation is model.act1
    assert groups[1].outgoing is model.head and groups[1].num_units == 6


def test_find_groups_cnn_flatten_block():
    model = build_cnn(3, 8, (4, 5), (7,), 2)
    groups = find_unit_groups(model)
    assert [g.name for g in groups] == ["act1", "act2", "act3"]
    # 8x8 image, two 2x2 pools -> 2x2 spatial: each of the 5 channels feeds 4 columns of fc3
    assert groups[1].outgoing is model.fc3 and groups[1].outgoing_block == 4
    assert groups[0].outgoing_block == 1 and groups[0].is_conv and not groups[2].is_conv


def test_find_groups_nested_sequential_and_barrier():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(6, 6)

        def forward(self, x):
            return x + self.inner(x)

    model = nn.Sequential(
        nn.Sequential(nn.Linear(4, 6), nn.Tanh()),
        nn.Sequential(nn.Linear(6, 6), nn.ReLU()),
        Residual(),  # a barrier: the second layer has no known consumer
        nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 1),
    )
    groups = find_unit_groups(model)
    assert [(g.incoming, g.outgoing) for g in groups] == [(model[0][0], model[1][0]), (model[3], model[5])]


def test_find_groups_errors():
    with pytest.raises(ValueError, match="nn.Sequential"):
        find_unit_groups(nn.Linear(3, 3))
    act = nn.ReLU()
    with pytest.raises(ValueError, match="several places"):
        find_unit_groups(nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 4), act, nn.Linear(4, 1)))
    with pytest.raises(ValueError, match="no unit groups"):
        resolve_unit_groups(nn.Sequential(nn.Linear(3, 1)))
    with pytest.raises(ValueError, match="in_features"):
        UnitGroup(nn.Linear(3, 4), nn.Linear(5, 1))
    with pytest.raises(ValueError, match="shape"):
        unit_mask_tensor(UnitGroup(nn.Linear(3, 4), nn.Linear(4, 1)), torch.ones(3, dtype=torch.bool))


def test_explicit_groups_for_custom_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)

        def forward(self, x):
            return self.b(self.act(self.a(x)))

    net = Net()
    group = UnitGroup(net.a, net.b, activation=net.act, name="hidden")
    assert resolve_unit_groups(net, [group]) == [group]
    assert resolve_unit_groups(net, lambda m: [UnitGroup(m.a, m.b)])[0].incoming is net.a


# --------------------------------------------------------------------------- outgoing zeroing and masks


@pytest.mark.parametrize("kind", ["mlp", "cnn_conv", "cnn_flatten"])
def test_zero_outgoing_makes_output_independent_of_the_unit(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        model, index, x = build_mlp(6, (7, 5), 2), 0, torch.randn(9, 6)
    else:
        model, x = build_cnn(2, 8, (3, 4), (5,), 2), torch.randn(4, 2, 8, 8)
        index = 0 if kind == "cnn_conv" else 1
    group = find_unit_groups(model)[index]
    unit = 2
    with torch.no_grad():
        base = model(x)
        handle = _force_unit(group.output_module, unit, lambda s: torch.randn(s) * 5, group.is_conv)
        changed = model(x)
        handle.remove()
    assert not torch.allclose(base, changed)  # the probe really reaches the output
    zero_outgoing(group, [unit])
    with torch.no_grad():
        base = model(x)
        handle = _force_unit(group.output_module, unit, lambda s: torch.randn(s) * 5, group.is_conv)
        after = model(x)
        handle.remove()
    torch.testing.assert_close(base, after, rtol=0, atol=0)


def test_grouped_conv_outgoing_mask_and_magnitude():
    torch.manual_seed(1)
    incoming = nn.Conv2d(2, 6, 3, padding=1)
    outgoing = nn.Conv2d(6, 4, 3, padding=1, groups=2)  # units 0-2 feed outputs 0-1, units 3-5 feed outputs 2-3
    group = UnitGroup(incoming, outgoing, activation=None)
    mask = outgoing_weight_mask(group, [4])
    expected = torch.zeros_like(outgoing.weight, dtype=torch.bool)
    expected[2:4, 1] = True
    assert torch.equal(mask, expected)
    brute = torch.tensor([outgoing.weight.detach()[outgoing_weight_mask(group, [u])].abs().sum() for u in range(6)])
    torch.testing.assert_close(outgoing_weight_magnitude(group), brute)


def test_magnitudes_against_brute_force():
    torch.manual_seed(2)
    model = build_cnn(1, 4, (3,), (), 2)  # conv1 (3 ch, 2x2 after pool) -> flatten -> head(12 -> 2)
    group = find_unit_groups(model)[0]
    w = model.head.weight.detach()
    brute = torch.stack([w[:, 4 * c : 4 * c + 4].abs().sum() for c in range(3)])
    torch.testing.assert_close(outgoing_weight_magnitude(group), brute)
    torch.testing.assert_close(incoming_weight_magnitude(group), model.conv1.weight.detach().abs().sum(dim=(1, 2, 3)))


def test_absorb_mean_then_zero_preserves_function_for_constant_unit():
    torch.manual_seed(3)
    model = build_mlp(4, (6,), 3)
    group = find_unit_groups(model)[0]
    with torch.no_grad():  # unit 1 outputs relu(0.7) = 0.7 on every input
        model.fc1.weight[1] = 0.0
        model.fc1.bias[1] = 0.7
    x = torch.randn(20, 4)
    before = model(x).detach()
    means = unit_activations(model, group, x).mean(dim=0)
    assert absorb_into_outgoing_bias(group, [1], means)
    zero_outgoing(group, [1])
    reinit_incoming(group, [1], torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(x).detach(), before, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- re-initialisation


def test_reinit_incoming_touches_only_selected_rows_and_is_deterministic():
    torch.manual_seed(4)
    layer = nn.Linear(50, 8)
    group = UnitGroup(layer, nn.Linear(8, 1), activation=nn.ReLU())
    before = layer.weight.detach().clone()
    reinit_incoming(group, torch.tensor([1, 5]), torch.Generator().manual_seed(7))
    first = layer.weight.detach().clone()
    keep = torch.ones(8, dtype=torch.bool)
    keep[[1, 5]] = False
    assert torch.equal(first[keep], before[keep])
    assert not torch.equal(first[1], before[1])
    assert torch.all(layer.bias.detach()[[1, 5]] == 0)
    reinit_incoming(group, torch.tensor([1, 5]), torch.Generator().manual_seed(7))
    assert torch.equal(layer.weight.detach(), first)


@pytest.mark.parametrize(
    "init,bound_fn",
    [("default", lambda fan: 1 / math.sqrt(fan)), ("kaiming_uniform", lambda fan: math.sqrt(2) * math.sqrt(3 / fan))],
)
def test_reinit_distribution_matches_pytorch_scheme(init, bound_fn):
    fan = 40
    layer = nn.Linear(fan, 500)
    group = UnitGroup(layer, None, activation=nn.ReLU())
    reinit_incoming(group, torch.ones(500, dtype=torch.bool), torch.Generator().manual_seed(0), init=init)
    w = layer.weight.detach()
    bound = bound_fn(fan)
    assert float(w.abs().max()) <= bound
    # uniform(-b, b) has std b / sqrt(3); 20k samples give a relative std error ~0.5 %
    assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.02 * bound / math.sqrt(3)


def test_reinit_conv_default_matches_pytorch_default_bound():
    conv = nn.Conv2d(3, 64, 3)
    group = UnitGroup(conv, None)
    reinit_incoming(group, torch.ones(64, dtype=torch.bool), torch.Generator().manual_seed(0), bias="default")
    bound = 1 / math.sqrt(3 * 9)  # nn.Conv2d's own init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))
    weight, bias = conv.weight.detach(), conv.bias.detach()
    assert float(weight.abs().max()) <= bound and float(weight.abs().max()) > 0.95 * bound
    assert float(bias.abs().max()) <= bound and len(set(bias.tolist())) == 64


def test_reset_norm_units():
    norm = nn.BatchNorm1d(4)
    with torch.no_grad():
        norm.weight.fill_(2.0)
        norm.bias.fill_(3.0)
        norm.running_mean.fill_(5.0)
        norm.running_var.fill_(7.0)
    group = UnitGroup(nn.Linear(2, 4), None, norm=norm)
    reset_norm_units(group, [2])
    assert norm.weight.tolist() == [2, 2, 1, 2] and norm.bias.tolist() == [3, 3, 0, 3]
    assert norm.running_mean.tolist() == [5, 5, 0, 5] and norm.running_var.tolist() == [7, 7, 1, 7]


# --------------------------------------------------------------------------- optimizer state


def _train_a_bit(model, optimizer, steps=3):
    for _ in range(steps):
        x = torch.randn(8, model[1].in_features)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("opt_name", ["adam", "adamw_amsgrad", "sgd_momentum"])
def test_reset_optimizer_state_zeroes_exactly_the_unit_entries(opt_name):
    torch.manual_seed(5)
    model = build_mlp(5, (6, 4), 2)
    if opt_name == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    elif opt_name == "adamw_amsgrad":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    _train_a_bit(model, optimizer)
    group = find_unit_groups(model)[0]  # fc1 -> act1 -> fc2
    before = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    reset_optimizer_state(optimizer, group, [1, 4])
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if opt_name == "adamw_amsgrad" else [])
    keys = ["momentum_buffer"] if opt_name == "sgd_momentum" else keys
    rows = torch.tensor([False, True, False, False, True, False])
    for key in keys:
        w_in, b_in = optimizer.state[model.fc1.weight][key], optimizer.state[model.fc1.bias][key]
        w_out = optimizer.state[model.fc2.weight][key]
        assert torch.all(w_in[rows] == 0) and torch.all(b_in[rows] == 0) and torch.all(w_out[:, rows] == 0)
        assert torch.equal(w_in[~rows], before[id(model.fc1.weight)][key][~rows])
        assert torch.equal(b_in[~rows], before[id(model.fc1.bias)][key][~rows])
        assert torch.equal(w_out[:, ~rows], before[id(model.fc2.weight)][key][:, ~rows])
        assert bool((before[id(model.fc1.weight)][key][rows] != 0).any())  # there was something to reset
        for param in (model.fc2.bias, model.head.weight, model.head.bias):
            assert torch.equal(optimizer.state[param][key], before[id(param)][key])
    if opt_name != "sgd_momentum":  # the step counter is shared by the whole tensor and left alone
        assert float(optimizer.state[model.fc1.weight]["step"]) == 3.0


def test_reset_units_is_the_public_one_call_reset_and_matches_its_parts():
    import lopkit as lk

    def trained():
        torch.manual_seed(5)
        model = build_mlp(5, (6, 4), 2)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        _train_a_bit(model, optimizer)
        return model, optimizer

    model, optimizer = trained()
    group = lk.find_unit_groups(model)[0]
    means = torch.arange(6, dtype=torch.float32)
    assert lk.reset_units(group, [1, 4], optimizer, generator=torch.Generator().manual_seed(3), unit_means=means) == 2
    assert lk.reset_units(group, [], optimizer) == 0
    by_hand, hand_optimizer = trained()
    hand_group = find_unit_groups(by_hand)[0]
    absorb_into_outgoing_bias(hand_group, [1, 4], means)
    reinit_incoming(hand_group, [1, 4], torch.Generator().manual_seed(3))
    zero_outgoing(hand_group, [1, 4])
    reset_optimizer_state(hand_optimizer, hand_group, [1, 4])
    for (name, mine), hand in zip(model.named_parameters(), by_hand.parameters()):
        assert torch.equal(mine, hand), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[mine][key], hand_optimizer.state[hand][key]), (name, key)
    assert torch.all(model.fc2.weight[:, [1, 4]] == 0) and torch.all(model.fc1.bias[[1, 4]] == 0)
    assert torch.all(optimizer.state[model.fc1.weight]["exp_avg"][[1, 4]] == 0)


# --------------------------------------------------------------------------- noise and capture


def test_add_incoming_noise_scale_relative_to_row_norm():
    torch.manual_seed(6)
    layer = nn.Linear(400, 4)
    group = UnitGroup(layer, None)
    before = layer.weight.detach().clone()
    add_incoming_noise(group, [0, 2], 0.1, torch.Generator().manual_seed(0))
    delta = layer.weight.detach() - before
    assert torch.all(delta[[1, 3]] == 0)
    ratio = delta[[0, 2]].norm(dim=1) / before[[0, 2]].norm(dim=1)
    # ||noise|| / ||w|| = 0.1 * chi_400 / sqrt(400): within a few % of 0.1
    assert torch.all((ratio - 0.1).abs() < 0.01)


def test_unit_capture_reports_training_forwards_only():
    torch.manual_seed(7)
    model = build_mlp(3, (5,), 1)
    group = find_unit_groups(model)[0]
    seen: list[tuple[str, tuple[int, ...]]] = []
    capture = UnitCapture([group], lambda i, kind, m: seen.append((kind, tuple(m.shape))), pre_activation=True)
    capture.attach()
    model(torch.randn(4, 3))
    model.eval()
    model(torch.randn(4, 3))
    model.train()
    capture.enabled = False
    model(torch.randn(4, 3))
    capture.remove()
    model(torch.randn(4, 3))
    assert sorted(seen) == [("h", (4, 5)), ("z", (4, 5))]


def test_unit_activations_matches_manual_forward():
    torch.manual_seed(8)
    model = build_cnn(1, 4, (3,), (), 2)
    group = find_unit_groups(model)[0]
    x = torch.randn(2, 1, 4, 4)
    h = unit_activations(model, group, x)
    manual = torch.relu(model.conv1(x)).permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(h, manual)
    z = unit_activations(model, group, x, pre_activation=True)
    torch.testing.assert_close(z, model.conv1(x).permute(0, 2, 3, 1).reshape(-1, 3))
