"""The ``moe_finetune`` benchmark: SFT at a fixed k (oracle, naive) or multi-k PHDS with the anchor curriculum."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Literal

import torch

from lopkit.benchmarks.base import (
    Benchmark,
    BenchmarkConfig,
    PrivateRNG,
    make_row,
    register_benchmark,
)
from lopkit.configs import ConfigError, check_device, require
from lopkit.data.seeding import seeded_generator, stable_key
from lopkit.mitigations.base import Mitigation
from lopkit.moe.data.items import MC_ITEM_RULE, MCItemRule
from lopkit.moe.training import (
    mc_scores,
    resolve_domains,
    _DATA_KEY,
    _K_KEY,
    _LossBins,
    _clone_state,
    build_model,
    cached_items,
    check_finite_loss,
    k_distribution,
    lr_at,
    make_optimizer,
    masked_next_byte_loss,
    model_config_from,
    sample_k,
    selection_steps,
)


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
    val_items: int = 200
    """Validation items per domain (checkpoint selection)."""
    domains: tuple[str, ...] = ()
    """Multiple-choice domains (empty = all of ``lopkit.moe.data.MC_DOMAINS``)."""
    select_every: int = 250
    """Steps between checkpoint-selection evaluations (after the burn-in, plus the last step)."""
    select_after_anchor: bool = True
    """With a curriculum (``anchor_k`` set, ``anchor_fraction > 0``) select only after the anchor phase, i.e. the
    last weights: a checkpoint picked before the anchor phase would not be an anchored model at all."""
    variant: str = ""
    """Label of the fine-tune variant (the pipeline sets it); the k stream is derived from it with
    :func:`lopkit.seeding.stable_key`, so two variants (``phds``, ``phds_anchor``) never share a k sequence."""
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
    mc_item_rule: MCItemRule = MC_ITEM_RULE
    """How the multiple-choice items are built (part of the run id): :data:`lopkit.moe.data.items.MCItemRule`."""
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
                 "val_items": 200, "select_every": 100, "select_burn_in": 0.5, "log_every": 25,
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
        self.val_items = {d: cached_items(d, config.val_items, config.data_seed, "val", self.context)
                          for d in self.domains}
        self.data_generator = seeded_generator(self.seed, _DATA_KEY)
        self.k_generator = seeded_generator(self.seed, _K_KEY, stable_key(config.variant))
        if config.select_after_anchor and config.anchor_k is not None and config.anchor_fraction > 0:
            self.selection_points = {config.steps}  # the anchor phase ends at the last step
        else:
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
            correct = {"acc": 0.0, "acc_norm": 0.0}
            for domain, items in self.val_items.items():  # per-domain learning curves
                result = mc_scores(self.model, items, k, self.context, cfg.score_batch_size)
                rows.append(make_row(self.step, k, domain, "val_acc", result["acc"]))
                for name in correct:
                    correct[name] += float(result[name]) * len(items)
            total = sum(len(items) for items in self.val_items.values())
            rows.append(make_row(self.step, k, "model", "val_acc", correct["acc"] / total))
            rows.append(make_row(self.step, k, "model", "val_acc_norm", correct["acc_norm"] / total))
            scores.append(correct[cfg.select_metric] / total)
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
