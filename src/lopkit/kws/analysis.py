"""Why a spotter fires: occlusion tests over the keyword's parts (issue 19's diagnosis).

A streaming detector that decides at the keyword's end must remember its start to tell "hey computer" from
"fey computer". :func:`occlusion_test` measures whether it does: it replaces the frames of one part of each positive
clip (the keyword's first word, its last phone, or a control span of the same length before the keyword) with the
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
    return int(round(100 * float(seconds)))


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


def detected(smoothed: np.ndarray, windows: np.ndarray, threshold: float) -> np.ndarray:
    """Per clip: whether ``smoothed [N, T]`` exceeds ``threshold`` inside its window ``windows [N, 2]``."""
    return np.array([bool(np.any(row[lo:hi] > threshold)) for row, (lo, hi) in zip(smoothed, windows)])


def window_peaks(smoothed: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Per clip: the highest smoothed score inside its window (-inf for an empty one)."""
    return np.array([float(np.max(row[lo:hi])) if hi > lo else -math.inf for row, (lo, hi) in zip(smoothed, windows)])


def occlusion_test(model: torch.nn.Module, kind: str, feats: Tensor, start_s: Tensor, end_s: Tensor,
                   phones: Sequence, hmm: dict[str, Any] | None, threshold: float, smooth_frames: int = 3,
                   accept_frames: int = 100) -> dict[str, Any]:
    """Detection rates of the positives ``feats [N, n_mels, T]`` intact and with each keyword part occluded.

    Returns ``n`` (positives used), ``threshold`` and, per condition (``intact`` and each of :data:`PARTS`), the
    detection rate at ``threshold`` and at the intact clips' median window peak (``rate_at_median``: 0.5 for the
    intact clips by construction, so a drop reads directly as lost evidence).
    """
    from lopkit.kws.pipeline import clip_scores
    from lopkit.kws.stream import causal_moving_average

    spans: dict[str, list] = {name: [] for name in PARTS}
    chosen, windows = [], []
    for i in range(feats.shape[0]):
        if math.isnan(float(start_s[i])):
            continue
        parts = keyword_parts(phones[i])
        start = _frame(start_s[i])
        control = control_span(parts["first_word"], start) if parts else None
        if parts is None or control is None:
            continue
        chosen.append(i)
        windows.append((start, _frame(end_s[i]) + accept_frames))
        for name in ("first_word", "first_phone", "last_phone"):
            spans[name].append(parts[name])
        spans["control"].append(control)
    if not chosen:
        raise ValueError("no positive clip has keyword phone events and room for a control span before the keyword")
    windows_arr = np.asarray(windows)
    base = feats[chosen].float()

    def smoothed_of(batch: Tensor) -> np.ndarray:
        scores, _ = clip_scores(model, kind, batch, hmm)
        return np.stack([causal_moving_average(row, smooth_frames) for row in scores])

    intact = smoothed_of(base)
    median_peak = float(np.median(window_peaks(intact, windows_arr)))
    result: dict[str, Any] = {"n": len(chosen), "threshold": float(threshold), "median_peak": median_peak}
    for name in ("intact", *PARTS):
        smoothed = intact if name == "intact" else smoothed_of(
            torch.stack([occlude(clip, span) for clip, span in zip(base, spans[name])]))
        peaks = window_peaks(smoothed, windows_arr)
        result[name] = {"rate": float(detected(smoothed, windows_arr, threshold).mean()),
                        "rate_at_median": float((peaks > median_peak).mean() + 0.5 * (peaks == median_peak).mean())}
    return result
