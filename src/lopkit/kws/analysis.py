"""Why a spotter fires: occlusion tests over the keyword's parts (issue 19's diagnosis).

A streaming detector that decides at the keyword's end must remember its start to tell "hey computer" from
"fey computer". :func:`occlusion_test` measures whether it does: it replaces the frames of one part of each positive
clip (the keyword's first word, its first or last phone, or a control span as long as the first word before it) with the
clip's noise floor, scores the clips again with the model's own scorer, and counts how many positives still reach
a threshold inside their acceptance window. A model that uses the keyword's start loses most detections when the
first word is occluded; one that hears only the end keeps them.

Definitions (all in 10 ms frames, ``round(100 x seconds)``):

- parts come from the clip's phone events ``[phone, start_s, end_s, word_index, inside_keyword]``; the first word
  is every keyword phone of the lowest keyword word index, the first and last phones are the keyword's first and
  final phones;
- the control span has the first word's length and ends 5 frames before the keyword start (clips with too little
  lead-in are left out of every condition, so all conditions score the same positives);
- occlusion value: per mel bin, the clip's 10th-percentile log-mel over time (its noise floor);
- detection: the smoothed score (causal mean of ``smooth_frames``) exceeds the threshold anywhere in
  ``[keyword start, keyword end + accept_frames)``, the window of the evaluation's FRR.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from lopkit.kws.features import FRAMES_PER_SECOND

PARTS = ("first_word", "first_phone", "last_phone", "control")
CONTROL_GAP_FRAMES = 5


def keyword_parts(phones: Sequence[Sequence[Any]]) -> dict[str, tuple[int, int]] | None:
    """Frame spans ``[start, stop)`` of the keyword's first word, first phone and last phone (None: no keyword phones)."""
    inside = [p for p in phones if len(p) >= 5 and int(p[4]) == 1]
    if not inside:
        return None
    first_word = min(int(p[3]) for p in inside)
    word = [p for p in inside if int(p[3]) == first_word]
    first, last = min(inside, key=lambda p: float(p[1])), max(inside, key=lambda p: float(p[2]))
    return {"first_word": (_frame(word[0][1]), _frame(word[-1][2])), "first_phone": (_frame(first[1]), _frame(first[2])),
            "last_phone": (_frame(last[1]), _frame(last[2]))}


def _frame(seconds: float) -> int:
    """The evaluation's frame of a time: ``round(100 x seconds)``."""
    return int(round(FRAMES_PER_SECOND * float(seconds)))


def control_span(first_word: tuple[int, int], keyword_start: int) -> tuple[int, int] | None:
    """A span as long as the first word, ending ``CONTROL_GAP_FRAMES`` before the keyword (None if it does not fit)."""
    length = first_word[1] - first_word[0]
    stop = keyword_start - CONTROL_GAP_FRAMES
    return (stop - length, stop) if length > 0 and stop - length >= 0 else None


def occlude(feats: Tensor, span: tuple[int, int], quantile: float = 0.1) -> Tensor:
    """A copy of ``feats [n_mels, T]`` with frames ``[start, stop)`` set to the clip's per-bin ``quantile`` over time."""
    out = feats.clone()
    floor = torch.quantile(feats.float(), quantile, dim=-1).to(feats.dtype)
    start, stop = max(0, span[0]), min(feats.shape[-1], span[1])
    out[:, start:stop] = floor[:, None]
    return out


def occlusion_test(model: torch.nn.Module, kind: str, feats: Tensor, start_s: Tensor, end_s: Tensor,
                   phones: Sequence, hmm: dict[str, Any] | None, threshold: float, smooth_frames: int = 3,
                   accept_frames: int = 100) -> dict[str, Any]:
    """Detection rates of the positives ``feats [N, n_mels, T]`` intact and with each keyword part occluded.

    Returns ``n`` (positives used), ``threshold`` and, per condition (``intact`` and each of :data:`PARTS`), the
    detection rate at ``threshold`` and at the intact clips' median window peak (``rate_at_median``: 0.5 for the
    intact clips by construction, so a drop reads directly as lost evidence).
    """
    from lopkit.kws.metrics import window_max
    from lopkit.kws.pipeline import _positive_windows, clip_scores
    from lopkit.kws.stream import causal_moving_average

    lows, highs = _positive_windows(np.asarray(start_s, dtype=np.float64), np.asarray(end_s, dtype=np.float64),
                                    accept_frames)  # the evaluation's FRR windows
    spans: dict[str, list] = {name: [] for name in PARTS}
    chosen = []
    for i in range(feats.shape[0]):
        if math.isnan(float(start_s[i])):
            continue
        parts = keyword_parts(phones[i])
        control = control_span(parts["first_word"], int(lows[i])) if parts else None
        if parts is None or control is None:
            continue
        chosen.append(i)
        for name in ("first_word", "first_phone", "last_phone"):
            spans[name].append(parts[name])
        spans["control"].append(control)
    if not chosen:
        raise ValueError("no positive clip has keyword phone events and room for a control span before the keyword")
    base = feats[chosen].float()

    def window_peaks(batch: Tensor) -> np.ndarray:
        """Per chosen clip: the highest smoothed score of ``batch`` inside its acceptance window."""
        scores, _ = clip_scores(model, kind, batch, hmm)
        return np.array([window_max(causal_moving_average(row, smooth_frames), lows[i], highs[i])
                         for row, i in zip(scores, chosen)])

    intact = window_peaks(base)
    median_peak = float(np.median(intact))
    result: dict[str, Any] = {"n": len(chosen), "threshold": float(threshold), "median_peak": median_peak}
    for name in ("intact", *PARTS):
        peaks = intact if name == "intact" else window_peaks(
            torch.stack([occlude(clip, span) for clip, span in zip(base, spans[name])]))
        result[name] = {"rate": float((peaks > threshold).mean()),
                        "rate_at_median": float((peaks > median_peak).mean() + 0.5 * (peaks == median_peak).mean())}
    return result
