"""Expert-level plasticity diagnostics for the MoE transformer (spec section 3): load, dormancy, duplicates, clones.

Units here are whole experts. An expert is *dormant* when it receives less than ``tau / E`` of the (token, slot)
assignments (the ReDo rule applied to routing share). Two experts are *duplicates* when the cosine similarity of
their flattened weights (or of their outputs on probe inputs) is at least ``threshold``.

:func:`clone_experts` puts a layer on the cloned-expert manifold: target experts become exact copies of a source
expert, weights and router rows alike. Clones then get exactly equal router probabilities, and the ranking
breaks that tie toward the **lower expert index** (stable sort, see :func:`lopkit.moe.model.rank_experts`).
So under hard top-k, a k boundary that falls between two clones sends the token only to the lower-index
clone, which alone gets the gradient: hard routing leaves the manifold by itself. In soft mode with every
expert ranked and active (k = k_pre = E) both clones always get the same weight, so SGD and Adam keep them
exactly equal (tests/test_moe_experts.py checks both).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .model import LayerRouting, MoEFeedForward, MoETransformer

__all__ = [
    "expert_load",
    "dormant_expert_mask",
    "dormant_expert_fraction",
    "expert_weight_similarity",
    "expert_output_similarity",
    "duplicate_expert_pairs",
    "duplicate_expert_fraction",
    "expert_router_norms",
    "load_entropy",
    "expert_diagnostic_rows",
    "clone_experts",
]


def expert_load(routing: LayerRouting, n_experts: int) -> torch.Tensor:
    """Fraction of (token, slot) assignments that go to each expert: (E,), sums to 1."""
    index = routing.topk_index.detach().reshape(-1)
    if index.numel() == 0:
        raise ValueError("routing holds no tokens; pass a non-empty probe batch")
    return torch.bincount(index, minlength=n_experts).to(torch.float64) / index.numel()


def dormant_expert_mask(load: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Experts whose load is below ``tau / E`` (tau = 1 means "below a fair share")."""
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    return load < tau / load.numel()


def dormant_expert_fraction(load: torch.Tensor, tau: float = 0.1) -> float:
    """Share of experts that are dormant (:func:`dormant_expert_mask`)."""
    return float(dormant_expert_mask(load, tau).float().mean())


def _cosine_matrix(rows: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of the rows of a (E, n) matrix; a zero row has similarity 0 to everything."""
    unit = F.normalize(rows.to(torch.float64), dim=1)
    return unit @ unit.T


def expert_weight_similarity(layer: MoEFeedForward) -> torch.Tensor:
    """(E, E) cosine similarity between the experts' flattened weights (gate, up and down together)."""
    flat = torch.cat([layer.w_gate_up.detach().flatten(1), layer.w_down.detach().flatten(1)], dim=1)
    return _cosine_matrix(flat)


@torch.no_grad()
def expert_output_similarity(layer: MoEFeedForward, h: torch.Tensor) -> torch.Tensor:
    """(E, E) cosine similarity between the experts' outputs on probe inputs ``h`` (N, d), each flattened."""
    if h.dim() != 2 or h.shape[1] != layer.w_gate_up.shape[1]:
        raise ValueError(f"h must have shape (N, {layer.w_gate_up.shape[1]}), got {tuple(h.shape)}")
    outputs = torch.stack([layer.expert_forward(e, h).flatten() for e in range(layer.n_experts)])
    return _cosine_matrix(outputs)


def duplicate_expert_pairs(sim: torch.Tensor, threshold: float = 0.99) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, whose similarity is at least ``threshold``."""
    upper = torch.triu(sim >= threshold, diagonal=1)
    return [tuple(pair) for pair in upper.nonzero().tolist()]


def duplicate_expert_fraction(sim: torch.Tensor, threshold: float = 0.99) -> float:
    """Share of experts that have at least one near-duplicate (similarity >= threshold with another expert)."""
    close = (sim >= threshold) & ~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    return float(close.any(dim=1).float().mean())


def expert_router_norms(layer: MoEFeedForward) -> torch.Tensor:
    """L2 norm of each expert's router row: (E,)."""
    return layer.router.weight.detach().norm(dim=1)


def load_entropy(load: torch.Tensor) -> float:
    """Entropy of the load divided by log E: 1 = perfectly balanced, 0 = everything on one expert."""
    n_experts = load.numel()
    if n_experts < 2:
        return 1.0
    p = load.to(torch.float64) / load.sum()
    entropy = -torch.special.xlogy(p, p).sum()  # 0 log 0 = 0
    return float(entropy / math.log(n_experts))


def _capture_moe_inputs(model: MoETransformer, probe_tokens: torch.Tensor, k: int) -> tuple[list, list]:
    """Run a hard top-k forward without grad; return each layer's routing and the inputs its MoE layer saw."""
    inputs: list[torch.Tensor] = []
    handles = [
        block.moe.register_forward_hook(lambda _m, args, _out: inputs.append(args[0].detach()))
        for block in model.blocks
    ]
    try:
        with torch.no_grad():
            out = model(probe_tokens, k, return_details=True)
    finally:
        for handle in handles:
            handle.remove()
    return out.details, inputs


def expert_diagnostic_rows(
    model: MoETransformer,
    probe_tokens: torch.Tensor,
    k: int,
    step: int,
    *,
    tau: float = 0.1,
    threshold: float = 0.99,
    max_probe_inputs: int = 512,
) -> list[dict]:
    """Tidy rows {step, task=k, layer="layer{i}", metric, value} of expert diagnostics at hard top-k.

    Metrics per layer: expert_load_entropy, dormant_expert_fraction, duplicate_expert_fraction_weight,
    duplicate_expert_fraction_output (on at most ``max_probe_inputs`` of the layer's own inputs),
    max_expert_load, router_weight_norm (mean router row norm).
    """
    was_training = model.training
    model.eval()
    try:
        routings, inputs = _capture_moe_inputs(model, probe_tokens, k)
        rows = []
        for i, (block, routing, h) in enumerate(zip(model.blocks, routings, inputs)):
            layer = block.moe
            load = expert_load(routing, layer.n_experts)
            weight_sim = expert_weight_similarity(layer)
            output_sim = expert_output_similarity(layer, h[:max_probe_inputs])
            values = {
                "expert_load_entropy": load_entropy(load),
                "dormant_expert_fraction": dormant_expert_fraction(load, tau),
                "duplicate_expert_fraction_weight": duplicate_expert_fraction(weight_sim, threshold),
                "duplicate_expert_fraction_output": duplicate_expert_fraction(output_sim, threshold),
                "max_expert_load": float(load.max()),
                "router_weight_norm": float(expert_router_norms(layer).mean()),
            }
            rows.extend(
                {"step": int(step), "task": int(k), "layer": f"layer{i}", "metric": name, "value": float(value)}
                for name, value in values.items()
            )
        return rows
    finally:
        model.train(was_training)


@torch.no_grad()
def clone_experts(model: MoETransformer, layer: int, source: int, targets: Sequence[int]) -> None:
    """Make ``targets`` exact copies of expert ``source`` in block ``layer``: expert weights and router rows."""
    moe = model.blocks[layer].moe
    bad = [e for e in (source, *targets) if not 0 <= e < moe.n_experts]
    if bad:
        raise ValueError(f"expert indices {bad} out of range 0..{moe.n_experts - 1}")
    for target in targets:
        moe.w_gate_up[target].copy_(moe.w_gate_up[source])
        moe.w_down[target].copy_(moe.w_down[source])
        moe.router.weight[target].copy_(moe.router.weight[source])
