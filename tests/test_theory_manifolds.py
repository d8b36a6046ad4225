"""Tests for lopkit.theory.manifolds / invariance: equitability residuals, projections, equitable
non-constant nets (Remark 2.3) and the frozen-unit manifold.

Residuals and projections are compared with brute-force numpy loops and with a least-squares
projection built from the explicit linear constraints.  Training checks run in float64 so that the
numerical floor (~1e-16 relative) is far below the 1e-6 / 1e-5 tolerances: an equitable but
non-constant net's clones agree only up to rounding (their weights differ), and float32 rounding
(~1e-7) would sit uncomfortably close to the tolerances after 200 steps.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from lopkit.theory.cloning import clone
from lopkit.theory.invariance import (
    frozen_incoming_change,
    frozen_layer_units,
    make_optimizer,
    track_clone_training,
)
from lopkit.theory.manifolds import (
    block_constancy_residual,
    distance_to_block_constant,
    distance_to_equitable,
    frozen_units,
    incoming_sums_residual,
    make_equitable_nonconstant,
    outgoing_sums_residual,
    project_block_constant,
    project_equitable,
    random_equitable_perturbation,
    weight_layer_blocks,
)

OUT_IDS = torch.tensor([0, 1, 0, 2, 1, 0])  # block sizes 3, 2, 1 (the last is a singleton)
IN_IDS = torch.tensor([1, 1, 0, 2, 0, 2, 1])  # block sizes 2, 3, 2


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These tiny models are slower with several intra-op threads on a busy CPU; restore afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Brute-force references


def pairs(out_ids, in_ids):
    out_np, in_np = np.asarray(out_ids), np.asarray(in_ids)
    for j, i in itertools.product(range(out_np.max() + 1), range(in_np.max() + 1)):
        yield np.flatnonzero(out_np == j), np.flatnonzero(in_np == i)


def brute_residuals(w: np.ndarray, out_ids, in_ids) -> tuple[float, float, float]:
    """(incoming spread, outgoing spread, block spread) by explicit loops over block pairs and positions."""
    w = w.reshape(w.shape[0], w.shape[1], -1)
    inc = out = const = 0.0
    for rows, cols in pairs(out_ids, in_ids):
        for p in range(w.shape[2]):
            sub = w[np.ix_(rows, cols, [p])][..., 0]
            row_sums, col_sums = sub.sum(1), sub.sum(0)
            inc = max(inc, row_sums.max() - row_sums.min())
            out = max(out, col_sums.max() - col_sums.min())
            const = max(const, sub.max() - sub.min())
    return inc, out, const


def equitable_constraints(shape, out_ids, in_ids) -> np.ndarray:
    """Rows of A with A vec(W) = 0 <=> equal incoming and outgoing sums in every block pair (2-D W)."""
    constraints = []
    index = np.arange(shape[0] * shape[1]).reshape(shape)
    for rows, cols in pairs(out_ids, in_ids):
        for a, b in zip(rows[:-1], rows[1:]):  # row sums over cols equal for consecutive target units
            c = np.zeros(index.size)
            c[index[a, cols]] += 1
            c[index[b, cols]] -= 1
            constraints.append(c)
        for a, b in zip(cols[:-1], cols[1:]):
            c = np.zeros(index.size)
            c[index[rows, a]] += 1
            c[index[rows, b]] -= 1
            constraints.append(c)
    return np.array(constraints)


# ---------------------------------------------------------------------------------------------
# Residuals and projections


@pytest.mark.parametrize("shape", [(6, 7), (6, 7, 3), (6, 7, 2, 2)])
def test_residuals_match_brute_force(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    inc, out, const = brute_residuals(w.numpy(), OUT_IDS, IN_IDS)
    assert incoming_sums_residual(w, OUT_IDS, IN_IDS) == pytest.approx(inc, abs=1e-12)
    assert outgoing_sums_residual(w, OUT_IDS, IN_IDS) == pytest.approx(out, abs=1e-12)
    assert block_constancy_residual(w, OUT_IDS, IN_IDS) == pytest.approx(const, abs=1e-12)


def test_incoming_and_outgoing_conditions_are_distinct():
    """A matrix with equal row sums but unequal column sums satisfies only the forward (incoming) condition."""
    out_ids, in_ids = torch.tensor([0, 0]), torch.tensor([0, 0])
    w = torch.tensor([[1.0, 3.0], [2.0, 2.0]], dtype=torch.float64)  # rows sum to 4; columns 3 and 5
    assert incoming_sums_residual(w, out_ids, in_ids) == 0.0
    assert outgoing_sums_residual(w, out_ids, in_ids) == pytest.approx(2.0)
    assert incoming_sums_residual(w.T, out_ids, in_ids) == pytest.approx(2.0)
    assert outgoing_sums_residual(w.T, out_ids, in_ids) == 0.0
    assert block_constancy_residual(w, out_ids, in_ids) == pytest.approx(2.0)


def test_conv_condition_holds_per_kernel_position():
    """Equal sums only after summing over kernel positions is not enough: the check is per position."""
    out_ids, in_ids = torch.tensor([0, 0]), torch.tensor([0])
    w = torch.zeros(2, 1, 2, dtype=torch.float64)
    w[0, 0] = torch.tensor([1.0, 0.0])
    w[1, 0] = torch.tensor([0.0, 1.0])  # per-unit totals equal (1), per position different
    assert incoming_sums_residual(w, out_ids, in_ids) == pytest.approx(1.0)
    x = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.float64)
    y = nn.functional.conv1d(x, w)
    assert not torch.allclose(y[:, 0], y[:, 1])  # indeed not forward-cloned


def test_block_constant_projection_matches_block_means():
    w = torch.randn(6, 7, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    projected = project_block_constant(w, OUT_IDS, IN_IDS)
    expected = np.zeros_like(w.numpy())
    for rows, cols in pairs(OUT_IDS, IN_IDS):
        expected[np.ix_(rows, cols)] = w.numpy()[np.ix_(rows, cols)].mean(axis=(0, 1))
    np.testing.assert_allclose(projected.numpy(), expected, atol=1e-12)
    assert block_constancy_residual(projected, OUT_IDS, IN_IDS) < 1e-12
    assert distance_to_block_constant(w, OUT_IDS, IN_IDS) == pytest.approx(np.linalg.norm(w.numpy() - expected))
    assert distance_to_block_constant(projected, OUT_IDS, IN_IDS) < 1e-12


def test_equitable_projection_matches_least_squares():
    w = torch.randn(6, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = equitable_constraints(w.shape, OUT_IDS, IN_IDS)
    vec = w.numpy().reshape(-1)
    expected = vec - np.linalg.pinv(a) @ (a @ vec)  # orthogonal projection onto the null space of A
    projected = project_equitable(w, OUT_IDS, IN_IDS)
    np.testing.assert_allclose(projected.numpy().reshape(-1), expected, atol=1e-10)
    assert incoming_sums_residual(projected, OUT_IDS, IN_IDS) < 1e-12
    assert outgoing_sums_residual(projected, OUT_IDS, IN_IDS) < 1e-12
    assert distance_to_equitable(w, OUT_IDS, IN_IDS) == pytest.approx(np.linalg.norm(vec - expected))
    # block-constant matrices are equitable, so distance_to_equitable <= distance_to_block_constant
    assert distance_to_equitable(w, OUT_IDS, IN_IDS) <= distance_to_block_constant(w, OUT_IDS, IN_IDS)


def test_bad_block_ids_raise():
    w = torch.randn(6, 7)
    with pytest.raises(ValueError, match="entries"):
        incoming_sums_residual(w, OUT_IDS[:5], IN_IDS)
    with pytest.raises(ValueError, match="cover"):
        incoming_sums_residual(w, torch.tensor([0, 0, 0, 2, 2, 2]), IN_IDS)
    with pytest.raises(ValueError, match="shape"):
        incoming_sums_residual(torch.randn(6), OUT_IDS, IN_IDS)


# ---------------------------------------------------------------------------------------------
# Equitable perturbations


def test_random_equitable_perturbation_has_zero_block_sums_and_is_not_constant():
    gen = torch.Generator().manual_seed(3)
    p = random_equitable_perturbation(OUT_IDS, IN_IDS, gen, scale=0.5, dtype=torch.float64)
    assert p.shape == (6, 7)
    for rows, cols in pairs(OUT_IDS, IN_IDS):
        sub = p.numpy()[np.ix_(rows, cols)]
        np.testing.assert_allclose(sub.sum(0), 0, atol=1e-12)
        np.testing.assert_allclose(sub.sum(1), 0, atol=1e-12)
        if len(rows) == 1 or len(cols) == 1:
            np.testing.assert_array_equal(sub, 0)  # singleton blocks admit no perturbation
    assert block_constancy_residual(p, OUT_IDS, IN_IDS) > 0.1
    # deterministic given the generator; conv shapes supported
    again = random_equitable_perturbation(OUT_IDS, IN_IDS, torch.Generator().manual_seed(3), 0.5, dtype=torch.float64)
    assert torch.equal(p, again)
    conv = random_equitable_perturbation(OUT_IDS, IN_IDS, gen, kernel_shape=(3, 3), dtype=torch.float64)
    assert conv.shape == (6, 7, 3, 3)
    inc, out, const = brute_residuals(conv.numpy(), OUT_IDS, IN_IDS)
    assert inc < 1e-12 and out < 1e-12 and const > 0.1


def test_equitable_perturbation_needs_two_cloned_sides():
    with pytest.raises(ValueError, match="no block pair"):
        random_equitable_perturbation(None, torch.tensor([0, 0, 1, 1]), out_units=3)
    with pytest.raises(ValueError, match="out_units"):
        random_equitable_perturbation(None, torch.tensor([0, 0]))


def deep_mlp() -> nn.Sequential:
    """12 -> 8 -> BN -> ReLU -> 8 -> tanh -> 6 -> ReLU -> 3: two hidden->hidden layers."""
    return nn.Sequential(
        nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, 8), nn.Tanh(),
        nn.Linear(8, 6), nn.ReLU(),
        nn.Linear(6, 3),
    )


def equitable_net(layout: str = "tiled", seed: int = 0):
    torch.manual_seed(seed)
    base = deep_mlp().double()
    cloned, partition = clone(base, 2, layout)
    net = make_equitable_nonconstant(cloned, partition, scale=0.3, generator=torch.Generator().manual_seed(seed))
    return base, cloned, net, partition


HIDDEN_TO_HIDDEN = ["3", "5"]


@pytest.mark.parametrize("layout", ["interleaved", "tiled"])
def test_make_equitable_nonconstant_keeps_the_function(layout):
    base, cloned, net, partition = equitable_net(layout)
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for train in (False, True):
        for m in (base, net):
            m.train(train)
        assert torch.allclose(net(x), base(x), atol=1e-12), train
    blocks = weight_layer_blocks(net, partition)
    assert blocks["0"][1] is None and blocks["7"][0] is None  # inputs / outputs are singletons
    modules, clone_modules = dict(net.named_modules()), dict(cloned.named_modules())
    for name in ["0", "7"]:  # first and last layers unchanged
        assert torch.equal(modules[name].weight, clone_modules[name].weight)
    for name in HIDDEN_TO_HIDDEN:
        out_ids, in_ids = blocks[name]
        w = modules[name].weight
        assert block_constancy_residual(w, out_ids, in_ids) > 1e-3
        assert incoming_sums_residual(w, out_ids, in_ids) < 1e-12
        assert outgoing_sums_residual(w, out_ids, in_ids) < 1e-12
        assert torch.equal(modules[name].bias, clone_modules[name].bias)
    assert block_constancy_residual(clone_modules["3"].weight, *blocks["3"]) < 1e-12  # input model untouched


def test_make_equitable_nonconstant_needs_two_hidden_layers():
    model, partition = clone(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)), 2)
    with pytest.raises(ValueError, match="hidden"):
        make_equitable_nonconstant(model, partition, 0.1, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.3), ("momentum", 0.1), ("adam", 0.01)])
def test_equitable_nonconstant_net_stays_on_manifold(optimizer, lr):
    """Remark 2.3: equitable (not identical) clones stay clones; W(t) - W(0) is block-constant."""
    _, _, net, partition = equitable_net("tiled")
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(256, 12, generator=gen, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(12, 3, generator=gen, dtype=torch.float64))
    modules = dict(net.named_modules())
    blocks = weight_layer_blocks(net, partition)
    initial = {n: modules[n].weight.detach().clone() for n in HIDDEN_TO_HIDDEN}
    rows = track_clone_training(net, partition, x, y, optimizer=optimizer, lr=lr, steps=200, batch_size=32,
                                seed=0, record_every=100)
    r2 = [r["value"] for r in rows if r["metric"].startswith("cloning_r2")]
    assert len(r2) == 3 * 2 * len(partition)
    assert min(r2) >= 1 - 1e-6
    loss = [r["value"] for r in rows if r["metric"] == "loss"]
    assert loss[-1] < 0.6 * loss[0]  # it really learned (observed 0.70 -> 0.34 / 0.09 / 0.06)
    for name in HIDDEN_TO_HIDDEN:
        out_ids, in_ids = blocks[name]
        w = modules[name].weight
        assert block_constancy_residual(w, out_ids, in_ids) > 1e-3  # still not identical clones
        assert incoming_sums_residual(w, out_ids, in_ids) < 1e-5
        assert outgoing_sums_residual(w, out_ids, in_ids) < 1e-5
        change = w.detach() - initial[name]
        assert float(change.abs().max()) > 1e-3  # it moved ...
        assert block_constancy_residual(change, out_ids, in_ids) < 1e-9  # ... by a block-constant amount


def test_non_equitable_perturbation_breaks_cloning_in_training():
    """Control: a perturbation with non-zero block sums (not on M_C) does not keep R^2 at 1."""
    torch.manual_seed(0)
    model, partition = clone(deep_mlp().double(), 2, "tiled")
    with torch.no_grad():
        model[3].weight.add_(0.05 * torch.randn(model[3].weight.shape, generator=torch.Generator().manual_seed(1),
                                                dtype=torch.float64))
    x = torch.randn(128, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.randn(128, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rows = track_clone_training(model, partition, x, y, optimizer="sgd", lr=0.1, steps=20, seed=0, record_every=20)
    assert min(r["value"] for r in rows if r["metric"] == "cloning_r2_forward") < 1 - 1e-6


# ---------------------------------------------------------------------------------------------
# Frozen-unit manifold


def frozen_relu_net(dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 2)).to(dtype)
    with torch.no_grad():
        net[0].bias[3] = -100.0  # pre-activation ~ -100 +- a few: dead on every input
    return net


def train_steps(model: nn.Module, optimizer: str, x: torch.Tensor, y: torch.Tensor, steps: int = 50) -> None:
    opt = make_optimizer(model.parameters(), optimizer, lr=0.05 if optimizer != "adam" else 0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()


def frozen_data():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(256, 8, generator=gen, dtype=torch.float64)
    return x, torch.randn(256, 2, generator=gen, dtype=torch.float64)


def test_frozen_units_matches_brute_force():
    net = frozen_relu_net()
    x, _ = frozen_data()
    masks = frozen_units(net, x)
    z = x @ net[0].weight.detach().T + net[0].bias.detach()
    assert masks["1"].tolist() == (z <= 0).all(0).tolist()
    assert masks["1"].tolist() == [i == 3 for i in range(10)]
    assert frozen_layer_units(net, x)["0"].tolist() == masks["1"].tolist()
    assert net.training  # mode restored


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_frozen_relu_unit_keeps_its_incoming_weights_exactly(optimizer):
    """Zero derivative on every input -> zero gradient on incoming weights and bias on every batch.

    For Adam the moments of those entries stay exactly 0, so the update m / (sqrt(v) + eps) is 0.
    A dead ReLU also outputs 0, so its outgoing weights get zero gradient as well.
    """
    net = frozen_relu_net()
    x, y = frozen_data()
    mask = frozen_layer_units(net, x)["0"]
    before = copy.deepcopy(net)
    train_steps(net, optimizer, x, y)
    assert frozen_incoming_change(before, net, "0", mask) == 0.0
    assert frozen_incoming_change(before, net, "0", ~mask) > 1e-3  # the other units did learn
    assert torch.equal(net[2].weight[:, 3], before[2].weight[:, 3])  # outgoing weights of the dead unit
    assert frozen_layer_units(net, x)["0"][3]  # still frozen


def test_saturated_tanh_unit_is_not_exactly_frozen():
    """tanh'(z) > 0 everywhere: a unit at z ~ -4 is 'frozen' only up to a tolerance and still moves (slowly).

    (At z ~ -100, tanh(z) rounds to -1 and 1 - tanh^2 is exactly 0 in floating point, so such a unit
    is numerically, though not mathematically, frozen.)
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 10), nn.Tanh(), nn.Linear(10, 2)).double()
    with torch.no_grad():
        net[0].weight[3] *= 0.1
        net[0].bias[3] = -4.0
    x, y = frozen_data()
    assert not frozen_units(net, x)["1"][3]
    assert frozen_units(net, x, atol=0.01)["1"][3]
    mask = torch.zeros(10, dtype=torch.bool)
    mask[3] = True
    before = copy.deepcopy(net)
    train_steps(net, "sgd", x, y)
    saturated_change = frozen_incoming_change(before, net, "0", mask)
    other_change = frozen_incoming_change(before, net, "0", ~mask)
    assert 0.0 < saturated_change < 0.05 * other_change
