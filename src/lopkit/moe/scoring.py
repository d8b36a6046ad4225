"""lm-eval-harness style scoring of byte-level language models; model-agnostic.

Every function takes ``logits_fn(tokens: LongTensor[B, T]) -> Tensor[B, T, 256]``: the next-byte logits at
every position of a **causal** model (position t may only look at tokens <= t). Rows are right-padded, so a
causal model gives each row the same logits as when it runs alone (the padding sits after every scored byte).

Multiple choice (:func:`choice_logprobs`, :func:`mc_accuracy`), as in lm-eval-harness ``loglikelihood``:

* each (item, choice) pair is one row ``bytes(context + choice)``; its score is
  ``sum_t log P(choice_t | context, choice_<t)`` over the choice's bytes (the context is not scored);
* rows longer than ``context_len + 1`` bytes are truncated from the left (the choice is always kept whole);
* ``acc`` picks the argmax of the summed log-likelihood; ``acc_norm`` the argmax of the summed log-likelihood
  divided by the choice's length. lm-eval divides by the length in *characters* of the continuation; here the
  choice's UTF-8 *byte* count is used (the same for ASCII choices, and the natural unit for a byte model);
* ties go to the lowest choice index (``torch.argmax`` semantics).

Perplexity (:func:`perplexity`, :func:`language_model_stats`): every byte but the first is predicted exactly
once, from a window of at most ``context_len`` preceding bytes; consecutive windows advance by ``stride``
(``stride < context_len`` gives every prediction at least ``context_len - stride`` bytes of context, as in the
Hugging Face sliding-window recipe). Perplexity = exp(mean NLL in nats); bits/byte = mean NLL / ln 2.

Log-softmax runs in the logits' dtype; the per-byte log-probabilities are summed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lopkit.moe.data import MCItem

__all__ = [
    "LogitsFn",
    "PerplexityResult",
    "agreement",
    "choice_logprobs",
    "language_model_stats",
    "mc_accuracy",
    "perplexity",
]

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
VOCAB = 256


def _checked_logits(logits_fn: LogitsFn, tokens: torch.Tensor) -> torch.Tensor:
    """Run the model and check the logits' shape and finiteness."""
    logits = logits_fn(tokens)
    expected = (*tokens.shape, VOCAB)
    if tuple(logits.shape) != expected:
        raise ValueError(f"logits_fn returned shape {tuple(logits.shape)}, expected {expected} (B, T, 256)")
    if not torch.isfinite(logits).all():
        raise FloatingPointError("logits_fn returned NaN/inf logits; the model has diverged or is broken")
    return logits


def _choice_rows(items: Sequence[MCItem], context_len: int) -> tuple[list[list[int]], list[int], int]:
    """Byte rows (context + choice, left-truncated to context_len+1), their choice lengths, and C."""
    if not items:
        raise ValueError("no items to score")
    n_choices = len(items[0].choices)
    rows: list[list[int]] = []
    lengths: list[int] = []
    for index, item in enumerate(items):
        if len(item.choices) != n_choices:
            raise ValueError(f"item {index} has {len(item.choices)} choices, item 0 has {n_choices}; all must match")
        prompt = item.context.encode("utf-8")
        if not prompt:
            raise ValueError(f"item {index} has an empty context; the first choice byte needs something to follow")
        for choice in item.choices:
            answer = choice.encode("utf-8")
            if not 1 <= len(answer) <= context_len:
                raise ValueError(
                    f"item {index}: choice {choice!r} has {len(answer)} bytes; it must have 1..context_len="
                    f"{context_len} bytes"
                )
            rows.append(list((prompt + answer)[-(context_len + 1) :]))
            lengths.append(len(answer))
    return rows, lengths, n_choices


@torch.no_grad()
def choice_logprobs(
    logits_fn: LogitsFn, items: Sequence[MCItem], context_len: int, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log P(choice | context) ``[N, C]`` (float64) and each choice's byte count ``[N, C]`` (long).

    Rows are sorted by length (longest first) and right-padded per batch of ``batch_size`` rows.
    """
    if context_len < 1 or batch_size < 1:
        raise ValueError(f"context_len and batch_size must be >= 1, got {context_len} and {batch_size}")
    rows, lengths, n_choices = _choice_rows(items, context_len)
    scores = torch.empty(len(rows), dtype=torch.float64)
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = len(rows[chunk[0]]) - 1  # inputs are all bytes but the last
        inputs = torch.zeros((len(chunk), width), dtype=torch.long)
        targets = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)
        for b, r in enumerate(chunk):
            row = torch.tensor(rows[r], dtype=torch.long)
            n = len(row) - 1
            inputs[b, :n], targets[b, :n] = row[:-1], row[1:]
            scored[b, n - lengths[r] : n] = True
        logprobs = torch.log_softmax(_checked_logits(logits_fn, inputs), dim=-1)  # in the model's dtype
        picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()
        scores[torch.tensor(chunk)] = (picked * scored).sum(dim=1)
    n_bytes = torch.tensor(lengths, dtype=torch.long)
    return scores.view(-1, n_choices), n_bytes.view(-1, n_choices)


def mc_accuracy(
    logits_fn: LogitsFn, items: Sequence[MCItem], context_len: int, batch_size: int = 64
) -> dict[str, object]:
    """``acc`` and ``acc_norm`` (byte-length normalised) with the per-item predictions (LongTensor[N])."""
    scores, n_bytes = choice_logprobs(logits_fn, items, context_len, batch_size)
    answers = torch.tensor([item.answer for item in items], dtype=torch.long)
    predictions = scores.argmax(dim=1)
    predictions_norm = (scores / n_bytes).argmax(dim=1)
    return {
        "acc": float((predictions == answers).double().mean()),
        "acc_norm": float((predictions_norm == answers).double().mean()),
        "predictions": predictions,
        "predictions_norm": predictions_norm,
    }


def agreement(pred_a: torch.Tensor | Sequence[int], pred_b: torch.Tensor | Sequence[int]) -> float:
    """Cross-sparsity agreement A = mean 1[yhat_a == yhat_b] over items."""
    a, b = torch.as_tensor(pred_a), torch.as_tensor(pred_b)
    if a.shape != b.shape or a.ndim != 1 or a.numel() == 0:
        raise ValueError(f"predictions must be two non-empty 1-D sequences of equal length, got {a.shape}, {b.shape}")
    return float((a == b).double().mean())


@dataclass(frozen=True)
class PerplexityResult:
    """Held-out language-modelling figures: mean NLL (nats/byte), perplexity, bits/byte, predicted bytes."""

    nll: float
    perplexity: float
    bits_per_byte: float
    n_predicted: int


@torch.no_grad()
def language_model_stats(
    logits_fn: LogitsFn, tokens: torch.Tensor, context_len: int, stride: int | None = None, batch_size: int = 16
) -> PerplexityResult:
    """Sliding-window NLL of a 1-D byte sequence: each byte after the first is predicted exactly once."""
    stride = context_len if stride is None else stride
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.ndim != 1 or tokens.numel() < 2:
        raise ValueError(f"tokens must be a 1-D sequence of >= 2 bytes, got shape {tuple(tokens.shape)}")
    if context_len < 1 or not 1 <= stride <= context_len:
        raise ValueError(f"need context_len >= 1 and 1 <= stride <= context_len, got {context_len}, {stride}")
    n = tokens.numel()
    # targets tokens[s:e] are predicted from inputs tokens[a:e-1], a = max(0, e-1-context_len)
    windows = []
    for s in range(1, n, stride):
        e = min(s + stride, n)
        windows.append((max(0, e - 1 - context_len), s, e))
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        width = max(e - 1 - a for a, _, e in chunk)
        inputs = torch.zeros((len(chunk), width), dtype=torch.long)
        targets = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)
        for b, (a, s, e) in enumerate(chunk):
            inputs[b, : e - 1 - a] = tokens[a : e - 1]
            targets[b, : e - 1 - a] = tokens[a + 1 : e]
            scored[b, s - 1 - a : e - 1 - a] = True
        logprobs = torch.log_softmax(_checked_logits(logits_fn, inputs), dim=-1)
        total -= (logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double() * scored).sum()
    nll = float(total) / (n - 1)
    return PerplexityResult(nll=nll, perplexity=math.exp(nll), bits_per_byte=nll / math.log(2), n_predicted=n - 1)


def perplexity(
    logits_fn: LogitsFn, tokens: torch.Tensor, context_len: int, stride: int | None = None, batch_size: int = 16
) -> float:
    """Byte-level perplexity exp(mean NLL) of a 1-D sequence (see :func:`language_model_stats` for bits/byte)."""
    return language_model_stats(logits_fn, tokens, context_len, stride, batch_size).perplexity
