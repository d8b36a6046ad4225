"""Evaluation of MoE checkpoints at every declared k, and the cross-sparsity agreement between any two (model, k).

:func:`evaluate_at_k` scores one model at one hard top-k: multiple-choice accuracy per domain and over all items
(``acc``: argmax of the summed log-likelihood of a choice's bytes; ``acc_norm``: argmax of that sum divided by the
choice's byte length, as lm-eval-harness does), the per-item predictions (for agreement), held-out perplexity
(and bits per byte), measured tokens/s at hard top-k, the FLOP proxy ``model.flops_per_token(k)`` and the expert
diagnostics of every layer (:func:`lopkit.moe.experts.expert_diagnostic_rows`).

:class:`MoEEval` wraps it as a resumable benchmark (one k per step; benchmark name ``moe_eval``, not registered
for ``lopkit run``) so the pipeline stores the rows in the same results store: ``method`` = model label
(``pretrained``, ``oracle2``, ``phds_anchor``...), ``task`` = k, ``layer`` = domain, ``"all"``, ``"heldout"``,
``"model"`` or ``"layer{i}"``. Predictions are rows ``metric="pred"`` / ``"pred_norm"`` with ``step`` = the item's
index within its domain and ``layer`` = the domain.

Agreement (spec 1.3), over the N test items of all domains pooled::

    A(a, b) = (1/N) * sum_i 1[ yhat_i(a) == yhat_i(b) ]

where ``a`` and ``b`` are (model, k) pairs and ``yhat`` the ``acc`` prediction (argmax summed log-likelihood).
For one checkpoint, ``A_model(k1, k2)`` compares the model at k1 with itself at k2; for the oracles,
``A_oracle(k1, k2)`` compares Oracle-k1 at k1 with Oracle-k2 at k2.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from lopkit.benchmarks.base import Benchmark, BenchmarkConfig, make_row
from lopkit.configs import ConfigError, check_device, require
from lopkit.mitigations.base import Mitigation
from lopkit.moe.data.items import MC_ITEM_RULE, MCItemRule

__all__ = [
    "MoEEval",
    "MoEEvalConfig",
    "agreement",
    "agreement_matrix",
    "evaluate_at_k",
    "evaluate_model",
    "measure_tokens_per_second",
    "oracle_predictions",
    "item_correctness",
    "prediction_vectors",
    "rebuild_test_answers",
    "seed_agreement",
    "summary_table",
]

def agreement(pred_a: np.ndarray | Sequence[int], pred_b: np.ndarray | Sequence[int]) -> float:
    """``A = mean 1[pred_a == pred_b]`` over items (ValueError for different lengths or no items)."""
    a, b = np.asarray(pred_a), np.asarray(pred_b)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"agreement needs two equally long non-empty prediction vectors, got {a.shape} and {b.shape}")
    return float(np.mean(a == b))


@torch.no_grad()
def measure_tokens_per_second(model: Any, k: int, batch: torch.Tensor, repeats: int = 3) -> float:
    """Tokens per second of a hard top-k forward pass on ``batch`` (median of ``repeats`` timed passes after a warm-up)."""
    model(batch, k=k)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        model(batch, k=k)
        times.append(time.perf_counter() - start)
    return batch.numel() / max(statistics.median(times), 1e-9)


@torch.no_grad()
def evaluate_at_k(
    model: Any,
    items_by_domain: Mapping[str, Sequence[Any]],
    heldout: torch.Tensor | None,
    k: int,
    *,
    score_batch_size: int = 64,
    ppl_stride: int | None = None,
    timing_batch: torch.Tensor | None = None,
    timing_repeats: int = 3,
    probe_tokens: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Tidy rows of one model at hard top-k (see the module docstring for the metrics); ``task`` is k."""
    from lopkit.moe.experts import expert_diagnostic_rows
    from lopkit.moe.scoring import language_model_stats, mc_accuracy

    model.eval()
    context = int(model.config.context)

    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        return model(tokens, k=k).logits

    rows: list[dict[str, Any]] = []
    correct = {"acc": 0.0, "acc_norm": 0.0}
    total = 0
    for domain, items in items_by_domain.items():
        result = mc_accuracy(logits_fn, list(items), context, score_batch_size)
        n = len(items)
        for name in ("acc", "acc_norm"):
            rows.append(make_row(0, k, domain, name, result[name]))
            correct[name] += float(result[name]) * n
        total += n
        for metric, key in (("pred", "predictions"), ("pred_norm", "predictions_norm")):
            for index, prediction in enumerate(np.asarray(result[key]).tolist()):
                rows.append(make_row(index, k, domain, metric, prediction))
    if total:
        for name in ("acc", "acc_norm"):
            rows.append(make_row(0, k, "all", name, correct[name] / total))
    if heldout is not None:
        stride = ppl_stride or context // 2
        stats = language_model_stats(logits_fn, heldout, context, stride, score_batch_size)
        rows.append(make_row(0, k, "heldout", "perplexity", stats.perplexity))
        rows.append(make_row(0, k, "heldout", "bits_per_byte", stats.bits_per_byte))
    rows.append(make_row(0, k, "model", "flops_per_token", model.flops_per_token(k)))
    if timing_batch is not None:
        rows.append(make_row(0, k, "model", "tokens_per_s", measure_tokens_per_second(model, k, timing_batch,
                                                                                       timing_repeats)))
    if probe_tokens is not None:
        rows.extend(expert_diagnostic_rows(model, probe_tokens, k, 0))
    return rows


def evaluate_model(model: Any, items_by_domain: Mapping[str, Sequence[Any]], heldout: torch.Tensor | None,
                   ks: Sequence[int], **options: Any) -> list[dict[str, Any]]:
    """:func:`evaluate_at_k` for every k in ``ks`` (rows concatenated)."""
    rows: list[dict[str, Any]] = []
    for k in ks:
        rows.extend(evaluate_at_k(model, items_by_domain, heldout, int(k), **options))
    return rows


# ------------------------------------------------------------------------------------------ the benchmark


@dataclasses.dataclass
class MoEEvalConfig(BenchmarkConfig):
    """Which checkpoint to evaluate, at which ks, on how many items."""

    source_store: str = ""
    """Experiment folder holding the run to evaluate."""
    source_run_id: str = ""
    """A finished moe_pretrain or moe_finetune run with a kept checkpoint."""
    ks: tuple[int, ...] = ()
    """Declared ks to evaluate (empty = 1..k_pre)."""
    weights: str = "selected"
    """``selected`` (checkpoint selection's best weights) or ``last``."""
    test_items: int = 500
    """Test items per multiple-choice domain."""
    domains: tuple[str, ...] = ()
    """Domains (empty = all)."""
    heldout_bytes: int = 65536
    """Bytes of held-out GCIDE text for perplexity (0 = skip)."""
    ppl_stride: int = 0
    """Stride of the perplexity windows (0 = context / 2)."""
    score_batch_size: int = 64
    """Sequences per forward pass when scoring."""
    timing_batch: int = 16
    """Sequences of the tokens/s batch (0 = skip timing)."""
    timing_repeats: int = 5
    """Timed passes per k (median)."""
    probe_sequences: int = 8
    """Sequences of the expert-diagnostics probe batch (0 = skip diagnostics)."""
    data_seed: int = 0
    """Seed of the item sets and held-out text."""
    mc_item_rule: MCItemRule = MC_ITEM_RULE
    """How the multiple-choice items are built (part of the run id): :data:`lopkit.moe.data.items.MCItemRule`."""

    device: str = "cpu"
    """Only ``cpu``: this benchmark has no CUDA path yet (``device=cuda`` is one clear error)."""

    def validate(self) -> None:
        """Reject impossible values with a message naming the field."""
        check_device(self.device, supported=("cpu",))
        require(bool(self.source_run_id) and bool(self.source_store),
                "source_store and source_run_id must name a finished moe_pretrain/moe_finetune run "
                "(use 'lopkit moe evaluate --out DIR', which finds them)")
        require(all(k >= 1 for k in self.ks), f"ks must be >= 1, got {self.ks}")
        require(self.weights in ("selected", "last"), f"weights must be selected or last, got {self.weights!r}")
        for name in ("test_items", "score_batch_size", "timing_repeats"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("heldout_bytes", "ppl_stride", "timing_batch", "probe_sequences", "data_seed"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")


class MoEEval(Benchmark):
    """Evaluate one kept checkpoint at each declared k (one k per step, resumable)."""

    name = "moe_eval"
    accepts_methods = False  # evaluates a kept checkpoint: nothing to mitigate
    Config = MoEEvalConfig
    description = "MoE-PHDS evaluation: accuracy, perplexity, agreement predictions, tokens/s, FLOPs, expert diagnostics."
    presets = {
        "smoke": {"test_items": 12, "heldout_bytes": 2048, "timing_batch": 2, "timing_repeats": 1,
                  "probe_sequences": 2},
        "mini": {"test_items": 200, "heldout_bytes": 32768, "timing_batch": 16, "timing_repeats": 5,
                 "probe_sequences": 8},
        "default": {},
        "paper": {},
    }

    def __init__(self, config: MoEEvalConfig, seed: int, method: Mitigation | list[Mitigation] | None = None,
                 *, initial_state: dict[str, Any] | None = None):
        """``initial_state``: the kept final state of the run ``config.source_run_id`` (the runner reads it from
        ``config.source_store``, see :meth:`continues_from`)."""
        super().__init__(config, seed, method)
        from lopkit.moe.train import cached_heldout, cached_items, heldout_windows, model_from_state, resolve_domains

        if initial_state is None:
            raise ConfigError(
                f"moe_eval evaluates the kept state of the run {config.source_run_id!r}: run it through "
                f"'lopkit moe evaluate' or execute_run (they read it from source_store), or pass initial_state="
            )
        self.model = model_from_state(initial_state, config.weights)  # type: ignore[arg-type]
        k_pre, n_experts = int(self.model.config.k_pre), int(self.model.config.n_experts)
        self.ks = list(config.ks) or list(range(1, k_pre + 1))
        bad = [k for k in self.ks if not 1 <= k <= n_experts]
        if bad:
            raise ConfigError(f"ks {bad} are outside 1..n_experts={n_experts} of the evaluated model")
        domains = resolve_domains(config.domains)
        context = int(self.model.config.context)
        self.items_by_domain = {d: cached_items(d, config.test_items, config.data_seed, "test", context)
                                for d in domains}
        # held-out 'test' GCIDE text: perplexity on its first heldout_bytes, timing and probe batches after them
        n_windows = config.timing_batch + config.probe_sequences
        text = cached_heldout(config.data_seed, "test", config.heldout_bytes + n_windows * context)
        self.heldout = text[: config.heldout_bytes] if config.heldout_bytes else None
        windows = heldout_windows(text[config.heldout_bytes:], n_windows, context)
        self.timing_batch = windows[: config.timing_batch] if config.timing_batch else None
        self.probe_tokens = windows[config.timing_batch:] if config.probe_sequences else None

    @classmethod
    def continues_from(cls, config: MoEEvalConfig) -> tuple[str, str]:  # type: ignore[override]
        """The run to evaluate: ``(source_store, source_run_id)``."""
        return config.source_store, config.source_run_id

    @property
    def total_steps(self) -> int:
        """One step per evaluated k."""
        return len(self.ks)

    def run(self, n_steps: int) -> list[dict[str, Any]]:
        """Evaluate the next ``n_steps`` ks."""
        rows: list[dict[str, Any]] = []
        cfg = self.config
        while n_steps > 0 and not self.done:
            rows += evaluate_at_k(self.model, self.items_by_domain, self.heldout, self.ks[self.step],
                                  score_batch_size=cfg.score_batch_size, ppl_stride=cfg.ppl_stride or None,
                                  timing_batch=self.timing_batch, timing_repeats=cfg.timing_repeats,
                                  probe_tokens=self.probe_tokens)
            self.step += 1
            n_steps -= 1
        return rows

    def state_dict(self) -> dict[str, Any]:
        """Only the number of ks done (rows are committed with it)."""
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the number of ks done."""
        self.step = int(state["step"])

    def progress(self) -> dict[str, Any]:
        """The next k."""
        return {"k": self.ks[min(self.step, len(self.ks) - 1)]}


# ------------------------------------------------------------------------------------------ tables & agreement


def prediction_vectors(metrics: pd.DataFrame, metric: str = "pred",
                       domains: Sequence[str] | None = None) -> dict[tuple[str, int, int], np.ndarray]:
    """``{(model label, seed, k): predictions}`` over the test items of ``domains`` (None: all; domains sorted,
    items in index order)."""
    rows = metrics[(metrics["benchmark"] == "moe_eval") & (metrics["metric"] == metric)]
    if domains is not None:
        rows = rows[rows["layer"].isin(list(domains))]
    vectors = {}
    for (label, seed, k), group in rows.groupby(["method", "seed", "task"], sort=True):
        ordered = group.sort_values(["layer", "step"])
        vectors[(str(label), int(seed), int(k))] = ordered["value"].to_numpy().astype(np.int64)
    return vectors


def oracle_predictions(vectors: Mapping[tuple[str, int, int], np.ndarray], seed: int) -> dict[int, np.ndarray]:
    """``{k: Oracle-k evaluated at k}`` for one seed (the oracles' "diagonal")."""
    found = {}
    for (label, s, k), vector in vectors.items():
        if s == seed and label.startswith("oracle") and label[6:].isdigit() and int(label[6:]) == k:
            found[k] = vector
    return found


def agreement_matrix(predictions: Mapping[int, np.ndarray]) -> pd.DataFrame:
    """``A(k1, k2)`` for every pair of ks of one prediction family (rows and columns sorted by k)."""
    ks = sorted(predictions)
    values = [[agreement(predictions[a], predictions[b]) for b in ks] for a in ks]
    return pd.DataFrame(values, index=pd.Index(ks, name="k1"), columns=pd.Index(ks, name="k2"))


def model_agreement_matrices(metrics: pd.DataFrame, metric: str = "pred",
                             domains: Sequence[str] | None = None) -> dict[tuple[str, int], pd.DataFrame]:
    """Agreement matrices per (model label, seed), plus ``("oracles", seed)`` from Oracle-k1@k1 vs Oracle-k2@k2,
    over the test items of ``domains`` (None: all domains)."""
    vectors = prediction_vectors(metrics, metric, domains)
    matrices: dict[tuple[str, int], pd.DataFrame] = {}
    models = sorted({(label, seed) for label, seed, _k in vectors})
    for label, seed in models:
        family = {k: v for (lab, s, k), v in vectors.items() if lab == label and s == seed}
        matrices[(label, seed)] = agreement_matrix(family)
    for seed in sorted({seed for _l, seed in models}):
        oracle = oracle_predictions(vectors, seed)
        if len(oracle) >= 2:
            matrices[("oracles", seed)] = agreement_matrix(oracle)
    return matrices


def seed_agreement(metrics: pd.DataFrame, metric: str = "pred",
                   domains: Sequence[str] | None = None) -> pd.DataFrame:
    """The agreement control: ``A(model seed s1 @k, model seed s2 @k)`` for every model, k and pair of seeds.

    Two independently trained copies of one method disagree on some items; an agreement gain of one checkpoint
    across k is only meaningful next to this seed-to-seed baseline. Columns: model, k, seed_a, seed_b, A.
    """
    vectors = prediction_vectors(metrics, metric, domains)
    rows = []
    for label, k in sorted({(label, k) for label, _seed, k in vectors}):
        seeds = sorted(s for lab, s, kk in vectors if lab == label and kk == k)
        for i, a in enumerate(seeds):
            for b in seeds[i + 1:]:
                rows.append({"model": label, "k": k, "seed_a": a, "seed_b": b,
                             "A": agreement(vectors[(label, a, k)], vectors[(label, b, k)])})
    return pd.DataFrame(rows, columns=["model", "k", "seed_a", "seed_b", "A"])


def rebuild_test_answers(runs: pd.DataFrame) -> tuple[dict[str, np.ndarray] | None, str]:
    """The correct choice of every test item per domain, rebuilt from the stored eval runs' configs (the items are a
    pure function of ``domains, test_items, data_seed, mc_item_rule`` and the pretrain run's ``context``), with a
    note; ``(None, reason)`` when they cannot be rebuilt exactly (configs differ, or items of another rule)."""
    import json

    from lopkit.moe.training import cached_items, resolve_domains

    evals = runs[runs["benchmark"] == "moe_eval"]
    pretrains = runs[runs["benchmark"] == "moe_pretrain"]
    if evals.empty or pretrains.empty:
        return None, "no evaluation or pretrain run stored"
    keys = ("domains", "test_items", "data_seed", "mc_item_rule")
    settings = {json.dumps({k: json.loads(c).get(k) for k in keys}, sort_keys=True) for c in evals["config_json"]}
    contexts = {int(json.loads(c)["context"]) for c in pretrains["config_json"]}
    if len(settings) != 1 or len(contexts) != 1:
        return None, "the eval runs differ in their test items (domains, test_items, data_seed or context)"
    setting = json.loads(settings.pop())
    if setting["mc_item_rule"] != MC_ITEM_RULE:
        return None, f"the runs' items follow the rule {setting['mc_item_rule']!r}, this code builds {MC_ITEM_RULE!r}"
    context = contexts.pop()
    answers = {domain: np.array([item.answer for item in cached_items(domain, int(setting["test_items"]),
                                                                      int(setting["data_seed"]), "test", context)])
               for domain in resolve_domains(setting["domains"] or ())}
    return answers, (f"answers rebuilt from the eval config (test_items={setting['test_items']}, "
                     f"data_seed={setting['data_seed']}, context={context}, rule {setting['mc_item_rule']})")


def item_correctness(metrics: pd.DataFrame, answers: Mapping[str, np.ndarray]
                     ) -> dict[tuple[str, int, int], dict[str, np.ndarray]]:
    """``{(model, seed, k): {domain: 1.0/0.0 per test item}}`` from the stored ``acc`` predictions and ``answers``.

    ValueError when a stored prediction vector's length differs from its domain's answers, or when the rebuilt
    correctness does not reproduce a stored per-domain ``acc`` exactly (the answers would then not be the run's).
    """
    stored = summary_table(metrics)
    found: dict[tuple[str, int, int], dict[str, np.ndarray]] = {}
    for domain, truth in answers.items():
        for key, predictions in prediction_vectors(metrics, "pred", [domain]).items():
            if predictions.shape != truth.shape:
                raise ValueError(f"{key} has {predictions.size} {domain} predictions, the rebuilt items {truth.size}")
            correct = (predictions == truth).astype(float)
            row = stored[(stored["model"] == key[0]) & (stored["seed"] == key[1]) & (stored["k"] == key[2])]
            if row.empty or abs(float(row[f"acc:{domain}"].iloc[0]) - correct.mean()) > 1e-9:
                raise ValueError(f"rebuilt answers do not reproduce the stored {domain} acc of {key}")
            found.setdefault(key, {})[domain] = correct
    return found


def summary_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, seed, k): acc, acc_norm (all domains), per-domain acc, perplexity, tokens/s, FLOPs."""
    rows = metrics[(metrics["benchmark"] == "moe_eval") & (~metrics["metric"].isin(["pred", "pred_norm"]))]
    if rows.empty:
        return pd.DataFrame()
    wanted = rows[(rows["layer"].isin(["all", "heldout", "model"])) | (rows["metric"] == "acc")]
    wanted = wanted[~wanted["layer"].str.startswith("layer")]
    names = np.where(wanted["layer"].isin(["all", "heldout", "model"]), wanted["metric"],
                     wanted["metric"] + ":" + wanted["layer"])
    table = wanted.assign(column=names).pivot_table(index=["method", "seed", "task"], columns="column",
                                                    values="value", aggfunc="mean")
    table.index = table.index.set_names(["model", "seed", "k"])
    return table.reset_index()
