"""Helpers shared by the MoE-PHDS training stages: schedules, k sampling, losses, model (re)building, cached data."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F

from lopkit.configs import ConfigError, require
from lopkit.schedules import warmup_cosine_factor


# keys of the independent random streams derived from the run seed
_INIT_KEY, _DATA_KEY, _VAL_KEY, _K_KEY = 11, 12, 13, 14

#: Fields of :class:`lopkit.moe.model.MoEModelConfig` that the pretrain config carries (``vocab_size`` is 256).
MODEL_FIELDS = ("d_model", "n_layers", "n_heads", "context", "n_experts", "expert_hidden", "k_pre",
                "norm_topk_prob", "aux_loss_coef")


# ------------------------------------------------------------------------------------------ pure helpers


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of optimiser step ``step`` (0-based): the one warm-up + cosine schedule of :mod:`lopkit.schedules`."""
    return base_lr * warmup_cosine_factor(step, total_steps, warmup_steps, min_lr_ratio)


def anchor_weight(step: int, total_steps: int, anchor_fraction: float) -> float:
    """``a_t`` of the curriculum: 0 before the anchor phase, then rising linearly to exactly 1 at the last step.

    The anchor phase is the last ``n_anchor = round(anchor_fraction * total_steps)`` steps (at least 1 when
    ``anchor_fraction > 0``); step ``t`` of it (0-based ``t - start``) has ``a_t = (t - start + 1) / n_anchor``.
    """
    if anchor_fraction <= 0:
        return 0.0
    n_anchor = max(1, int(round(anchor_fraction * total_steps)))
    start = total_steps - n_anchor
    if step < start:
        return 0.0
    return min(1.0, (step - start + 1) / n_anchor)


def k_distribution(step: int, total_steps: int, k_train: Sequence[int], anchor_k: int | None,
                   anchor_fraction: float) -> dict[int, float]:
    """``q_t(k) = (1 - a_t) Uniform(k_train) + a_t delta(anchor_k)`` as ``{k: probability}`` (sorted by k)."""
    ks = sorted(set(int(k) for k in k_train))
    if not ks:
        raise ValueError("k_train must hold at least one k")
    weight = 0.0 if anchor_k is None else anchor_weight(step, total_steps, anchor_fraction)
    support = sorted(set(ks) | ({int(anchor_k)} if anchor_k is not None else set()))
    probs = {k: ((1.0 - weight) / len(ks) if k in ks else 0.0) for k in support}
    if anchor_k is not None:
        probs[int(anchor_k)] += weight
    return probs


def sample_k(probs: dict[int, float], generator: torch.Generator) -> int:
    """One k drawn from ``probs`` with ``generator`` (a single uniform draw, inverse-CDF)."""
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    cumulative = 0.0
    last = None
    for k, p in probs.items():
        if p <= 0:
            continue
        cumulative += p
        last = k
        if u < cumulative:
            return int(k)
    if last is None:
        raise ValueError(f"k distribution has no positive mass: {probs}")
    return int(last)


def selection_steps(total_steps: int, select_every: int, select_burn_in: float) -> list[int]:
    """Steps (counts of optimiser steps done) at which checkpoint selection evaluates: after the burn-in, every
    ``select_every`` steps, and always the last step."""
    start = int(math.floor(select_burn_in * total_steps))
    steps = [s for s in range(select_every, total_steps + 1, select_every) if s > start]
    if total_steps not in steps:
        steps.append(total_steps)
    return steps


def check_finite_loss(loss: torch.Tensor, stage: str, step: int, hint: str) -> None:
    """Raise FloatingPointError naming the stage and step when ``loss`` is NaN or infinite."""
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError(f"{stage}: the training loss became {float(loss.detach())} at step {step}; {hint}")


def masked_next_byte_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``logits [B,T,V]`` against ``targets [B,T]`` over positions where ``mask`` is True."""
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    if mask is None:
        return flat.mean()
    weights = mask.reshape(-1).to(flat.dtype)
    count = weights.sum()
    if float(count) == 0:
        raise ValueError("the SFT batch has no answer bytes to train on (loss_mask is all False)")
    return (flat * weights).sum() / count


def model_config_from(values: dict[str, Any]) -> Any:
    """A validated :class:`lopkit.moe.model.MoEModelConfig` from the model fields of a config dict."""
    from lopkit.moe.model import MoEModelConfig

    from lopkit.configs import build_config

    return build_config(MoEModelConfig, {name: values[name] for name in MODEL_FIELDS if name in values})


def _clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a module's state_dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def build_model(model_config: Any, per_k_norm_ks: Sequence[int] | None, seed: int) -> Any:
    """A fresh :class:`MoETransformer` initialised from ``seed`` (global RNG left untouched), with per-k norms if given."""
    from lopkit.moe.model import MoETransformer

    model = MoETransformer(model_config, seed=int(seed) % (2**63))
    if per_k_norm_ks:
        model.add_per_k_norms(list(per_k_norm_ks))
    return model


def load_trained_model(store: Any, run_id: str, which: Literal["selected", "last"] = "selected") -> Any:
    """The model of a finished ``moe_pretrain``/``moe_finetune`` run kept in ``store`` (selected weights by default)."""
    return model_from_state(store.kept_state(run_id), which)


def model_from_state(state: dict[str, Any], which: Literal["selected", "last"] = "selected") -> Any:
    """Rebuild the model of a training state (``model_config``, ``per_k_norm_ks``, weights) in eval mode."""
    model = build_model(model_config_from(state["model_config"]), state.get("per_k_norm_ks"), 0)
    weights = state.get("best_model") if which == "selected" and state.get("best_model") is not None else state["model"]
    model.load_state_dict(weights)
    model.eval()
    return model


@functools.lru_cache(maxsize=4)
def cached_corpus(data_seed: int, mixture: tuple[tuple[str, float], ...] = ()) -> Any:
    """The training :class:`lopkit.moe.data.PretrainCorpus` of ``data_seed`` with the ``(source, mix)`` proportions of
    ``mixture`` (empty: the defaults of :class:`lopkit.moe.data.PretrainCorpusConfig`), built once per process."""
    from lopkit.configs import build_config
    from lopkit.moe.data import PretrainCorpus, PretrainCorpusConfig

    config = build_config(PretrainCorpusConfig, {f"mix_{name}": value for name, value in mixture})
    return PretrainCorpus(data_seed, "train", config)


@functools.lru_cache(maxsize=8)
def cached_heldout(data_seed: int, split: str, n_bytes: int) -> torch.Tensor:
    """The first ``n_bytes`` of held-out GCIDE text of ``split`` ('val' or 'test'), cached per process."""
    return cached_corpus(data_seed).heldout_tokens(n_bytes, split=split)


def heldout_windows(tokens: torch.Tensor, n_rows: int, width: int) -> torch.Tensor:
    """``n_rows`` consecutive, non-overlapping windows of ``width`` bytes of a 1-D text (ValueError if too short)."""
    if tokens.numel() < n_rows * width:
        raise ValueError(f"held-out text of {tokens.numel()} bytes is shorter than {n_rows} x {width} bytes")
    return tokens[: n_rows * width].reshape(n_rows, width).clone()


def item_fits(item: Any, context: int) -> bool:
    """True when the prompt plus the longest choice fit in ``context + 1`` bytes (no truncation needed)."""
    prompt = len(item.context.encode("utf-8"))
    return prompt + max(len(choice.encode("utf-8")) for choice in item.choices) <= context + 1


@functools.lru_cache(maxsize=64)
def cached_items(domain: str, n: int, data_seed: int, split: str, context: int) -> tuple[Any, ...]:
    """``build_mc_items(domain, min(n, pool), data_seed, split)`` without the items that do not fit ``context`` (cached)."""
    from lopkit.moe.data import build_mc_items, mc_pool_size

    pool = mc_pool_size(domain, split)
    n = n if pool is None else min(n, pool)  # a bounded domain gives at most its pool
    kept = tuple(item for item in build_mc_items(domain, n, data_seed, split) if item_fits(item, context))
    if not kept:
        raise ConfigError(f"no {domain} item of split {split} fits a context of {context} bytes; raise context")
    return kept


def resolve_domains(domains: Sequence[str]) -> tuple[str, ...]:
    """The domains to use (all of MC_DOMAINS when empty); ConfigError for an unknown one."""
    from lopkit.moe.data import MC_DOMAINS

    chosen = tuple(domains) or tuple(MC_DOMAINS)
    unknown = [d for d in chosen if d not in MC_DOMAINS]
    require(not unknown, f"unknown multiple-choice domain(s) {unknown}; choose from {', '.join(MC_DOMAINS)}")
    return chosen


@torch.no_grad()
def mc_scores(model: Any, items: Sequence[Any], k: int, context: int, batch_size: int) -> dict[str, Any]:
    """``lopkit.moe.scoring.mc_accuracy`` of ``model`` at hard top-k (eval mode, restored afterwards)."""
    from lopkit.moe.scoring import mc_accuracy

    was_training = model.training
    model.eval()
    try:
        return mc_accuracy(lambda tokens: model(tokens, k=k).logits, items, context, batch_size)
    finally:
        model.train(was_training)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of 2 or more dimensions only (not on norms, biases, embeddings of positions)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos" not in n]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


class _LossBins:
    """Running sums of losses between rows (kept in the state so rows do not depend on chunking)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        """Accumulate one step's values."""
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.count += 1

    def flush(self) -> dict[str, float]:
        """The means of the bin; resets it."""
        means = {key: value / self.count for key, value in self.sums.items()} if self.count else {}
        self.sums, self.count = {}, 0
        return means

    def state(self) -> dict[str, Any]:
        """Copy of the accumulator."""
        return {"sums": dict(self.sums), "count": self.count}

    def load(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state`."""
        self.sums, self.count = dict(state["sums"]), int(state["count"])




def describe_state(state: dict[str, Any]) -> str:
    """One line about a kept training state (for logs)."""
    return json.dumps({"step": state.get("step"), "best_step": state.get("best_step"),
                       "per_k_norm_ks": state.get("per_k_norm_ks")})


def resolve_path(path: str | Path) -> str:
    """An absolute path as text (what ``init_store`` should hold so a run id does not depend on the cwd)."""
    return str(Path(path).resolve())
