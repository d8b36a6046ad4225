"""MoE-PHDS training stages as resumable lopkit benchmarks: byte-level MoE pretraining and (multi-k) SFT.

Two benchmarks are registered (run them with :func:`lopkit.runner.execute.execute_run` and
``keep_checkpoint=True`` so that a later stage can load the trained weights from the store):

- ``moe_pretrain`` (:class:`MoEPretrain`): AdamW with linear warm-up then cosine decay, batches of
  ``batch_size x context`` bytes from :class:`lopkit.moe.data.PretrainCorpus`, hard top-``k_pre`` routing (identical
  to the soft mask at ``k = k_pre``), loss = next-byte cross-entropy + ``aux_loss_coef`` x load-balancing loss.
- ``moe_finetune`` (:class:`MoEFinetune`): SFT on multiple-choice training items (loss on the answer bytes only),
  starting from a pretrain run of the same store (``init_store``/``init_run_id``). ``k_schedule="fixed"`` trains
  at one k (the Oracle-k and Naive baselines); ``k_schedule="multi"`` samples a k per step from
  ``q_t(k) = (1 - a_t) Uniform(k_train) + a_t delta(anchor_k)`` (PHDS, spec 1.2b/d), with ``a_t`` rising
  linearly from 0 to 1 over the last ``anchor_fraction`` of the steps (**[R]**: the paper's ramp shape was not
  recovered). Routing is the PHDS soft mask (weights ``p_e`` for the first k ranked experts, ``eps`` for ranks
  ``k..k_pre-1``, 0 else) or plain hard top-k (``routing="hard"``, the naive baseline). ``per_k_norms`` keeps
  one copy of every norm's affine parameters per k in ``k_train`` (spec 1.2c, **[R]** on the exact form).

Checkpoint selection (spec 1.2e): after a burn-in of ``select_burn_in`` x steps, every ``select_every`` steps and
at the last step, the validation multiple-choice accuracy at ``k_pre`` (or the mean over ``k_train``, see
``select_k``) is measured with hard top-k routing; the best weights so far are kept in the state
(``best_model``). The finished run's checkpoint therefore holds both the last weights (``model``) and the
selected ones (``best_model``); :func:`load_trained_model` returns the selected weights.

The k sequence is drawn from a private ``torch.Generator`` saved in the state, so a resumed run samples exactly
the same ks and emits exactly the same rows as an uninterrupted one.

Rows (``layer="model"``): ``train_loss`` / ``aux_loss`` (means over ``log_every`` steps), ``val_loss`` (pretrain,
task = k_pre), ``sampled_k`` (finetune, every step), ``val_acc`` / ``val_acc_norm`` (finetune selection points,
task = selection k, 0 for the mean over ``k_train``), ``selected_step`` (finetune, last step).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F

from lopkit.benchmarks.base import (
    Benchmark,
    BenchmarkConfig,
    PrivateRNG,
    make_row,
    register_benchmark,
)
from lopkit.configs import ConfigError, check_device, require
from lopkit.data.seeding import seeded_generator
from lopkit.mitigations.base import Mitigation

__all__ = [
    "MODEL_FIELDS",
    "MoEFinetune",
    "MoEFinetuneConfig",
    "MoEPretrain",
    "MoEPretrainConfig",
    "anchor_weight",
    "check_finite_loss",
    "k_distribution",
    "load_trained_model",
    "lr_at",
    "model_config_from",
    "model_from_state",
    "resolve_domains",
    "sample_k",
    "selection_steps",
]

# keys of the independent random streams derived from the run seed
_INIT_KEY, _DATA_KEY, _VAL_KEY, _K_KEY = 11, 12, 13, 14

#: Fields of :class:`lopkit.moe.model.MoEModelConfig` that the pretrain config carries (``vocab_size`` is 256).
MODEL_FIELDS = ("d_model", "n_layers", "n_heads", "context", "n_experts", "expert_hidden", "k_pre",
                "norm_topk_prob", "aux_loss_coef")


# ------------------------------------------------------------------------------------------ pure helpers


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then cosine decay to ``min_lr_ratio * base_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


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
def cached_corpus(data_seed: int) -> Any:
    """The training :class:`lopkit.moe.data.PretrainCorpus` of ``data_seed``, built once per process (it is immutable)."""
    from lopkit.moe.data import PretrainCorpus

    return PretrainCorpus(data_seed, "train")


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
    """``build_mc_items(domain, n, data_seed, split)`` without the items that do not fit ``context`` (cached)."""
    from lopkit.moe.data import build_mc_items

    kept = tuple(item for item in build_mc_items(domain, n, data_seed, split) if item_fits(item, context))
    if not kept:
        raise ConfigError(f"no {domain} item of split {split} fits a context of {context} bytes; raise context")
    return kept


# ------------------------------------------------------------------------------------------------ pretrain


@dataclasses.dataclass
class MoEPretrainConfig(BenchmarkConfig):
    """Model size and pretraining schedule (model fields are passed to :class:`lopkit.moe.model.MoEModelConfig`)."""

    d_model: int = 128
    """Residual width."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads."""
    context: int = 128
    """Bytes of context per sequence."""
    n_experts: int = 16
    """Routed experts per MoE layer (E)."""
    expert_hidden: int = 88
    """SwiGLU hidden width of each expert (88: ~2.5M parameters in all, the spec's size; a SwiGLU expert of width 88
    costs about what a plain SiLU FFN of width 128 does)."""
    k_pre: int = 4
    """Pretraining top-k."""
    norm_topk_prob: bool = False
    """Renormalise the top-k router weights (False as in OLMoE/Qwen1.5-MoE)."""
    aux_loss_coef: float = 0.01
    """Coefficient of the Switch load-balancing loss."""
    steps: int = 12000
    """Optimiser steps."""
    batch_size: int = 16
    """Sequences per step (tokens per step = batch_size * context)."""
    lr: float = 2e-3
    """Peak AdamW learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine decay)."""
    warmup_steps: int = 200
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (on matrices only)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    log_every: int = 50
    """Steps per ``train_loss`` row."""
    val_every: int = 1000
    """Steps between ``val_loss`` rows (and at the last step)."""
    val_batches: int = 4
    """Validation batches (of ``batch_size`` consecutive windows of held-out 'val' GCIDE text) for ``val_loss``."""
    data_seed: int = 0
    """Seed of the corpus (which entries are train/val/test); the run seed sets init and batch order."""

    device: str = "cpu"
    """Only ``cpu``: this benchmark has no CUDA path yet (``device=cuda`` is one clear error)."""

    def validate(self) -> None:
        """Reject impossible sizes and schedules with a message naming the field."""
        check_device(self.device, supported=("cpu",))
        for name in ("d_model", "n_layers", "n_heads", "context", "n_experts", "expert_hidden", "k_pre", "steps",
                     "batch_size", "log_every", "val_every", "val_batches"):
            value = getattr(self, name)
            require(value >= 1, f"{name} must be >= 1, got {value}")
        require(self.k_pre <= self.n_experts,
                f"k_pre ({self.k_pre}) must be <= n_experts ({self.n_experts}); lower k_pre or add experts")
        require(self.d_model % self.n_heads == 0,
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        require(math.isfinite(self.lr) and self.lr > 0, f"lr must be a positive finite number, got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        require(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        require(self.aux_loss_coef >= 0, f"aux_loss_coef must be >= 0, got {self.aux_loss_coef}")
        require(self.data_seed >= 0, f"data_seed must be >= 0, got {self.data_seed}")

    def model_values(self) -> dict[str, Any]:
        """The model fields as a dict (what :func:`model_config_from` takes)."""
        return {name: getattr(self, name) for name in MODEL_FIELDS}


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


@register_benchmark
class MoEPretrain(Benchmark):
    """Byte-level MoE transformer pretraining at hard top-k_pre on GCIDE + fortunes + generated domains."""

    name = "moe_pretrain"
    accepts_methods = False  # the training loop calls no mitigation hook
    Config = MoEPretrainConfig
    description = "MoE-PHDS stage 1: pretrain a byte-level top-k MoE transformer (hard top-k_pre, aux loss)."
    presets = {
        "smoke": {"d_model": 32, "n_layers": 2, "n_heads": 2, "context": 64, "n_experts": 8, "expert_hidden": 32,
                  "k_pre": 2, "steps": 40, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "log_every": 10,
                  "val_every": 20, "val_batches": 1},
        # mini: sized from measured step times (2 threads, idle machine: ~0.12 s/step) so that the whole pipeline
        # (pretrain + 7 fine-tunes + evaluation, 1 seed) takes about 20-25 min on 2 cores
        "mini": {"d_model": 96, "n_layers": 3, "n_heads": 4, "context": 128, "n_experts": 16, "expert_hidden": 96,
                 "k_pre": 4, "steps": 4000, "batch_size": 16, "lr": 3e-3, "warmup_steps": 100, "log_every": 50,
                 "val_every": 500, "val_batches": 2},
        # spec 1.6: 12,000 steps x 16 x 128 = 24.6M tokens
        "default": {},
        # the paper's models (1B-14B parameters) are far out of reach on CPU; "paper" equals "default"
        "paper": {},
    }

    def __init__(self, config: MoEPretrainConfig, seed: int, method: Mitigation | list[Mitigation] | None = None):
        super().__init__(config, seed, method)
        self.rng = PrivateRNG(self.seed)
        self.model_config = model_config_from(config.model_values())
        self.model = build_model(self.model_config, None, seeded_generator(self.seed, _INIT_KEY).initial_seed())
        self.optimizer = make_optimizer(self.model, config.lr, config.weight_decay)
        self.corpus = cached_corpus(config.data_seed)
        self.data_generator = seeded_generator(self.seed, _DATA_KEY)
        n_rows, width = config.val_batches * config.batch_size, config.context + 1
        val_windows = heldout_windows(cached_heldout(config.data_seed, "val", n_rows * width), n_rows, width)
        self.val_batches = list(val_windows.split(config.batch_size))
        self.bins = _LossBins()
        self._last = {"train_loss": float("nan"), "val_loss": float("nan")}

    @property
    def total_steps(self) -> int:
        """``steps``."""
        return self.config.steps

    def run(self, n_steps: int) -> list[dict[str, Any]]:
        """Train up to ``n_steps`` steps; return the rows completed on the way."""
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be a non-negative int, got {n_steps!r}")
        rows: list[dict[str, Any]] = []
        end = min(self.step + n_steps, self.total_steps)
        with self.rng.active():
            while self.step < end:
                rows += self._train_step()
        return rows

    def _train_step(self) -> list[dict[str, Any]]:
        """One AdamW step on a pretraining batch; returns the rows due after it."""
        cfg = self.config
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        batch = self.corpus.batch(cfg.batch_size, cfg.context, self.data_generator)
        output = self.model(batch[:, :-1], k=cfg.k_pre)
        ce = masked_next_byte_loss(output.logits, batch[:, 1:])
        loss = ce + cfg.aux_loss_coef * output.aux_loss
        check_finite_loss(loss, "moe_pretrain", self.step, f"lower lr (now {cfg.lr}) or raise warmup_steps")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        self.bins.add({"train_loss": float(ce.detach()), "aux_loss": float(output.aux_loss.detach())})
        rows = []
        if self.step % cfg.log_every == 0 or self.step == cfg.steps:
            for metric, value in self.bins.flush().items():
                rows.append(make_row(self.step, cfg.k_pre, "model", metric, value))
                self._last[metric] = value
        if self.step % cfg.val_every == 0 or self.step == cfg.steps:
            self._last["val_loss"] = self.validation_loss(cfg.k_pre)
            rows.append(make_row(self.step, cfg.k_pre, "model", "val_loss", self._last["val_loss"]))
        return rows

    @torch.no_grad()
    def validation_loss(self, k: int) -> float:
        """Mean next-byte cross-entropy (nats) on the fixed validation batches at hard top-k."""
        was_training = self.model.training
        self.model.eval()
        try:
            losses = [float(masked_next_byte_loss(self.model(b[:, :-1], k=k).logits, b[:, 1:])) for b in self.val_batches]
        finally:
            self.model.train(was_training)
        return sum(losses) / len(losses)

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer (dropped once the run is done), data generator, RNGs, step and loss bins."""
        state = {
            "step": self.step,
            "model_config": self.config.model_values(),
            "per_k_norm_ks": None,
            "model": _clone_state(self.model),
            "data_generator": self.data_generator.get_state(),
            "rng": self.rng.state,
            "bins": self.bins.state(),
            "last": dict(self._last),
        }
        if not self.done:  # a finished run is never resumed: keep the kept checkpoint small
            state["optimizer"] = copy.deepcopy(self.optimizer.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.model.load_state_dict(state["model"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.data_generator.set_state(state["data_generator"])
        self.rng.state = state["rng"]
        self.step = int(state["step"])
        self.bins.load(state["bins"])
        self._last = dict(state["last"])

    def progress(self) -> dict[str, Any]:
        """Last binned training loss and validation loss."""
        return {"loss": self._last.get("train_loss", float("nan")), "val": self._last.get("val_loss", float("nan"))}


# ------------------------------------------------------------------------------------------------ finetune


@dataclasses.dataclass
class MoEFinetuneConfig(BenchmarkConfig):
    """SFT of a pretrained MoE on multiple-choice items at a fixed k (oracles, naive) or a mixture of k (PHDS)."""

    init_store: str = ""
    """Experiment folder (or .sqlite file) holding the pretrain run."""
    init_run_id: str = ""
    """Run id of the finished ``moe_pretrain`` run to start from (kept checkpoint)."""
    k_schedule: Literal["fixed", "multi"] = "fixed"
    """``fixed``: every step at ``k_fixed``; ``multi``: k sampled per step from q_t (PHDS)."""
    k_fixed: int = 4
    """The k of a ``fixed`` schedule."""
    k_train: tuple[int, ...] = (2, 3, 4)
    """K_train of a ``multi`` schedule (also the ks that get their own norms with ``per_k_norms``)."""
    anchor_k: int | None = None
    """Curriculum anchor k (None = no curriculum)."""
    anchor_fraction: float = 0.06
    """Fraction of the steps (at the end) over which a_t rises from 0 to 1."""
    routing: Literal["soft", "hard"] = "soft"
    """``soft``: PHDS mask (all k_pre experts computed, eps outside the top-k); ``hard``: plain top-k."""
    eps: float = 1e-6
    """Weight of the experts ranked k..k_pre-1 in the soft mask."""
    per_k_norms: bool = False
    """One copy of every norm's affine parameters per k in k_train (``multi`` only)."""
    steps: int = 3000
    """Optimiser steps."""
    batch_size: int = 16
    """Items per step."""
    lr: float = 5e-4
    """Peak AdamW learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine decay)."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay (on matrices only)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    aux_loss_coef: float = 0.01
    """Load-balancing loss coefficient during SFT (spec: 0.01 for the internal models)."""
    train_items: int = 4000
    """Training items per multiple-choice domain."""
    val_items: int = 100
    """Validation items per domain (checkpoint selection)."""
    domains: tuple[str, ...] = ()
    """Multiple-choice domains (empty = all of ``lopkit.moe.data.MC_DOMAINS``)."""
    select_every: int = 250
    """Steps between checkpoint-selection evaluations (after the burn-in, plus the last step)."""
    select_burn_in: float = 0.5
    """Fraction of the steps before selection starts (the paper: 5k of ~10k steps)."""
    select_k: Literal["k_pre", "mean_train"] = "k_pre"
    """Selection accuracy at k_pre (the paper) or averaged over k_train."""
    select_metric: Literal["acc", "acc_norm"] = "acc"
    """Which accuracy selects the checkpoint."""
    score_batch_size: int = 64
    """Sequences per forward pass when scoring choices."""
    log_every: int = 25
    """Steps per ``train_loss`` row."""
    data_seed: int = 0
    """Seed of the item sets (same items for every variant and seed)."""

    device: str = "cpu"
    """Only ``cpu``: this benchmark has no CUDA path yet (``device=cuda`` is one clear error)."""

    def validate(self) -> None:
        """Reject impossible values with a message naming the field (checks against the model need the pretrain run)."""
        check_device(self.device, supported=("cpu",))
        require(bool(self.init_run_id),
                "init_run_id is empty: a finetune starts from a finished moe_pretrain run; run 'lopkit moe pretrain' "
                "and pass --set init_run_id=RUN_ID (or use 'lopkit moe run', which chains the stages)")
        require(bool(self.init_store), "init_store is empty: set it to the experiment folder of the pretrain run")
        for name in ("steps", "batch_size", "train_items", "val_items", "select_every", "score_batch_size",
                     "log_every", "k_fixed"):
            value = getattr(self, name)
            require(value >= 1, f"{name} must be >= 1, got {value}")
        require(len(self.k_train) >= 1 and all(k >= 1 for k in self.k_train),
                f"k_train must hold ks >= 1, e.g. 2,3,4; got {self.k_train}")
        require(len(set(self.k_train)) == len(self.k_train), f"k_train has repeated ks: {self.k_train}")
        require(self.anchor_k is None or self.anchor_k >= 1, f"anchor_k must be >= 1 or none, got {self.anchor_k}")
        require(0 <= self.anchor_fraction < 1, f"anchor_fraction must be in [0, 1), got {self.anchor_fraction}")
        require(self.eps >= 0 and math.isfinite(self.eps), f"eps must be >= 0, got {self.eps}")
        require(self.k_schedule == "multi" or not self.per_k_norms,
                "per_k_norms needs k_schedule=multi (a fixed-k run has one k, so one set of norms)")
        require(self.k_schedule == "multi" or self.anchor_k is None,
                "anchor_k needs k_schedule=multi; set anchor_k=none for a fixed-k run")
        require(math.isfinite(self.lr) and self.lr > 0, f"lr must be a positive finite number, got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(0 <= self.select_burn_in < 1, f"select_burn_in must be in [0, 1), got {self.select_burn_in}")
        require(self.warmup_steps >= 0 and self.weight_decay >= 0 and self.grad_clip >= 0 and self.aux_loss_coef >= 0,
                "warmup_steps, weight_decay, grad_clip and aux_loss_coef must be >= 0")
        require(self.data_seed >= 0, f"data_seed must be >= 0, got {self.data_seed}")

    def training_ks(self) -> list[int]:
        """Every k this run can train at."""
        if self.k_schedule == "fixed":
            return [self.k_fixed]
        return sorted(set(self.k_train) | ({self.anchor_k} if self.anchor_k is not None else set()))

    def check_against_model(self, k_pre: int, n_experts: int) -> None:
        """ConfigError if a training k does not fit the pretrained model."""
        for k in self.training_ks():
            limit = k_pre if self.routing == "soft" else n_experts
            require(1 <= k <= limit,
                    f"k={k} does not fit the pretrained model (k_pre={k_pre}, n_experts={n_experts}): soft routing "
                    f"needs 1 <= k <= k_pre, hard routing 1 <= k <= n_experts; change k_fixed/k_train/anchor_k")


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


@register_benchmark
class MoEFinetune(Benchmark):
    """SFT of a pretrained MoE on multiple-choice items: fixed-k (Oracle-k, Naive) or multi-k PHDS with curriculum."""

    name = "moe_finetune"
    accepts_methods = False  # the training loop calls no mitigation hook
    Config = MoEFinetuneConfig
    description = ("MoE-PHDS stage 2: SFT from a moe_pretrain run at a fixed k (oracle/naive) or with per-step "
                   "k ~ q_t (PHDS), soft eps mask, per-k norms, anchor curriculum, checkpoint selection.")
    presets = {
        "smoke": {"k_fixed": 2, "k_train": (1, 2), "steps": 12, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2,
                  "train_items": 64, "val_items": 8, "select_every": 4, "select_burn_in": 0.3, "log_every": 4,
                  "score_batch_size": 64, "anchor_fraction": 0.25},
        "mini": {"steps": 500, "batch_size": 16, "lr": 1e-3, "warmup_steps": 25, "train_items": 2000,
                 "val_items": 48, "select_every": 100, "select_burn_in": 0.5, "log_every": 25,
                 "anchor_fraction": 0.06},
        "default": {},
        "paper": {},
    }

    def __init__(self, config: MoEFinetuneConfig, seed: int, method: Mitigation | list[Mitigation] | None = None,
                 *, initial_state: dict[str, Any] | None = None):
        """``initial_state``: the kept final state of the ``moe_pretrain`` run ``config.init_run_id`` (the runner
        reads it from ``config.init_store``, see :meth:`continues_from`)."""
        super().__init__(config, seed, method)
        if initial_state is None:
            raise ConfigError(
                f"moe_finetune starts from the kept state of the pretrain run {config.init_run_id!r}: run it through "
                f"'lopkit run'/'lopkit moe run' or execute_run (they read it from init_store), or pass initial_state="
            )
        init_state = initial_state
        self.model_values = dict(init_state["model_config"])
        self.model_config = model_config_from(self.model_values)
        config.check_against_model(self.model_config.k_pre, self.model_config.n_experts)
        self.k_pre = int(self.model_config.k_pre)
        self.context = int(self.model_config.context)
        self.per_k_norm_ks = sorted(set(config.training_ks())) if config.per_k_norms else None
        self.model = build_model(self.model_config, None, 0)
        self.model.load_state_dict(init_state["model"])
        if self.per_k_norm_ks:
            self.model.add_per_k_norms(self.per_k_norm_ks)
        self.rng = PrivateRNG(self.seed)
        self.optimizer = make_optimizer(self.model, config.lr, config.weight_decay)
        self.domains = resolve_domains(config.domains)
        self.train_items = [item for d in self.domains
                            for item in cached_items(d, config.train_items, config.data_seed, "train", self.context)]
        self.val_items = [item for d in self.domains
                          for item in cached_items(d, config.val_items, config.data_seed, "val", self.context)]
        self.data_generator = seeded_generator(self.seed, _DATA_KEY)
        self.k_generator = seeded_generator(self.seed, _K_KEY)
        self.selection_points = set(selection_steps(config.steps, config.select_every, config.select_burn_in))
        self.bins = _LossBins()
        self.best_model: dict[str, torch.Tensor] | None = None
        self.best_score = -math.inf
        self.best_step = -1
        self._last: dict[str, float] = {"train_loss": float("nan"), "val": float("nan")}
        self._last_k = 0

    @classmethod
    def continues_from(cls, config: MoEFinetuneConfig) -> tuple[str, str]:  # type: ignore[override]
        """The pretrain run to start from: ``(init_store, init_run_id)``."""
        return config.init_store, config.init_run_id

    @property
    def total_steps(self) -> int:
        """``steps``."""
        return self.config.steps

    def next_k(self) -> int:
        """The k of the coming step (fixed, or drawn from q_t with the private k generator)."""
        cfg = self.config
        if cfg.k_schedule == "fixed":
            return cfg.k_fixed
        probs = k_distribution(self.step, cfg.steps, cfg.k_train, cfg.anchor_k, cfg.anchor_fraction)
        return sample_k(probs, self.k_generator)

    def run(self, n_steps: int) -> list[dict[str, Any]]:
        """Train up to ``n_steps`` steps; return the rows completed on the way."""
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be a non-negative int, got {n_steps!r}")
        rows: list[dict[str, Any]] = []
        end = min(self.step + n_steps, self.total_steps)
        with self.rng.active():
            while self.step < end:
                rows += self._train_step()
        return rows

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """An SFT batch of items drawn with replacement: tokens [B, T+1] and the answer mask [B, T]."""
        from lopkit.moe.data import sft_batch

        index = torch.randint(len(self.train_items), (self.config.batch_size,), generator=self.data_generator)
        return sft_batch([self.train_items[i] for i in index.tolist()], self.context)

    def _train_step(self) -> list[dict[str, Any]]:
        """One AdamW step at the sampled k; returns the rows due after it."""
        cfg = self.config
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        k = self.next_k()
        tokens, mask = self._batch()
        if cfg.routing == "soft":
            output = self.model(tokens[:, :-1], k=k, soft=True, eps=cfg.eps)
        else:
            output = self.model(tokens[:, :-1], k=k)
        ce = masked_next_byte_loss(output.logits, tokens[:, 1:], mask)
        loss = ce + cfg.aux_loss_coef * output.aux_loss
        check_finite_loss(loss, "moe_finetune", self.step, f"lower lr (now {cfg.lr})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        self._last_k = k
        self.bins.add({"train_loss": float(ce.detach()), "aux_loss": float(output.aux_loss.detach())})
        rows = [make_row(self.step, k, "model", "sampled_k", k)]
        if self.step % cfg.log_every == 0 or self.step == cfg.steps:
            for metric, value in self.bins.flush().items():
                rows.append(make_row(self.step, 0, "model", metric, value))
                self._last[metric] = value
        if self.step in self.selection_points:
            rows += self._select()
        if self.step == cfg.steps:
            rows.append(make_row(self.step, 0, "model", "selected_step", self.best_step))
        return rows

    def _select(self) -> list[dict[str, Any]]:
        """Validation MC accuracy at the selection k(s); keep the weights if they are the best so far."""
        cfg = self.config
        ks = [self.k_pre] if cfg.select_k == "k_pre" else sorted(set(cfg.k_train))
        rows, scores = [], []
        for k in ks:
            result = mc_scores(self.model, self.val_items, k, self.context, cfg.score_batch_size)
            rows.append(make_row(self.step, k, "model", "val_acc", result["acc"]))
            rows.append(make_row(self.step, k, "model", "val_acc_norm", result["acc_norm"]))
            scores.append(float(result[cfg.select_metric]))
        score = sum(scores) / len(scores)
        if cfg.select_k == "mean_train":
            rows.append(make_row(self.step, 0, "model", f"val_{cfg.select_metric}_mean", score))
        self._last["val"] = score
        if score > self.best_score:  # ties keep the earlier checkpoint
            self.best_score, self.best_step = score, self.step
            self.best_model = _clone_state(self.model)
        return rows

    def state_dict(self) -> dict[str, Any]:
        """Model, selected weights, optimizer (dropped once done), generators, RNGs, step, bins."""
        state = {
            "step": self.step,
            "model_config": dict(self.model_values),
            "per_k_norm_ks": self.per_k_norm_ks,
            "model": _clone_state(self.model),
            "best_model": None if self.best_model is None else {k: v.clone() for k, v in self.best_model.items()},
            "best_score": self.best_score,
            "best_step": self.best_step,
            "data_generator": self.data_generator.get_state(),
            "k_generator": self.k_generator.get_state(),
            "rng": self.rng.state,
            "bins": self.bins.state(),
            "last": dict(self._last),
            "last_k": self._last_k,
        }
        if not self.done:
            state["optimizer"] = copy.deepcopy(self.optimizer.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.model.load_state_dict(state["model"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.best_model = state["best_model"]
        self.best_score = float(state["best_score"])
        self.best_step = int(state["best_step"])
        self.data_generator.set_state(state["data_generator"])
        self.k_generator.set_state(state["k_generator"])
        self.rng.state = state["rng"]
        self.step = int(state["step"])
        self.bins.load(state["bins"])
        self._last = dict(state["last"])
        self._last_k = int(state["last_k"])

    def progress(self) -> dict[str, Any]:
        """Last k, binned training loss and selection score."""
        return {"k": self._last_k, "loss": self._last.get("train_loss", float("nan")),
                "val": self._last.get("val", float("nan"))}


def describe_state(state: dict[str, Any]) -> str:
    """One line about a kept training state (for logs)."""
    return json.dumps({"step": state.get("step"), "best_step": state.get("best_step"),
                       "per_k_norm_ks": state.get("per_k_norm_ks")})


def resolve_path(path: str | Path) -> str:
    """An absolute path as text (what ``init_store`` should hold so a run id does not depend on the cwd)."""
    return str(Path(path).resolve())
