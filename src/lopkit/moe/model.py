"""A small byte-level decoder-only Mixture-of-Experts transformer with a dialable top-k (MoE-PHDS, spec 1.2/1.6).

Architecture: byte embedding + learned positions; ``n_layers`` pre-norm blocks (RMSNorm -> causal multi-head
attention -> residual; RMSNorm -> MoE feed-forward -> residual); final RMSNorm; the LM head is **tied** to the
byte embedding (logits = h @ embedding.T). Each MoE feed-forward has a linear router d_model -> E (softmax) and E
SwiGLU experts ``down(silu(x W_gate) * (x W_up))`` stored as stacked parameters ``w_gate_up`` (E, d, 2H) and
``w_down`` (E, H, d).

Routing (both modes rank experts by router probability with a *stable* descending sort, so equal
probabilities are broken toward the lower expert index; ``torch.topk`` gives no such guarantee):

* hard (``soft=False``, inference): the top-k experts of each token get weight p_e (divided by their sum when
  ``norm_topk_prob``); only those k experts are computed, so cost grows with k. Any 1 <= k <= E is allowed.
* soft (``soft=True``, PHDS training mask): the top-k_pre experts are ranked; the first k get p_e, ranks
  k..k_pre-1 get ``eps``, the rest 0; renormalised only when ``norm_topk_prob``. All k_pre ranked experts are
  computed, so shapes and cost do not depend on k (1 <= k <= k_pre).

The Switch load-balancing loss ``E * sum_e f_e P_e`` (f_e: fraction of (token, slot) assignments among the k
*active* experts, P_e: mean router probability) is summed over layers and returned as ``aux_loss``; the
training code multiplies it by ``config.aux_loss_coef``.

Per-k norms (spec 1.2c): :meth:`MoETransformer.add_per_k_norms` gives every RMSNorm one copy of its weight per
trained k; ``forward(k)`` then uses the copy of the nearest trained k (ties -> larger k). Load a state dict that
holds such copies with :func:`load_moe_state`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lopkit.configs import require

__all__ = [
    "MoEModelConfig",
    "MODEL_PRESETS",
    "MoEOutput",
    "LayerRouting",
    "RMSNorm",
    "MoEFeedForward",
    "MoEBlock",
    "MoETransformer",
    "rank_experts",
    "routing_weights",
    "load_balancing_loss",
    "nearest_trained_k",
    "per_k_norm_ks_in_state",
    "load_moe_state",
]

DISPATCH_MODES = ("loop", "padded")


@dataclass
class MoEModelConfig:
    """Shape of the MoE transformer; ``dispatch`` picks how tokens reach experts (``loop`` measured fastest on CPU)."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    context: int = 128
    n_experts: int = 16
    expert_hidden: int = 88  # SwiGLU width: 2,483,328 parameters at the defaults (spec: ~2.5M)
    k_pre: int = 4
    norm_topk_prob: bool = False
    aux_loss_coef: float = 0.01
    dispatch: str = "loop"

    def validate(self) -> None:
        """Raise ConfigError for impossible shapes or values."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "context", "n_experts", "expert_hidden"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        require(self.vocab_size >= 2, f"vocab_size must be at least 2, got {self.vocab_size}")
        require(
            self.d_model % self.n_heads == 0,
            f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}); change one of them",
        )
        require(
            isinstance(self.k_pre, int) and 1 <= self.k_pre <= self.n_experts,
            f"k_pre must be an integer in 1..n_experts={self.n_experts}, got {self.k_pre!r}",
        )
        require(
            math.isfinite(self.aux_loss_coef) and self.aux_loss_coef >= 0,
            f"aux_loss_coef must be a finite number >= 0, got {self.aux_loss_coef!r}",
        )
        require(
            self.dispatch in DISPATCH_MODES,
            f"dispatch must be one of {', '.join(DISPATCH_MODES)}, got {self.dispatch!r}",
        )


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"d_model": 32, "n_layers": 2, "n_experts": 8, "k_pre": 2, "context": 64, "expert_hidden": 32},
    "default": {},
}


@dataclass
class LayerRouting:
    """One MoE layer's routing for N = B*T tokens: probabilities and the k *active* experts (eps slots excluded)."""

    router_probs: torch.Tensor  # (N, E)
    topk_index: torch.Tensor  # (N, k), ranked, ties -> lower expert index
    expert_weights: torch.Tensor  # (N, k), the weights applied to those experts


@dataclass
class MoEOutput:
    """Model output: logits (B, T, V), summed Switch aux loss (scalar), per-layer routing when requested."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    details: list[LayerRouting] | None = None


# ----------------------------------------------------------------------------------------------------- routing


def rank_experts(probs: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-m router probabilities and expert indices, descending; ties go to the lower expert index (stable sort)."""
    values, indices = torch.sort(probs, dim=-1, descending=True, stable=True)
    return values[..., :m], indices[..., :m]


def routing_weights(
    ranked_probs: torch.Tensor, k: int, *, soft: bool, eps: float, normalize: bool
) -> torch.Tensor:
    """Weights for ranked slots: p for the first k slots, eps for the rest (soft) and optional renormalisation.

    In hard mode ``ranked_probs`` holds exactly k slots; in soft mode it holds k_pre slots.
    """
    if soft:
        keep = torch.arange(ranked_probs.shape[-1], device=ranked_probs.device) < k
        weights = torch.where(keep, ranked_probs, torch.full_like(ranked_probs, eps))
    else:
        weights = ranked_probs
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights


def load_balancing_loss(router_probs: torch.Tensor, topk_index: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch loss ``E * sum_e f_e P_e``: f = share of (token, slot) assignments, P = mean router probability.

    Equals 1 when routing and probabilities are uniform; gradients flow through P only.
    """
    counts = torch.bincount(topk_index.reshape(-1), minlength=n_experts).to(router_probs.dtype)
    fraction_routed = counts / topk_index.numel()
    mean_prob = router_probs.mean(dim=0)
    return n_experts * (fraction_routed * mean_prob).sum()


def nearest_trained_k(k: int, trained: Sequence[int]) -> int:
    """The trained k closest to ``k``; a tie between two trained values picks the larger one."""
    if not trained:
        raise ValueError("no trained k values: call add_per_k_norms first")
    return min(trained, key=lambda t: (abs(t - k), -t))


# ------------------------------------------------------------------------------------------------------ layers


class RMSNorm(nn.Module):
    """RMSNorm with a shared weight and optional per-k copies (``per_k["k3"]``) selected by a norm key."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.per_k = nn.ParameterDict()

    def add_copies(self, ks: Sequence[int]) -> None:
        """Add one copy of the current shared weight per k (keys ``k{k}``)."""
        for k in ks:
            self.per_k[f"k{k}"] = nn.Parameter(self.weight.detach().clone())

    def forward(self, x: torch.Tensor, norm_key: str | None = None) -> torch.Tensor:
        """Normalise the last axis with the shared weight (``norm_key=None``) or the named per-k copy."""
        weight = self.weight if norm_key is None else self.per_k[norm_key]
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention via scaled_dot_product_attention(is_causal=True); no biases."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, d)."""
        batch, length, d_model = x.shape
        head_dim = d_model // self.n_heads
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, head_dim).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(attended.transpose(1, 2).reshape(batch, length, d_model))


def _swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One expert: down(silu(x W_gate) * (x W_up)); ``w_gate_up`` is (d, 2H) with gate columns first."""
    gate, up = (x @ w_gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_down


def _group_by_expert(slot_index: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Sort (token, slot) assignments by expert: returns order into flat slots, token ids in that order, counts."""
    flat_experts = slot_index.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    tokens = order // slot_index.shape[1]
    counts = torch.bincount(flat_experts, minlength=n_experts).tolist()
    return order, tokens, counts


def dispatch_loop(
    h: torch.Tensor, slot_index: torch.Tensor, slot_weight: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """sum_slots w * expert(h): gather tokens sorted by expert once, run each expert on its contiguous slice."""
    order, tokens, counts = _group_by_expert(slot_index, w_gate_up.shape[0])
    gathered = h.index_select(0, tokens)
    outputs, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            outputs.append(_swiglu(gathered[start : start + count], w_gate_up[expert], w_down[expert]))
            start += count
    weighted = torch.cat(outputs) * slot_weight.reshape(-1)[order].unsqueeze(-1)
    return torch.zeros_like(h).index_add_(0, tokens, weighted)


def dispatch_padded(
    h: torch.Tensor, slot_index: torch.Tensor, slot_weight: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """Same result as :func:`dispatch_loop` with one batched matmul over experts padded to the largest group."""
    n_experts = w_gate_up.shape[0]
    order, tokens, counts = _group_by_expert(slot_index, n_experts)
    sorted_experts = slot_index.reshape(-1)[order]
    starts = torch.cumsum(torch.tensor([0] + counts[:-1], device=h.device), dim=0)
    position = torch.arange(order.numel(), device=h.device) - starts[sorted_experts]
    padded = h.new_zeros(n_experts, max(counts), h.shape[1])
    padded = padded.index_put((sorted_experts, position), h.index_select(0, tokens))
    gate, up = torch.bmm(padded, w_gate_up).chunk(2, dim=-1)
    expert_out = torch.bmm(F.silu(gate) * up, w_down)[sorted_experts, position]
    weighted = expert_out * slot_weight.reshape(-1)[order].unsqueeze(-1)
    return torch.zeros_like(h).index_add_(0, tokens, weighted)


_DISPATCH = {"loop": dispatch_loop, "padded": dispatch_padded}


class MoEFeedForward(nn.Module):
    """Router (d -> E, softmax) and E stacked SwiGLU experts; hard or soft (PHDS) top-k dispatch."""

    def __init__(self, d_model: int, n_experts: int, expert_hidden: int, dispatch: str = "loop"):
        super().__init__()
        self.n_experts = n_experts
        self.expert_hidden = expert_hidden
        self.dispatch = dispatch
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, d_model, 2 * expert_hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, expert_hidden, d_model))

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Output of one expert on inputs (N, d)."""
        return _swiglu(x, self.w_gate_up[expert], self.w_down[expert])

    def forward(
        self, h: torch.Tensor, k: int, *, k_pre: int, soft: bool, eps: float, normalize: bool
    ) -> tuple[torch.Tensor, LayerRouting]:
        """(N, d) -> (N, d) and the layer's routing (active top-k only)."""
        probs = torch.softmax(self.router(h), dim=-1)
        ranked_probs, ranked_index = rank_experts(probs, k_pre if soft else k)
        weights = routing_weights(ranked_probs, k, soft=soft, eps=eps, normalize=normalize)
        out = _DISPATCH[self.dispatch](h, ranked_index, weights, self.w_gate_up, self.w_down)
        return out, LayerRouting(probs, ranked_index[:, :k], weights[:, :k])


class MoEBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)); x + moe(norm2(x))."""

    def __init__(self, config: MoEModelConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.d_model)
        self.attn = CausalSelfAttention(config.d_model, config.n_heads)
        self.norm2 = RMSNorm(config.d_model)
        self.moe = MoEFeedForward(config.d_model, config.n_experts, config.expert_hidden, config.dispatch)

    def forward(self, x: torch.Tensor, norm_key: str | None, **route: Any) -> tuple[torch.Tensor, LayerRouting]:
        """(B, T, d) -> (B, T, d) and the MoE routing of the block."""
        x = x + self.attn(self.norm1(x, norm_key))
        moe_out, routing = self.moe(self.norm2(x, norm_key).reshape(-1, x.shape[-1]), **route)
        return x + moe_out.view_as(x), routing


# ------------------------------------------------------------------------------------------------------- model


class MoETransformer(nn.Module):
    """Byte-level MoE decoder whose top-k is chosen per call (hard top-k for inference, soft PHDS mask for training).

    Initialisation: N(0, 0.02) for embeddings, attention, router and expert input weights; the residual output
    projections (attention out, expert down) use 0.02 / sqrt(2 * n_layers). Pass ``seed`` for an init that does
    not touch the global RNG.
    """

    def __init__(self, config: MoEModelConfig, seed: int | None = None):
        super().__init__()
        config.validate()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.context, config.d_model)
        self.blocks = nn.ModuleList(MoEBlock(config) for _ in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model)
        self.per_k_norm_ks: tuple[int, ...] = ()
        self._initialise(seed)

    @classmethod
    def from_preset(cls, preset: str = "default", seed: int | None = None, **overrides: Any) -> "MoETransformer":
        """A model of a :data:`MODEL_PRESETS` size (``smoke`` or ``default``) with field overrides, validated."""
        from lopkit.configs import ConfigError, build_config

        if preset not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
        return cls(build_config(MoEModelConfig, MODEL_PRESETS[preset], overrides), seed=seed)

    def _initialise(self, seed: int | None) -> None:
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if "norm" in name:
                    param.fill_(1.0)
                else:
                    std = residual_std if name.endswith(("attn.out.weight", "w_down")) else 0.02
                    param.copy_(torch.randn(param.shape, generator=generator) * std)

    # ------------------------------------------------------------------------------------------ per-k norms
    def add_per_k_norms(self, ks: Sequence[int]) -> None:
        """Give every RMSNorm one copy of its weight per k in ``ks`` (from the current shared weight)."""
        ks = tuple(sorted(int(k) for k in ks))
        if self.per_k_norm_ks:
            raise ValueError(f"per-k norms were already added for k={list(self.per_k_norm_ks)}; add them once")
        if not ks or len(set(ks)) != len(ks) or not all(1 <= k <= self.config.n_experts for k in ks):
            raise ValueError(f"ks must be distinct integers in 1..n_experts={self.config.n_experts}, got {list(ks)}")
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.add_copies(ks)
        self.per_k_norm_ks = ks

    def norm_key(self, k: int) -> str | None:
        """Name of the per-k norm copy that ``forward(k)`` uses (None while norms are shared)."""
        if not self.per_k_norm_ks:
            return None
        return f"k{nearest_trained_k(k, self.per_k_norm_ks)}"

    # ---------------------------------------------------------------------------------------------- forward
    def _check_call(self, tokens: torch.Tensor, k: int, soft: bool, eps: float) -> None:
        cfg = self.config
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int):
            raise ValueError(
                "tokens must be an integer tensor of shape (batch, time), got "
                f"{type(tokens).__name__} {tuple(getattr(tokens, 'shape', ()))} {getattr(tokens, 'dtype', '')}"
            )
        if tokens.shape[1] > cfg.context or tokens.shape[1] == 0:
            raise ValueError(f"sequence length {tokens.shape[1]} must be in 1..context={cfg.context}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in 0..{cfg.vocab_size - 1}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= cfg.n_experts:
            raise ValueError(f"k must be an integer in 1..n_experts={cfg.n_experts}, got {k!r}")
        if soft and k > cfg.k_pre:
            raise ValueError(f"soft mode needs k <= k_pre={cfg.k_pre}, got k={k}; use hard mode for larger k")
        if soft and not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")

    def forward(
        self,
        tokens: torch.Tensor,
        k: int | None = None,
        *,
        soft: bool = False,
        eps: float = 1e-6,
        return_details: bool = False,
    ) -> MoEOutput:
        """Logits (B, T, V) for byte tokens (B, T) with k active experts per token (k=None -> k_pre)."""
        cfg = self.config
        k = cfg.k_pre if k is None else k
        self._check_call(tokens, k, soft, eps)
        norm_key = self.norm_key(k)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        route = dict(k=k, k_pre=cfg.k_pre, soft=soft, eps=float(eps), normalize=cfg.norm_topk_prob)
        routings = []
        for block in self.blocks:
            x, routing = block(x, norm_key, **route)
            routings.append(routing)
        logits = self.final_norm(x, norm_key) @ self.token_embedding.weight.T
        aux_loss = torch.stack(
            [load_balancing_loss(r.router_probs, r.topk_index, cfg.n_experts) for r in routings]
        ).sum()
        return MoEOutput(logits, aux_loss, routings if return_details else None)

    # ---------------------------------------------------------------------------------------------- costing
    def flops_per_token(self, k: int) -> float:
        """Forward FLOPs per token at hard top-k: 2 x multiply-adds of the matmuls (norms/softmax ignored).

        Per layer: attention projections 4 d^2, attention scores and values at full context 2 T d, router d E,
        k experts 3 d H each; plus the tied LM head d V:
        ``2 * (n_layers * (4 d^2 + 2 T d + d E + 3 k d H) + d V)``; slope in k = 6 d H n_layers.
        """
        c = self.config
        if not 1 <= k <= c.n_experts:
            raise ValueError(f"k must be in 1..n_experts={c.n_experts}, got {k}")
        d = c.d_model
        per_layer = 4 * d * d + 2 * c.context * d + d * c.n_experts + 3 * k * d * c.expert_hidden
        return float(2 * (c.n_layers * per_layer + d * c.vocab_size))

    def num_parameters(self) -> int:
        """Number of distinct parameters (tied head counted once; per-k norm copies included)."""
        return sum(p.numel() for p in self.parameters())


# ------------------------------------------------------------------------------------------------ state loading


def per_k_norm_ks_in_state(state: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """The k values whose per-k norm copies a state dict holds (empty tuple for shared norms)."""
    ks = set()
    for key in state:
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] == "per_k" and parts[-1].startswith("k"):
            ks.add(int(parts[-1][1:]))
    return tuple(sorted(ks))


def load_moe_state(model: MoETransformer, state: Mapping[str, torch.Tensor]) -> MoETransformer:
    """Load a state dict into ``model``, first adding the per-k norms the state holds (if the model lacks them)."""
    ks = per_k_norm_ks_in_state(state)
    if ks and not model.per_k_norm_ks:
        model.add_per_k_norms(ks)
    elif ks != model.per_k_norm_ks:
        raise ValueError(
            f"the state holds per-k norms for k={list(ks)} but the model has k={list(model.per_k_norm_ks)}; "
            "load it into a fresh MoETransformer"
        )
    model.load_state_dict(state)
    return model
