"""PHDS fine-tuning of Hugging Face MoE causal LMs (OLMoE, Qwen2-MoE, Mixtral and routers in their pattern).

Every step (the same definitions as lopkit's own ``moe_finetune``, :mod:`lopkit.moe.training`):

1. draw k from ``q_t(k) = (1 - a_t) Uniform(K_train) + a_t delta(k_anchor)`` (:func:`k_distribution`, the anchor
   curriculum: ``a_t`` is 0 before the anchor phase, the last ``anchor_fraction`` of the steps, and rises linearly to
   exactly 1 at the last step) with :func:`sample_k` and the run's k generator
   (:func:`lopkit.seeding.seeded_generator` of the seed, the finetune k stream key and the variant label);
2. set the PHDS soft mask of every router to that k (:func:`lopkit.moe.hf.set_phds_k`: the top k_pre experts are
   computed, ranks k..k_pre-1 get weight ``eps``, renormalised only where the router does) and, with per-k norms,
   the norm copies of that k;
3. loss = next-token cross-entropy of the batch (mean over all predicted tokens, as transformers' causal-LM loss)
   + ``aux_loss_coef`` x :func:`mixtral_load_balancing_loss` at the sampled k;
4. AdamW (:func:`make_optimizer`), learning rate :func:`lr_at` (warm-up, cosine), global gradient-norm clip.

Batches are ``batch_size`` rows drawn with replacement from a 2-D token tensor (:func:`text_rows` cuts a text) with
the run's data generator. :class:`HfPhdsTrainer` keeps the whole state (weights, optimizer, generators, the global
RNG it trains under, step); a state saved mid-run and loaded into a fresh trainer continues to the same weights.
transformers is only needed for the models themselves: this module does not import it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from lopkit.configs import ConfigError, build_config, config_to_dict, require
from lopkit.moe import hf
from lopkit.moe.common import k_low
from lopkit.moe.model import load_balancing_loss, rank_experts
from lopkit.moe.training import (
    _DATA_KEY,
    _K_KEY,
    check_finite_loss,
    k_distribution,
    lr_at,
    make_optimizer,
    masked_next_byte_loss,
    sample_k,
)
from lopkit.seeding import seeded_generator, stable_key

__all__ = [
    "HfPhdsConfig",
    "HfPhdsTrainer",
    "STATE_FILE",
    "mixtral_load_balancing_loss",
    "phds_finetune",
    "save_phds_model",
    "text_rows",
]

#: The trainer state a ``lopkit moe finetune-hf`` output folder keeps (resume; the optimizer is dropped when done).
STATE_FILE = "lopkit_phds_state.pt"
#: The JSON summary next to the saved model (config, seed, k_pre, per-step k and losses).
SUMMARY_FILE = "lopkit_phds.json"
_STATE_FORMAT = "lopkit-hf-phds-1"


@dataclasses.dataclass
class HfPhdsConfig:
    """PHDS fine-tuning of a Hugging Face MoE: multi-k soft-mask SFT, optional per-k norms and anchor curriculum."""

    steps: int = 100
    """Optimiser steps."""
    batch_size: int = 8
    """Rows per step (drawn with replacement)."""
    k_train: tuple[int, ...] = ()
    """K_train; empty = k_low..k_pre with ``k_low = max(1, k_pre // 2)`` (lopkit's ``phds`` variant)."""
    anchor_k: int | None = None
    """Curriculum anchor k (None = no curriculum; lopkit's ``phds_anchor`` uses k_pre - 1)."""
    anchor_fraction: float = 0.06
    """Fraction of the steps, at the end, over which a_t rises from 0 to 1."""
    eps: float = 1e-6
    """Weight of the experts ranked k..k_pre-1 in the soft mask (0 = hard top-k with static shapes)."""
    per_k_norms: bool = False
    """Opt-in: one copy of every norm's weight per training k (:func:`lopkit.moe.hf.add_per_k_norms`)."""
    aux_loss_coef: float | None = None
    """Load-balancing loss coefficient; None = the model config's ``router_aux_loss_coef``."""
    lr: float = 1e-5
    """Peak AdamW learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine decay)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay (on matrices only)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    variant: str = ""
    """Label of the run; the k stream is derived from it (two labels never share a k sequence)."""

    def validate(self) -> None:
        """Reject impossible values with a message naming the field (ks vs the model: :meth:`check_against_model`)."""
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        require(all(isinstance(k, int) and k >= 1 for k in self.k_train),
                f"k_train must hold integers >= 1, e.g. 2,3,4; got {self.k_train}")
        require(len(set(self.k_train)) == len(self.k_train), f"k_train has repeated ks: {self.k_train}")
        require(self.anchor_k is None or self.anchor_k >= 1, f"anchor_k must be >= 1 or none, got {self.anchor_k}")
        require(0 <= self.anchor_fraction < 1, f"anchor_fraction must be in [0, 1), got {self.anchor_fraction}")
        require(math.isfinite(self.eps) and self.eps >= 0, f"eps must be a finite number >= 0, got {self.eps}")
        require(self.aux_loss_coef is None or (math.isfinite(self.aux_loss_coef) and self.aux_loss_coef >= 0),
                f"aux_loss_coef must be a finite number >= 0 or none, got {self.aux_loss_coef}")
        require(math.isfinite(self.lr) and self.lr > 0, f"lr must be a positive finite number, got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(self.warmup_steps >= 0 and self.weight_decay >= 0 and self.grad_clip >= 0,
                "warmup_steps, weight_decay and grad_clip must be >= 0")

    def resolved_k_train(self, k_pre: int) -> tuple[int, ...]:
        """K_train for a model of ``k_pre`` (the default k_low..k_pre when ``k_train`` is empty)."""
        return tuple(self.k_train) or tuple(range(k_low(k_pre), k_pre + 1))

    def training_ks(self, k_pre: int) -> list[int]:
        """Every k this run can train at: K_train and the anchor."""
        return sorted(set(self.resolved_k_train(k_pre)) | ({self.anchor_k} if self.anchor_k is not None else set()))

    def check_against_model(self, k_pre: int, n_experts: int) -> None:
        """ConfigError if a training k does not fit the model (the soft mask needs 1 <= k <= k_pre)."""
        for k in self.training_ks(k_pre):
            require(1 <= k <= k_pre,
                    f"k={k} does not fit the model (k_pre={k_pre}, {n_experts} experts per layer): the PHDS soft "
                    f"mask trains at 1 <= k <= k_pre; change k_train/anchor_k")


def mixtral_load_balancing_loss(router_logits: Sequence[torch.Tensor], n_experts: int, k: int) -> torch.Tensor:
    """transformers' Switch/Mixtral load-balancing loss (``load_balancing_loss_func`` of Mixtral, OLMoE, Qwen2-MoE,
    no attention mask) at top-k = ``k``: ``E * sum_e (c_e / (L N)) * P_e`` with the L layers' N tokens pooled, c_e the
    number of (token, slot) top-k assignments of expert e and P_e its mean router probability; this is ``k`` x
    lopkit's :func:`load_balancing_loss` of the pooled routing (which divides the counts by ``L N k``)."""
    logits = torch.cat([layer.reshape(-1, n_experts) for layer in router_logits])
    probs = torch.softmax(logits.float(), dim=-1)
    _values, index = rank_experts(probs, k)
    return k * load_balancing_loss(probs, index, n_experts)


def text_rows(tokens: Sequence[int] | torch.Tensor, context: int) -> torch.Tensor:
    """Consecutive non-overlapping rows of ``context`` tokens of a token sequence (one shorter row if the text is
    shorter than ``context``); ConfigError below 2 tokens."""
    ids = torch.as_tensor(list(tokens) if not isinstance(tokens, torch.Tensor) else tokens, dtype=torch.long).flatten()
    require(isinstance(context, int) and context >= 2, f"context must be an integer >= 2, got {context!r}")
    require(ids.numel() >= 2, f"the text holds {ids.numel()} token(s); PHDS fine-tuning needs at least 2")
    width = min(context, ids.numel())
    n_rows = ids.numel() // width
    return ids[: n_rows * width].reshape(n_rows, width).clone()


def _check_rows(rows: Any, vocab_size: int | None) -> torch.Tensor:
    """The training rows as a 2-D long tensor (ConfigError for anything else or out-of-vocabulary ids)."""
    require(isinstance(rows, torch.Tensor) and rows.ndim == 2 and rows.shape[0] >= 1 and rows.shape[1] >= 2
            and not rows.is_floating_point(),
            "rows must be an integer tensor of shape (n_rows, tokens) with tokens >= 2; cut a text with text_rows")
    rows = rows.long()
    if vocab_size is not None:
        require(int(rows.min()) >= 0 and int(rows.max()) < vocab_size,
                f"token ids must lie in 0..{vocab_size - 1} (the model's vocabulary)")
    return rows


class HfPhdsTrainer:
    """PHDS fine-tuning state of one Hugging Face MoE causal LM: :meth:`run` steps, :meth:`state_dict` to resume,
    :meth:`finish` to restore plain top-k routing (the model is trained in place)."""

    def __init__(self, model: torch.nn.Module, rows: torch.Tensor, config: HfPhdsConfig | Mapping[str, Any],
                 seed: int = 0):
        from lopkit.benchmarks.base import PrivateRNG

        if not isinstance(config, HfPhdsConfig):
            config = build_config(HfPhdsConfig, dict(config))
        config.validate()
        require(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0,
                f"seed must be an integer >= 0, got {seed!r}")
        routers = hf._require_routers(model)
        if any(hasattr(router, "_lopkit_phds") for router in routers):
            raise hf.DialError("the model's routers are already PHDS-patched; call disable_phds_routing(model) first")
        self.model, self.config, self.seed = model, config, seed
        self.k_pre = hf.pretrained_top_k(model)
        self.n_experts = min(int(router.num_experts) for router in routers)
        config.check_against_model(self.k_pre, self.n_experts)
        if any(int(router.top_k) != self.k_pre for router in routers):
            raise hf.DialError(f"the routers are dialed to k={routers[0].top_k}; set them back to k_pre={self.k_pre} "
                               f"first (set_top_k(model, {self.k_pre}))")
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        self.rows = _check_rows(rows, vocab if isinstance(vocab, int) else None)
        self.k_train = config.resolved_k_train(self.k_pre)
        coef = config.aux_loss_coef
        if coef is None:
            coef = float(getattr(getattr(model, "config", None), "router_aux_loss_coef", 0.0) or 0.0)
        self.aux_loss_coef = float(coef)
        if config.per_k_norms:
            wanted = tuple(config.training_ks(self.k_pre))
            present = hf.per_k_norm_ks(model)
            if not present:
                hf.add_per_k_norms(model, wanted)
            elif present != wanted:
                raise hf.DialError(f"the model has per-k norms for k={list(present)}, the config trains "
                                   f"k={list(wanted)}; start from a model without per-k norms or match k_train")
        hf.enable_phds_routing(model, config.eps)
        hf.set_phds_k(model, self.k_pre)
        self.optimizer = make_optimizer(model, config.lr, config.weight_decay)
        self.k_generator = seeded_generator(seed, _K_KEY, stable_key(config.variant))
        self.data_generator = seeded_generator(seed, _DATA_KEY)
        self.rng = PrivateRNG(seed)
        self.step = 0
        self.history: list[dict[str, float]] = []

    @property
    def done(self) -> bool:
        """True once ``config.steps`` steps ran."""
        return self.step >= self.config.steps

    def k_probabilities(self, step: int) -> dict[int, float]:
        """``q_t`` of optimiser step ``step`` (0-based)."""
        cfg = self.config
        return k_distribution(step, cfg.steps, self.k_train, cfg.anchor_k, cfg.anchor_fraction)

    def run(self, n_steps: int) -> list[dict[str, float]]:
        """Train up to ``n_steps`` more steps (never past ``config.steps``); returns one record per step."""
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be a non-negative int, got {n_steps!r}")
        records = []
        end = min(self.step + n_steps, self.config.steps)
        with self.rng.active():
            while self.step < end:
                records.append(self._train_step())
        return records

    def _train_step(self) -> dict[str, float]:
        """One AdamW step at a k drawn from q_t."""
        cfg, model = self.config, self.model
        model.train()
        lr = lr_at(self.step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        k = sample_k(self.k_probabilities(self.step), self.k_generator)
        hf.set_phds_k(model, k)
        index = torch.randint(self.rows.shape[0], (cfg.batch_size,), generator=self.data_generator)
        batch = self.rows[index].to(next(model.parameters()).device)  # draws stay on the CPU generator
        output = model(input_ids=batch, output_router_logits=True, use_cache=False)
        lm_loss = masked_next_byte_loss(output.logits[:, :-1].float(), batch[:, 1:])
        aux = mixtral_load_balancing_loss(output.router_logits, self.n_experts, k)
        loss = lm_loss + self.aux_loss_coef * aux
        check_finite_loss(loss, "finetune-hf", self.step, f"lower lr (now {cfg.lr})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        record = {"step": self.step, "k": k, "loss": float(loss.detach()), "lm_loss": float(lm_loss.detach()),
                  "aux_loss": float(aux.detach()), "lr": lr}
        self.history.append(record)
        return record

    def finish(self) -> torch.nn.Module:
        """Restore the routers' own hard top-k forward (at k_pre, k_pre's norms) and eval mode; returns the model."""
        hf.disable_phds_routing(self.model)
        hf.select_per_k_norms(self.model, self.k_pre)
        self.model.eval()
        return self.model

    def state_dict(self) -> dict[str, Any]:
        """Weights (with per-k norms), optimizer (dropped once done), generators, private global RNG, step, history."""
        state = {
            "format": _STATE_FORMAT,
            "step": self.step,
            "seed": self.seed,
            "config": config_to_dict(self.config),
            "k_pre": self.k_pre,
            "per_k_norm_ks": list(hf.per_k_norm_ks(self.model)),
            "model": {name: value.detach().clone() for name, value in self.model.state_dict().items()},
            "k_generator": self.k_generator.get_state(),
            "data_generator": self.data_generator.get_state(),
            "rng": copy.deepcopy(self.rng.state),
            "history": [dict(record) for record in self.history],
        }
        if not self.done:
            state["optimizer"] = copy.deepcopy(self.optimizer.state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` (ConfigError when it was made with another config, seed or model)."""
        require(isinstance(state, Mapping) and state.get("format") == _STATE_FORMAT,
                "not a lopkit finetune-hf state; delete it or pass another --out")
        mine = config_to_dict(self.config)
        if state["config"] != mine or int(state["seed"]) != self.seed or int(state["k_pre"]) != self.k_pre:
            changed = sorted(key for key in mine if state["config"].get(key) != mine[key])
            what = f"config fields {', '.join(changed)}" if changed else "seed or model"
            raise ConfigError(f"the saved fine-tune state was made with another {what}; resume with the same "
                              f"settings or start a new output folder")
        self.model.load_state_dict(state["model"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.k_generator.set_state(state["k_generator"])
        self.data_generator.set_state(state["data_generator"])
        self.rng.state = copy.deepcopy(state["rng"])
        self.step = int(state["step"])
        self.history = [dict(record) for record in state["history"]]


def phds_finetune(model: torch.nn.Module, rows: torch.Tensor, config: HfPhdsConfig | Mapping[str, Any], *,
                  seed: int = 0, state: Mapping[str, Any] | None = None) -> list[dict[str, float]]:
    """PHDS-fine-tune a Hugging Face MoE causal LM in place on token ``rows`` (see the module docstring); returns
    one record per step (k, loss, lm_loss, aux_loss, lr). ``state``: a :meth:`HfPhdsTrainer.state_dict` to resume.
    The model is left with its own top-k routing at k_pre, in eval mode."""
    trainer = HfPhdsTrainer(model, rows, config, seed)
    try:
        if state is not None:
            trainer.load_state_dict(state)
        trainer.run(trainer.config.steps - trainer.step)
    finally:
        trainer.finish()
    return trainer.history


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                    "special_tokens_map.json", "added_tokens.json", "generation_config.json")


def save_phds_model(trainer: HfPhdsTrainer, folder: str | Path, source: str | Path | None = None) -> Path:
    """Save the fine-tuned model as a Hugging Face checkpoint (``save_pretrained``; with per-k norms the shared norm
    weights are the copies of k_pre, so a plain ``from_pretrained`` is the model at k_pre), its per-k norm copies in
    :data:`lopkit.moe.hf.PER_K_NORMS_FILE`, a JSON summary, and the tokenizer files of ``source``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model = trainer.model
    per_k = hf.per_k_norm_state(model)
    weights = {name: value for name, value in model.state_dict().items() if ".lopkit_per_k." not in name}
    if per_k:  # the shared norms get the copies of k_pre's nearest trained k: a plain load is the model at k_pre
        from lopkit.moe.model import nearest_trained_k

        key = f".lopkit_per_k.k{nearest_trained_k(trainer.k_pre, hf.per_k_norm_ks(model))}"
        for name, value in per_k.items():
            if name.endswith(key):
                weights[name[: -len(key)] + ".weight"] = value
    model.save_pretrained(str(out), state_dict=weights)
    if per_k:
        torch.save({"ks": list(hf.per_k_norm_ks(model)), "weights": per_k}, out / hf.PER_K_NORMS_FILE)
    if source is not None:
        for name in _TOKENIZER_FILES:
            if (Path(source) / name).is_file() and not (out / name).exists():
                shutil.copy2(Path(source) / name, out / name)
    summary = {"config": config_to_dict(trainer.config), "seed": trainer.seed, "k_pre": trainer.k_pre,
               "k_train": list(trainer.k_train), "aux_loss_coef": trainer.aux_loss_coef,
               "aux_loss": "transformers' Mixtral load_balancing_loss_func at the sampled k",
               "per_k_norm_ks": list(hf.per_k_norm_ks(model)), "steps_done": trainer.step,
               "history": trainer.history}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return out
