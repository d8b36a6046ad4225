"""Dial-k on Hugging Face MoE models (and on lopkit's toy MoE): set top-k at inference and tabulate the cost/quality.

transformers' OLMoE, Qwen2-MoE and Mixtral (5.x) route every token through a router module that holds an integer
``top_k`` and ``num_experts`` and a ``(num_experts, hidden)`` ``weight`` (``OlmoeTopKRouter``,
``Qwen2MoeTopKRouter``, ``MixtralTopKRouter``); Mixtral's ``MixtralSparseMoeBlock`` keeps a copy of ``top_k`` too,
and the causal-LM class and the config keep ``num_experts_per_tok`` (used by the load-balancing loss).
:func:`set_top_k` finds every such router (any model whose routers follow this pattern works) and sets all of
these to k, so the next forward pass routes each token to its top-k experts. k = k_pre (the checkpoint's own k)
reproduces the original outputs exactly; k above k_pre is allowed with a warning (the paper: a denser k does not
recover a denser model's quality).

:func:`dial_table` runs one model at several ks: perplexity on a text, MC accuracy on a task file, agreement with the
k_pre outputs (MC answers and top-1 next tokens), measured tokens/s and a FLOP proxy (2 x the parameters a token
touches at k: dense parameters except the input embedding, plus k of the routed experts of every MoE layer).

PHDS training patches (used by :mod:`lopkit.moe.hf_phds`): :func:`enable_phds_routing` / :func:`set_phds_k` (the eps
soft mask) and the opt-in per-k norm copies :func:`add_per_k_norms`, switched with k by :func:`set_top_k` and
:func:`set_phds_k`, saved next to a checkpoint and added back by :func:`load_dial_model` (:func:`load_per_k_norms`).

transformers is imported lazily (only by :func:`load_dial_model` for a checkpoint folder): ``import lopkit`` never
imports it.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

__all__ = [
    "DialError",
    "DialModel",
    "McTask",
    "dial_table",
    "dialed",
    "add_per_k_norms",
    "disable_phds_routing",
    "enable_phds_routing",
    "find_routers",
    "hf_flops_per_token",
    "load_dial_model",
    "load_mc_tasks",
    "load_per_k_norms",
    "PER_K_NORMS_FILE",
    "per_k_norm_ks",
    "per_k_norm_state",
    "pretrained_top_k",
    "select_per_k_norms",
    "set_phds_k",
    "set_top_k",
]


class DialError(ValueError):
    """A model, k or file that dial-k cannot use; the message is one line saying what is wrong and how to fix it."""


def _is_router(module: torch.nn.Module) -> bool:
    """A router in the OLMoE/Qwen2-MoE/Mixtral pattern: integer ``top_k`` and ``num_experts``, a 2-D ``weight``."""
    top_k, n_experts = getattr(module, "top_k", None), getattr(module, "num_experts", None)
    weight = getattr(module, "weight", None)
    return (isinstance(top_k, int) and not isinstance(top_k, bool) and isinstance(n_experts, int)
            and isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.shape[0] == n_experts)


def find_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every router module of ``model`` (see :func:`_is_router`), in module order."""
    return [module for module in model.modules() if _is_router(module)]


def _top_k_holders(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Routers plus the MoE blocks that keep their own integer ``top_k`` next to a router child (Mixtral)."""
    holders = find_routers(model)
    for module in model.modules():
        if module not in holders and isinstance(getattr(module, "top_k", None), int) and any(
                _is_router(child) for child in module.children()):
            holders.append(module)
    return holders


def _require_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The routers of ``model``, or DialError naming the pattern dial-k needs."""
    routers = find_routers(model)
    if not routers:
        raise DialError(f"{type(model).__name__} has no recognisable MoE router (a module with integer top_k and "
                        f"num_experts and a (num_experts, hidden) weight, as in transformers' OLMoE, Qwen2-MoE and "
                        f"Mixtral); dial-k cannot set its k")
    return routers


def pretrained_top_k(model: torch.nn.Module) -> int:
    """The checkpoint's own k (k_pre): remembered at the first :func:`set_top_k`, else the routers' current k."""
    remembered = getattr(model, "_lopkit_k_pre", None)
    if remembered is not None:
        return int(remembered)
    config_k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    return int(config_k) if isinstance(config_k, int) else int(_require_routers(model)[0].top_k)


def set_top_k(model: torch.nn.Module, k: int) -> int:
    """Route every token of ``model`` to its top-``k`` experts from now on; returns the previous k.

    DialError for a model without a recognisable router or k outside 1..num_experts; a UserWarning when k exceeds
    the checkpoint's own k_pre.
    """
    routers = _require_routers(model)
    n_experts = min(int(r.num_experts) for r in routers)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_experts:
        raise DialError(f"k must be an integer in 1..{n_experts} (the number of experts per layer), got {k!r}")
    k_pre = pretrained_top_k(model)
    if getattr(model, "_lopkit_k_pre", None) is None:
        object.__setattr__(model, "_lopkit_k_pre", k_pre)
    if k > k_pre:
        warnings.warn(f"k={k} is above the checkpoint's k_pre={k_pre}: allowed, but a denser k does not recover a "
                      f"denser model's quality (MoE-PHDS 1.2f)", UserWarning, stacklevel=2)
    previous = int(routers[0].top_k)
    for module in _top_k_holders(model):
        module.top_k = k
    if isinstance(getattr(model, "num_experts_per_tok", None), int):
        model.num_experts_per_tok = k  # the causal-LM class uses it for the load-balancing loss
    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(config, "num_experts_per_tok", None), int):
        config.num_experts_per_tok = k
    select_per_k_norms(model, k)
    return previous


@contextlib.contextmanager
def dialed(model: torch.nn.Module, k: int) -> Iterator[torch.nn.Module]:
    """``with dialed(model, k):`` runs ``model`` at top-k and restores the previous k afterwards."""
    previous = set_top_k(model, k)
    try:
        yield model
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            set_top_k(model, previous)


def _phds_router_forward(router: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The PHDS soft top-k of one router (spec 1.2a): rank the top k_pre experts; the first k keep ``p_e``, ranks
    k..k_pre-1 get ``eps``; renormalise only if the router does (``norm_topk_prob``; Mixtral always does)."""
    k_pre, k, eps = router._lopkit_phds
    hidden = hidden_states.reshape(-1, router.weight.shape[1])
    logits = torch.nn.functional.linear(hidden, router.weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    top_value, top_index = torch.topk(probs, k_pre, dim=-1)
    if k < k_pre:
        dropped = torch.arange(k_pre, device=top_value.device) >= k
        top_value = torch.where(dropped, torch.full_like(top_value, eps), top_value)
    if getattr(router, "norm_topk_prob", True):  # OLMoE/Qwen2-MoE: a config flag; Mixtral: always
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    return logits, top_value.to(logits.dtype), top_index


def enable_phds_routing(model: torch.nn.Module, eps: float = 1e-6) -> int:
    """Patch every router of ``model`` with the PHDS soft mask (all k_pre experts computed, static shapes); returns
    k_pre. Choose the training k with :func:`set_phds_k`; :func:`disable_phds_routing` restores the routers."""
    if not (eps >= 0 and math.isfinite(eps)):
        raise DialError(f"eps must be a finite number >= 0, got {eps!r}")
    k_pre = pretrained_top_k(model)
    for router in _require_routers(model):
        if int(router.top_k) != k_pre:
            raise DialError(f"the routers are dialed to k={router.top_k}; set them back to k_pre={k_pre} first")
        object.__setattr__(router, "_lopkit_phds", (k_pre, k_pre, float(eps)))
        router.forward = _phds_router_forward.__get__(router)
    return k_pre


def set_phds_k(model: torch.nn.Module, k: int) -> None:
    """The k of the PHDS soft mask for the coming forward passes (1 <= k <= k_pre), the same k in every layer."""
    routers = [r for r in _require_routers(model) if hasattr(r, "_lopkit_phds")]
    if not routers:
        raise DialError("the model's routers are not PHDS-patched; call enable_phds_routing(model) first")
    k_pre, _k, eps = routers[0]._lopkit_phds
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= k_pre:
        raise DialError(f"the PHDS training k must be an integer in 1..k_pre={k_pre}, got {k!r}")
    for router in routers:
        object.__setattr__(router, "_lopkit_phds", (k_pre, k, eps))
    select_per_k_norms(model, k)


def disable_phds_routing(model: torch.nn.Module) -> None:
    """Undo :func:`enable_phds_routing`: the routers run their own top-k forward again."""
    for router in find_routers(model):
        if hasattr(router, "_lopkit_phds"):
            del router.forward
            object.__delattr__(router, "_lopkit_phds")


# -------------------------------------------------------------------------------------------- per-k norms

#: File of a saved PHDS model folder holding the per-k norm copies (``save_pretrained`` writes the shared ones).
PER_K_NORMS_FILE = "lopkit_per_k_norms.pt"


def _is_norm(module: torch.nn.Module) -> bool:
    """An RMSNorm/LayerNorm with a 1-D affine ``weight`` (OLMoE/Qwen2-MoE/Mixtral ``*RMSNorm``, torch LayerNorm)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith(("RMSNorm", "LayerNorm")) and isinstance(weight, torch.nn.Parameter)
            and weight.ndim == 1)


def _per_k_norm_forward(norm: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The norm's own class forward with its ``weight`` swapped for the copy of the selected k (gradient reaches
    the copy only)."""
    shared = norm._parameters["weight"]
    norm._parameters["weight"] = norm.lopkit_per_k[norm._lopkit_norm_key]
    try:
        return type(norm).forward(norm, *args, **kwargs)
    finally:
        norm._parameters["weight"] = shared


def per_k_norm_ks(model: torch.nn.Module) -> tuple[int, ...]:
    """The ks that have their own norm copies in ``model`` (empty while the norms are shared)."""
    return tuple(getattr(model, "_lopkit_per_k_norm_ks", ()) or ())


def add_per_k_norms(model: torch.nn.Module, ks: Sequence[int]) -> int:
    """Give every norm of a Hugging Face MoE one copy of its affine weight per k in ``ks`` (spec 1.2c, opt-in),
    initialised from the current weight and registered as ``<norm>.lopkit_per_k.k{k}``; returns the number of norms.

    From then on the copy of the nearest k in ``ks`` (:func:`lopkit.moe.model.nearest_trained_k`: ties -> the larger)
    is used at the k of :func:`set_top_k` / :func:`set_phds_k`; the shared ``weight`` is left as it was.
    """
    from lopkit.moe.model import nearest_trained_k

    routers = _require_routers(model)
    n_experts = min(int(r.num_experts) for r in routers)
    chosen = tuple(sorted(int(k) for k in ks))
    if per_k_norm_ks(model):
        raise DialError(f"per-k norms were already added for k={list(per_k_norm_ks(model))}; add them once")
    if not chosen or len(set(chosen)) != len(chosen) or not all(1 <= k <= n_experts for k in chosen):
        raise DialError(f"per-k norm ks must be distinct integers in 1..{n_experts}, got {list(ks)}")
    norms = [module for module in model.modules() if _is_norm(module)]
    if not norms:
        raise DialError(f"{type(model).__name__} has no RMSNorm/LayerNorm with a weight: no per-k norms to add")
    current = nearest_trained_k(int(routers[0].top_k), chosen)
    for norm in norms:
        norm.lopkit_per_k = torch.nn.ParameterDict(
            {f"k{k}": torch.nn.Parameter(norm.weight.detach().clone()) for k in chosen})
        object.__setattr__(norm, "_lopkit_norm_key", f"k{current}")
        norm.forward = _per_k_norm_forward.__get__(norm)
    object.__setattr__(model, "_lopkit_per_k_norm_ks", chosen)
    return len(norms)


def select_per_k_norms(model: torch.nn.Module, k: int) -> None:
    """Use the norm copies of the trained k nearest to ``k`` (no-op while the norms are shared)."""
    from lopkit.moe.model import nearest_trained_k

    ks = per_k_norm_ks(model)
    if not ks:
        return
    key = f"k{nearest_trained_k(int(k), ks)}"
    for module in model.modules():
        if hasattr(module, "_lopkit_norm_key"):
            object.__setattr__(module, "_lopkit_norm_key", key)


def per_k_norm_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The per-k norm copies of ``model`` (its state_dict entries with ``.lopkit_per_k.``), detached clones."""
    return {name: value.detach().clone() for name, value in model.state_dict().items() if ".lopkit_per_k." in name}


def hf_flops_per_token(model: torch.nn.Module, k: int) -> float:
    """FLOP proxy of a Hugging Face MoE at top-k: ``2 x (dense parameters - input embedding + k x one routed expert
    of every MoE layer)``; attention-score FLOPs (which grow with the context) are left out."""
    routed_total, routed_one = 0, 0
    for module in model.modules():
        n_experts = getattr(module, "num_experts", None)
        if not isinstance(n_experts, int) or _is_router(module):
            continue
        stacked = [p for p in module.parameters(recurse=False) if p.ndim == 3 and p.shape[0] == n_experts]
        routed_total += sum(p.numel() for p in stacked)
        routed_one += sum(p[0].numel() for p in stacked)
    embedding = model.get_input_embeddings().weight.numel() if hasattr(model, "get_input_embeddings") else 0
    # per-k norm copies (one set is used at a time, in place of the shared norms) are left out of the count
    dense = sum(p.numel() for n, p in model.named_parameters() if ".lopkit_per_k." not in n) - routed_total - embedding
    return float(2 * (dense + k * routed_one))


# ------------------------------------------------------------------------------------------------ models


@dataclass
class DialModel:
    """A model dial-k can run: logits at a given k, its k_pre and expert count, a text encoder, a FLOP proxy."""

    name: str
    kind: str  # "hf" or "lopkit"
    model: Any
    k_pre: int
    n_experts: int
    encode: Callable[[str], list[int]]
    tokenizer_note: str = ""

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """Next-token logits ``[B, T, V]`` of ``tokens`` at top-k (the model is left at k_pre afterwards)."""
        if self.kind == "lopkit":
            return self.model(tokens, k=k).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the caller warned once about k > k_pre
            with dialed(self.model, k):
                return self.model(input_ids=tokens).logits

    def flops_per_token(self, k: int) -> float:
        """The FLOP proxy at k (lopkit: :meth:`MoETransformer.flops_per_token`; HF: :func:`hf_flops_per_token`)."""
        return float(self.model.flops_per_token(k)) if self.kind == "lopkit" else hf_flops_per_token(self.model, k)

    def check_k(self, k: int) -> None:
        """DialError for k outside 1..n_experts; a warning above k_pre."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n_experts:
            raise DialError(f"k must be an integer in 1..{self.n_experts} (the number of experts per layer), got {k!r}")
        if k > self.k_pre:
            warnings.warn(f"k={k} is above the checkpoint's k_pre={self.k_pre}: allowed, but a denser k does not "
                          f"recover a denser model's quality (MoE-PHDS 1.2f)", UserWarning, stacklevel=2)


def _byte_encode(text: str) -> list[int]:
    """UTF-8 bytes as token ids (lopkit's toy model, or an HF folder without a tokenizer)."""
    return list(text.encode("utf-8"))


def _lopkit_state_model(state: dict[str, Any], name: str) -> DialModel:
    """A DialModel from a kept lopkit moe training state (``model_config`` + weights)."""
    from lopkit.moe.training import model_from_state

    model = model_from_state(state)
    return DialModel(name, "lopkit", model, int(model.config.k_pre), int(model.config.n_experts), _byte_encode)


def load_dial_model(path: str | Path, run: str | None = None) -> DialModel:
    """Load what ``lopkit moe dial MODEL`` names: a Hugging Face checkpoint folder (``config.json``, loaded with
    ``AutoModelForCausalLM.from_pretrained``), a lopkit experiment folder (``results.sqlite``: the kept state of the
    finished ``moe_pretrain`` run, or of ``run`` = a run id or label) or a ``torch.save``-d lopkit training state."""
    source = Path(path).expanduser()
    if not source.exists():
        raise DialError(f"{source} does not exist; pass a Hugging Face checkpoint folder (with config.json), a lopkit "
                        f"experiment folder (with results.sqlite) or a saved lopkit MoE state (.pt)")
    if source.is_dir() and (source / "config.json").is_file():
        return _load_hf(source)
    if source.is_dir() and (source / "results.sqlite").is_file():
        return _load_from_store(source, run)
    if source.is_file():
        try:
            state = torch.load(source, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
            raise DialError(f"{source} is not a model: torch.load failed ({type(err).__name__}); pass a Hugging Face "
                            f"checkpoint folder or a saved lopkit MoE state") from None
        if isinstance(state, dict) and "model_config" in state and "model" in state:
            return _lopkit_state_model(state, source.name)
    raise DialError(f"{source} is not a model: expected a Hugging Face checkpoint folder (with config.json), a lopkit "
                    f"experiment folder (with results.sqlite) or a saved lopkit MoE state (.pt)")


def _load_from_store(folder: Path, run: str | None) -> DialModel:
    """The kept state of a finished moe run of an experiment folder (default: its first pretrain run)."""
    from lopkit.runner.store import ResultStore

    with ResultStore(folder) as store:
        runs = store.runs()
        finished = runs[(runs["status"] == "finished") & runs["benchmark"].isin(["moe_pretrain", "moe_finetune"])]
        if run is not None:
            chosen = finished[(finished["run_id"] == run) | (finished["method"] == run)]
        else:
            chosen = finished[finished["benchmark"] == "moe_pretrain"]
        if chosen.empty:
            raise DialError(f"{folder} holds no finished moe run{'' if run is None else ' named ' + repr(run)}; "
                            f"finish 'lopkit moe pretrain --out {folder}' first or pass --run RUN_ID")
        run_id = str(chosen.sort_values("seed")["run_id"].iloc[0])
        state = store.kept_state(run_id)
    label = str(chosen.sort_values("seed")["method"].iloc[0])
    return _lopkit_state_model(state, f"{folder.name}:{label}")


def load_per_k_norms(model: torch.nn.Module, folder: str | Path) -> bool:
    """Add and load the per-k norm copies a PHDS fine-tune saved next to a checkpoint (``PER_K_NORMS_FILE``);
    False when the folder has none."""
    source = Path(folder) / PER_K_NORMS_FILE
    if not source.is_file():
        return False
    saved = torch.load(source, map_location="cpu", weights_only=True)
    add_per_k_norms(model, [int(k) for k in saved["ks"]])
    missing, unexpected = model.load_state_dict(saved["weights"], strict=False)
    wanted = set(per_k_norm_state(model))
    if unexpected or wanted & set(missing):
        raise DialError(f"{source} does not match the model's norms; delete it or save the model again")
    select_per_k_norms(model, pretrained_top_k(model))
    return True


def _load_hf(folder: Path) -> DialModel:
    """A Hugging Face causal-LM checkpoint folder, loaded offline, with its tokenizer if the folder has one."""
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise DialError("loading a Hugging Face checkpoint needs transformers: pip install 'lopkit[hf]'") from None
    hf_logging.disable_progress_bar()  # keep stderr for lopkit's own one-line errors and warnings
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DialError(f"{folder} is not a loadable Hugging Face checkpoint: {first}") from None
    model.eval()
    routers = _require_routers(model)
    encode, note = _byte_encode, "no tokenizer in the folder: text is fed as UTF-8 bytes (ids 0..255)"
    if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        encode, note = (lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])), ""
    elif model.get_input_embeddings().weight.shape[0] < 256:
        raise DialError(f"{folder} has no tokenizer and a vocabulary under 256 ids: add its tokenizer files")
    load_per_k_norms(model, folder)
    return DialModel(folder.name, "hf", model, pretrained_top_k(model), min(int(r.num_experts) for r in routers),
                     encode, note)


# ----------------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class McTask:
    """One multiple-choice item of a task file: score each choice by its summed log-likelihood after the context."""

    context: str
    choices: tuple[str, ...]
    answer: int


def load_mc_tasks(path: str | Path) -> list[McTask]:
    """A JSONL task file, one ``{"context": str, "choices": [str, ...], "answer": int}`` per line (DialError else)."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise DialError(f"task file {source} not found; pass a JSONL file of "
                        f'{{"context": ..., "choices": [...], "answer": i}} lines')
    tasks = []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            task = McTask(str(row["context"]), tuple(str(c) for c in row["choices"]), int(row["answer"]))
        except (ValueError, KeyError, TypeError):
            raise DialError(f"{source}:{number} is not a task line; expected "
                            f'{{"context": str, "choices": [str, ...], "answer": int}}') from None
        if len(task.choices) < 2 or not 0 <= task.answer < len(task.choices):
            raise DialError(f"{source}:{number}: need >= 2 choices and 0 <= answer < {len(task.choices)}")
        tasks.append(task)
    if not tasks:
        raise DialError(f"task file {source} holds no task lines")
    return tasks


@torch.no_grad()
def _mc_predictions(model: DialModel, tasks: Sequence[McTask], k: int, context_len: int) -> list[int]:
    """Argmax over choices of the summed log-likelihood of the choice tokens after the context (one row per choice)."""
    predictions = []
    for task in tasks:
        prefix = model.encode(task.context)
        scores = []
        for choice in task.choices:
            full = model.encode(task.context + choice)
            n_choice = max(1, len(full) - len(prefix))
            ids = torch.tensor([full[-(context_len + 1):]], dtype=torch.long)
            logprobs = torch.log_softmax(model.logits(ids[:, :-1], k).double(), dim=-1)[0]
            targets = ids[0, 1:]
            picked = logprobs.gather(-1, targets[:, None])[:, 0]
            scores.append(float(picked[-n_choice:].sum()))
        predictions.append(max(range(len(scores)), key=lambda i: (scores[i], -i)))
    return predictions


# ------------------------------------------------------------------------------------------------ the table


@torch.no_grad()
def _perplexity(model: DialModel, tokens: torch.Tensor, k: int, context_len: int, batch_size: int) -> tuple[float, int]:
    """``(exp(mean NLL), tokens predicted)`` of a 1-D token sequence cut into consecutive windows of ``context_len + 1``
    tokens (every token after the first of a window predicted once, from its window only)."""
    total, count = 0.0, 0
    starts = list(range(0, tokens.numel() - 1, context_len))
    for first in range(0, len(starts), batch_size):
        chunk = [tokens[s : s + context_len + 1] for s in starts[first : first + batch_size]]
        for piece in chunk:  # windows differ in length only at the end: score them one by one if so
            if piece.numel() != chunk[0].numel():
                break
        else:
            batch = torch.stack(chunk)
            logprobs = torch.log_softmax(model.logits(batch[:, :-1], k).double(), dim=-1)
            total -= float(logprobs.gather(-1, batch[:, 1:, None]).sum())
            count += batch[:, 1:].numel()
            continue
        for piece in chunk:
            logprobs = torch.log_softmax(model.logits(piece[None, :-1], k).double(), dim=-1)
            total -= float(logprobs.gather(-1, piece[None, 1:, None]).sum())
            count += piece.numel() - 1
    return math.exp(total / count), count


@torch.no_grad()
def dial_table(model: DialModel, ks: Sequence[int], text: str, tasks: Sequence[McTask] | None = None, *,
               context_len: int = 128, max_tokens: int = 8192, batch_size: int = 8) -> list[dict[str, float]]:
    """One row per k: perplexity of ``text`` (first ``max_tokens`` tokens, windows of ``context_len``), MC accuracy
    and MC agreement with k_pre (if ``tasks``), top-1 next-token agreement with k_pre, tokens/s and the FLOP proxy."""
    for k in ks:
        model.check_k(int(k))
    tokens = torch.tensor(model.encode(text)[:max_tokens], dtype=torch.long)
    if tokens.numel() < 2:
        raise DialError("the text file holds fewer than 2 tokens; pass a longer text")
    usable = (tokens.numel() - 1) // context_len * context_len
    windows = tokens[: usable].reshape(-1, context_len) if usable else tokens[None, :-1]

    def top1(k: int) -> torch.Tensor:
        return torch.cat([model.logits(chunk, k).argmax(-1) for chunk in windows.split(batch_size)]).flatten()

    reference = top1(model.k_pre)
    reference_mc = _mc_predictions(model, tasks, model.k_pre, context_len) if tasks else None
    rows = []
    for k in ks:
        k = int(k)
        start = time.perf_counter()
        ppl, predicted = _perplexity(model, tokens, k, context_len, batch_size)
        seconds = time.perf_counter() - start
        row = {"k": k, "perplexity": ppl, "tokens_per_s": predicted / max(seconds, 1e-9),
               "flops_per_token": model.flops_per_token(k),
               "token_agreement": float((top1(k) == reference).double().mean())}
        if tasks:
            predictions = _mc_predictions(model, tasks, k, context_len)
            row["mc_acc"] = sum(p == t.answer for p, t in zip(predictions, tasks)) / len(tasks)
            row["mc_agreement"] = sum(a == b for a, b in zip(predictions, reference_mc)) / len(tasks)
        rows.append(row)
    return rows


def format_dial_table(model: DialModel, rows: Sequence[dict[str, float]]) -> str:
    """The rows of :func:`dial_table` as a Markdown table (agreements are with the k_pre outputs)."""
    columns = ["k", "perplexity", "mc_acc", "mc_agreement", "token_agreement", "tokens_per_s", "flops_per_token"]
    columns = [c for c in columns if any(c in row for row in rows)]
    lines = [f"model {model.name} ({model.kind}), k_pre={model.k_pre}, experts={model.n_experts}"
             + (f"; {model.tokenizer_note}" if model.tokenizer_note else ""),
             "| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, math.nan)
            cells.append(str(int(value)) if column == "k" else f"{value:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
