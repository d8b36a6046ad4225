"""SFT batches: prompt + correct answer as byte tokens with a loss mask on the answer bytes."""

from __future__ import annotations

from typing import Sequence

import torch
from lopkit.moe.data.items import MCItem


# ----------------------------------------------------------------------------------------------------------------
# SFT batches


def sft_batch(
    items: Sequence[MCItem], context: int, *, pad_value: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + correct answer as byte tokens ``[B, context+1]`` and a loss mask ``[B, context]`` on answer bytes.

    ``mask[b, t]`` is True iff target ``tokens[b, t+1]`` is a byte of the answer. Too-long rows are truncated
    from the left (the answer is kept whole); short rows are right-padded with ``pad_value`` (masked out).
    """
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    if not items:
        raise ValueError("sft_batch needs at least one item")
    tokens = torch.full((len(items), context + 1), pad_value, dtype=torch.long)
    mask = torch.zeros((len(items), context), dtype=torch.bool)
    for row, item in enumerate(items):
        prompt = item.context.encode("utf-8")
        answer = item.choices[item.answer].encode("utf-8")
        if len(answer) > context:
            raise ValueError(
                f"answer of {len(answer)} bytes does not fit a context of {context}: {item.choices[item.answer]!r}"
            )
        if not prompt:
            raise ValueError("an SFT item needs a non-empty prompt (the first answer byte must be predicted)")
        sequence = (prompt + answer)[-(context + 1) :]
        tokens[row, : len(sequence)] = torch.tensor(list(sequence), dtype=torch.long)
        start = len(sequence) - len(answer)  # index in `sequence` of the first answer byte
        mask[row, start - 1 : len(sequence) - 1] = True
    return tokens, mask
