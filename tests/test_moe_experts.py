"""Expert diagnostics against independent numpy formulas, and the cloned-expert manifold under SGD and Adam."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lopkit.moe.experts import (
    clone_experts,
    dormant_expert_fraction,
    dormant_expert_mask,
    duplicate_expert_fraction,
    duplicate_expert_pairs,
    expert_diagnostic_rows,
    expert_load,
    expert_output_similarity,
    expert_router_norms,
    expert_weight_similarity,
    load_entropy,
)
from lopkit.moe.model import MODEL_PRESETS, LayerRouting, MoETransformer

SMOKE = MODEL_PRESETS["smoke"]


def make_model(seed=0, **overrides):
    return MoETransformer.from_preset("smoke", seed=seed, **overrides)


def probe(batch=3, length=16, seed=2):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def numpy_cosine(rows):
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1)
    return rows @ rows.T / np.outer(norms, norms)


def test_expert_load_counts_token_slot_assignments():
    index = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    routing = LayerRouting(torch.full((4, 5), 0.2), index, torch.full((4, 2), 0.2))
    load = expert_load(routing, 5)
    expected = np.bincount(index.numpy().ravel(), minlength=5) / index.numel()
    np.testing.assert_allclose(load.numpy(), expected)
    assert load[4] == 0 and math.isclose(float(load.sum()), 1.0)


def test_dormant_experts_below_tau_over_e():
    load = torch.tensor([0.5, 0.3, 0.175, 0.015, 0.01])  # E = 5, fair share 0.2
    assert dormant_expert_mask(load, tau=0.1).tolist() == [False, False, False, True, True]  # below 0.02
    assert dormant_expert_mask(load, tau=1.0).tolist() == [False, False, True, True, True]
    assert dormant_expert_fraction(load, tau=0.1) == pytest.approx(0.4)
    assert dormant_expert_fraction(load, tau=0.0) == 0.0


def test_load_entropy_against_numpy():
    assert load_entropy(torch.full((8,), 1 / 8)) == pytest.approx(1.0)
    assert load_entropy(torch.tensor([1.0, 0, 0, 0])) == pytest.approx(0.0)
    load = torch.tensor([0.5, 0.25, 0.125, 0.125, 0.0])
    p = load.numpy()[load.numpy() > 0]
    assert load_entropy(load) == pytest.approx(-(p * np.log(p)).sum() / np.log(5))


def test_weight_and_output_similarity_against_numpy():
    model = make_model()
    layer = model.blocks[1].moe
    flat = np.concatenate(
        [layer.w_gate_up.detach().flatten(1).numpy(), layer.w_down.detach().flatten(1).numpy()], axis=1
    )
    np.testing.assert_allclose(expert_weight_similarity(layer).numpy(), numpy_cosine(flat), atol=1e-10)
    h = torch.randn(20, model.config.d_model, generator=torch.Generator().manual_seed(0))
    hidden = layer.expert_hidden
    outs = []
    for e in range(layer.n_experts):
        w = layer.w_gate_up[e].detach()
        gate, up = h @ w[:, :hidden], h @ w[:, hidden:]
        outs.append(((gate * torch.sigmoid(gate)) * up @ layer.w_down[e].detach()).flatten().numpy())
    np.testing.assert_allclose(expert_output_similarity(layer, h).numpy(), numpy_cosine(outs), atol=1e-6)
    norms = np.linalg.norm(layer.router.weight.detach().numpy(), axis=1)
    np.testing.assert_allclose(expert_router_norms(layer).numpy(), norms, rtol=1e-6)


def test_duplicates_found_after_cloning():
    model = make_model()
    layer = model.blocks[0].moe
    sim = expert_weight_similarity(layer)
    assert duplicate_expert_pairs(sim) == [] and duplicate_expert_fraction(sim) == 0.0
    clone_experts(model, 0, source=2, targets=[5, 6])
    sim = expert_weight_similarity(layer)
    assert duplicate_expert_pairs(sim) == [(2, 5), (2, 6), (5, 6)]
    assert duplicate_expert_fraction(sim) == pytest.approx(3 / layer.n_experts)
    h = torch.randn(10, model.config.d_model)
    assert duplicate_expert_pairs(expert_output_similarity(layer, h)) == [(2, 5), (2, 6), (5, 6)]
    assert torch.equal(layer.router.weight[5], layer.router.weight[2])
    with pytest.raises(ValueError, match="out of range"):
        clone_experts(model, 0, source=0, targets=[layer.n_experts])


def test_diagnostic_rows_are_tidy_and_detect_a_collapsed_layer():
    model = make_model()
    n_experts = model.config.n_experts
    clone_experts(model, 0, source=0, targets=list(range(1, n_experts)))  # layer 0: all experts identical
    rows = expert_diagnostic_rows(model, probe(), k=1, step=7)
    metrics = {
        "expert_load_entropy",
        "dormant_expert_fraction",
        "duplicate_expert_fraction_weight",
        "duplicate_expert_fraction_output",
        "max_expert_load",
        "router_weight_norm",
    }
    assert len(rows) == model.config.n_layers * len(metrics)
    assert all(set(r) == {"step", "task", "layer", "metric", "value"} for r in rows)
    assert {r["metric"] for r in rows} == metrics and {r["layer"] for r in rows} == {"layer0", "layer1"}
    assert all(r["step"] == 7 and r["task"] == 1 and isinstance(r["value"], float) for r in rows)
    layer0 = {r["metric"]: r["value"] for r in rows if r["layer"] == "layer0"}
    # equal router rows -> equal probabilities -> ties go to expert 0 for every token
    assert layer0["max_expert_load"] == 1.0
    assert layer0["dormant_expert_fraction"] == pytest.approx((n_experts - 1) / n_experts)
    assert layer0["expert_load_entropy"] == pytest.approx(0.0)
    assert layer0["duplicate_expert_fraction_weight"] == 1.0
    assert layer0["duplicate_expert_fraction_output"] == 1.0
    norm0 = float(model.blocks[0].moe.router.weight[0].detach().norm())
    assert layer0["router_weight_norm"] == pytest.approx(norm0, rel=1e-5)
    layer1 = {r["metric"]: r["value"] for r in rows if r["layer"] == "layer1"}
    assert layer1["duplicate_expert_fraction_weight"] == 0.0 and layer1["max_expert_load"] < 1.0
    assert model.training  # mode restored


# ----------------------------------------------------------------------------------------- cloned-expert manifold

CLONE_PARAMS = ("w_gate_up", "w_down")


def clone_gap(layer, a, b):
    """Differences between experts a and b: expert weights and router rows."""
    return [(getattr(layer, n)[a] - getattr(layer, n)[b]).detach().clone() for n in CLONE_PARAMS] + [
        (layer.router.weight[a] - layer.router.weight[b]).detach().clone()
    ]


def train_soft_all_experts(model, optimizer_name, steps=50):
    """Next-token CE, soft mode with every expert ranked and active (k = k_pre = E), no aux loss."""
    params = model.parameters()
    optimizer = torch.optim.SGD(params, lr=0.5) if optimizer_name == "sgd" else torch.optim.Adam(params, lr=1e-3)
    toks = probe(4, 17)
    for _ in range(steps):
        logits = model(toks[:, :-1], model.config.k_pre, soft=True).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_clones_stay_equal_in_soft_mode_and_split_with_noise(optimizer_name):
    n_experts = SMOKE["n_experts"]
    exact = make_model(k_pre=n_experts)
    clone_experts(exact, 0, source=0, targets=[1, 2])
    start = exact.blocks[0].moe.w_gate_up[0].detach().clone()
    train_soft_all_experts(exact, optimizer_name)
    layer = exact.blocks[0].moe
    assert (layer.w_gate_up[0] - start).abs().max() > 1e-3  # the clones did train
    for pair in ((0, 1), (0, 2)):
        assert max(float(g.abs().max()) for g in clone_gap(layer, *pair)) < 1e-6

    noisy = make_model(k_pre=n_experts)
    clone_experts(noisy, 0, source=0, targets=[1, 2])
    layer = noisy.blocks[0].moe
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (layer.w_gate_up, layer.w_down, layer.router.weight):
            p[1].add_(1e-4 * torch.randn(p[1].shape, generator=generator))
    before = clone_gap(layer, 0, 1)
    train_soft_all_experts(noisy, optimizer_name)
    drift = max(float((after - b).abs().max()) for after, b in zip(clone_gap(layer, 0, 1), before))
    assert drift > 5e-6  # off the manifold the two experts no longer receive equal updates
    assert max(float(g.abs().max()) for g in clone_gap(layer, 0, 2)) < 1e-6  # the untouched clone pair stays


def test_hard_routing_ties_send_clones_apart():
    model = make_model()
    n_experts = model.config.n_experts
    clone_experts(model, 0, source=0, targets=list(range(1, n_experts)))  # every expert (and router row) equal
    layer = model.blocks[0].moe
    out = model(probe(), 2, return_details=True)
    assert out.details[0].topk_index.unique().tolist() == [0, 1]  # ties -> lowest indices, same for every token
    out.logits.logsumexp(-1).mean().backward()
    grads = layer.w_down.grad.flatten(1).abs().amax(1)
    assert grads[0] > 0 and torch.equal(grads[0], grads[1])
    assert (grads[2:] == 0).all()  # the other clones get nothing: a hard k boundary leaves the manifold
