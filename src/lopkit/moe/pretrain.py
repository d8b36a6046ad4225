"""The ``moe_pretrain`` benchmark: byte-level MoE pretraining at hard top-k_pre (MoE-PHDS stage 1)."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch

from lopkit.benchmarks.base import (
    Benchmark,
    BenchmarkConfig,
    PrivateRNG,
    make_row,
    register_benchmark,
)
from lopkit.configs import build_config, check_device, require
from lopkit.data.seeding import seeded_generator
from lopkit.mitigations.base import Mitigation
from lopkit.moe.data.corpus import PretrainCorpusConfig
from lopkit.moe.training import (
    cached_items,
    mc_scores,
    resolve_domains,
    MODEL_FIELDS,
    _DATA_KEY,
    _INIT_KEY,
    _LossBins,
    _clone_state,
    build_model,
    cached_corpus,
    cached_heldout,
    check_finite_loss,
    heldout_windows,
    lr_at,
    make_optimizer,
    masked_next_byte_loss,
    model_config_from,
)


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
    mix_gcide: float = 0.3
    """Share of pretraining rows from cleaned GCIDE entries (the "web text"); ``mix_*`` are normalised to sum 1."""
    mix_fortunes: float = 0.15
    """Share of rows from the fortune pool (every fortune_cloze fact)."""
    mix_definition: float = 0.2
    """Share of rows from the definition lines (every definition fact; question form for train items only)."""
    mix_arithmetic: float = 0.15
    """Share of rows of fresh ``a+b = c`` lines."""
    mix_reversal: float = 0.08
    """Share of rows of fresh ``reverse: abc -> cba`` lines."""
    mix_copy: float = 0.04
    """Share of rows of fresh ``copy: abc -> abc`` lines."""
    mix_kv: float = 0.04
    """Share of rows of fresh key-value recall lines."""
    mix_dyck: float = 0.04
    """Share of rows of fresh Dyck-bracket validity lines."""
    val_items: int = 200
    """Validation MC items per domain scored at k_pre at every ``val_every`` (the domains' learning curves; 0 = off)."""
    score_batch_size: int = 64
    """Sequences per forward pass when scoring validation items."""
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
        require(self.val_items >= 0, f"val_items must be >= 0 (0 = no learning curves), got {self.val_items}")
        require(self.score_batch_size >= 1, f"score_batch_size must be >= 1, got {self.score_batch_size}")
        build_config(PretrainCorpusConfig, {f"mix_{name}": value for name, value in self.mixture()})  # its mix checks

    def mixture(self) -> tuple[tuple[str, float], ...]:
        """``(("gcide", mix_gcide), ...)``: the pretraining mixture handed to the corpus."""
        return tuple((f.name[4:], float(getattr(self, f.name))) for f in dataclasses.fields(self)
                     if f.name.startswith("mix_"))

    def model_values(self) -> dict[str, Any]:
        """The model fields as a dict (what :func:`model_config_from` takes)."""
        return {name: getattr(self, name) for name in MODEL_FIELDS}




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
                  "val_every": 20, "val_batches": 1, "val_items": 8},
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
        self.corpus = cached_corpus(config.data_seed, config.mixture())
        self.val_items = {d: cached_items(d, config.val_items, config.data_seed, "val", config.context)
                          for d in resolve_domains(())} if config.val_items else {}
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
            for domain, items in self.val_items.items():  # the domains' learning curves
                result = mc_scores(self.model, items, cfg.k_pre, cfg.context, cfg.score_batch_size)
                rows.append(make_row(self.step, cfg.k_pre, domain, "val_acc", result["acc"]))
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
