"""MoE-PHDS (arXiv 2509.23012): one sparse MoE checkpoint whose top-k is dialed at inference, with expert-level LoP diagnostics.

Modules, in the order data flows:

- :mod:`lopkit.moe.data` (a package): offline text (Debian ``dict-gcide``, ``fortunes``), generated domains,
  multiple-choice items (held out by split) whose facts are all in the pretraining corpus;
- :mod:`lopkit.moe.model`: a byte-level decoder-only MoE transformer (hard top-k at inference, PHDS soft mask in
  training, per-k norm copies);
- :mod:`lopkit.moe.experts`: expert load, dormant and duplicate experts, cloned experts (the cloned-unit manifold);
- :mod:`lopkit.moe.scoring`: lm-eval-harness style choice scoring (``acc``, ``acc_norm``) and perplexity;
- :mod:`lopkit.moe.pretrain`, :mod:`lopkit.moe.finetune` (re-exported by :mod:`lopkit.moe.train`): the
  ``moe_pretrain`` and ``moe_finetune`` benchmarks (oracle, naive, PHDS), helpers in :mod:`lopkit.moe.training`;
- :mod:`lopkit.moe.evaluate`: accuracy, perplexity, tokens/s and FLOPs at every k, cross-sparsity agreement;
- :mod:`lopkit.moe.pipeline`, :mod:`lopkit.moe.report`, :mod:`lopkit.moe.cli`: ``lopkit moe run|pretrain|finetune|
  evaluate|report|dial``, resumable stages in one results store;
- :mod:`lopkit.moe.hf`: dial-k at inference on Hugging Face MoE models (imports transformers lazily).
- :mod:`lopkit.moe.hf_phds`: PHDS fine-tuning of Hugging Face MoE models (``lopkit moe finetune-hf``).

See docs/moe.md.
"""

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing the package stays free of torch

from lopkit._lazy import lazy_attributes

#: Public name -> the module defining it (imported on first access, PEP 562).
_EXPORTS: dict[str, str] = {
    "LayerRouting": "lopkit.moe.model",
    "MoEModelConfig": "lopkit.moe.model",
    "MoEOutput": "lopkit.moe.model",
    "MoETransformer": "lopkit.moe.model",
    "agreement": "lopkit.moe.scoring",
    "choice_logprobs": "lopkit.moe.scoring",
    "clone_experts": "lopkit.moe.experts",
    "dormant_expert_fraction": "lopkit.moe.experts",
    "duplicate_expert_fraction": "lopkit.moe.experts",
    "expert_diagnostic_rows": "lopkit.moe.experts",
    "expert_load": "lopkit.moe.experts",
    "expert_output_similarity": "lopkit.moe.experts",
    "expert_weight_similarity": "lopkit.moe.experts",
    "load_entropy": "lopkit.moe.experts",
    "load_moe_state": "lopkit.moe.model",
    "mc_accuracy": "lopkit.moe.scoring",
    "perplexity": "lopkit.moe.scoring",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time the names come from __getattr__
    from lopkit.moe.experts import (
        clone_experts,
        dormant_expert_fraction,
        duplicate_expert_fraction,
        expert_diagnostic_rows,
        expert_load,
        expert_output_similarity,
        expert_weight_similarity,
        load_entropy,
    )
    from lopkit.moe.model import LayerRouting, MoEModelConfig, MoEOutput, MoETransformer, load_moe_state
    from lopkit.moe.scoring import agreement, choice_logprobs, mc_accuracy, perplexity


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
