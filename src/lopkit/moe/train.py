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

The code lives in :mod:`lopkit.moe.training` (shared helpers), :mod:`lopkit.moe.pretrain` and
:mod:`lopkit.moe.finetune`; this module re-exports them (and importing it registers both benchmarks).
"""

from __future__ import annotations

from lopkit.moe.training import (  # noqa: F401
    MODEL_FIELDS,
    anchor_weight,
    build_model,
    cached_corpus,
    cached_heldout,
    cached_items,
    check_finite_loss,
    describe_state,
    heldout_windows,
    item_fits,
    k_distribution,
    load_trained_model,
    lr_at,
    make_optimizer,
    masked_next_byte_loss,
    model_config_from,
    model_from_state,
    resolve_path,
    sample_k,
    selection_steps,
)
from lopkit.moe.finetune import (  # noqa: F401
    MoEFinetune,
    MoEFinetuneConfig,
    mc_scores,
    resolve_domains,
)
from lopkit.moe.pretrain import (  # noqa: F401
    MoEPretrain,
    MoEPretrainConfig,
)

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

