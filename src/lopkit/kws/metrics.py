"""Wake-word metrics: triggers with a refractory period, DET curves, FRR at a fixed FA/h, start-time errors.

Definitions (also in docs/kws.md):

- **Trigger rule.** A detector fires at the first frame ``t*`` whose (smoothed) score is strictly above the
  threshold ``theta``; after a trigger it ignores every frame before ``t* + refractory_frames`` and then looks
  for the next frame above ``theta``. :func:`count_triggers` counts these triggers on a score sequence.
- **False accepts per hour (FA/h).** Triggers on the long negative stream (no keyword anywhere) divided by the
  stream's duration in hours. With the rule above the count can only grow when ``theta`` is lowered (the
  earliest-first greedy pick is the largest set of crossings spaced ``>= refractory_frames`` apart).
- **False-reject rate (FRR).** Fraction of positive utterances with no frame above ``theta`` inside the
  acceptance window (from the keyword start to ``accept_after_s`` after its end). A positive utterance is
  therefore summarised by one number: its maximum score in that window (:func:`window_max`).
- **Operating point.** For a target FA/h ``F``, the *lowest* swept threshold whose FA/h on the negative stream
  is ``<= F`` up to a relative 1e-9 for the float rounding of the stream's hours (:func:`meets_fa_target`)
  (``method="step"``, the default: a threshold one could actually deploy). ``method="linear"`` interpolates FRR
  linearly in FA/h between the two DET points bracketing ``F`` instead.
- **Relative FRR reduction** of system B over baseline A: ``(FRR_A - FRR_B) / FRR_A`` (NaN when ``FRR_A`` is 0).
- **Bootstrap interval of FRR at a target FA/h** (:func:`bootstrap_frr_at_fa`): resample the positive utterances and
  the negative stream's fixed-length blocks (60 s by default; triggers counted within each block) with replacement,
  recompute the operating point and FRR on each replicate, report the 2.5 and 97.5 percentiles.
- **False accepts by negative kind** (:func:`fa_by_kind`): each trigger on the negative stream is charged to the
  utterance it falls in or just after (``tail_s``): a confusable phrase (``confusable``), a background sentence
  (``sentence``), or, outside every utterance, the noise between them (``noise``).
- **Start error.** ``predicted_start - reference_start`` in ms for detected positives at the operating point;
  reported as the median and mean absolute error and the percentage within 50 ms.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import pandas as pd
from torch import Tensor

from lopkit.kws.features import FRAMES_PER_SECOND

__all__ = [
    "DET_COLUMNS",
    "NegativeBlocks",
    "bootstrap_frr_at_fa",
    "negative_block_counts",
    "fa_by_kind",
    "clip_auc",
    "count_triggers",
    "det_curve",
    "frr_at_fa",
    "meets_fa_target",
    "relative_reduction",
    "segment_at",
    "start_error_summary",
    "sweep_thresholds",
    "top_negative_events",
    "trigger_frames",
    "window_max",
]

DET_COLUMNS = ("threshold", "frr", "fa_per_hour", "false_accepts", "misses")
FA_RTOL = 1e-9
"""Relative tolerance of the FA/h target test: a stream's hours summed from chunks or blocks carry rounding
(six 10 min chunks sum to 0.9999999999999999 h, so 1 false accept read 1.0000000000000002 FA/h and missed 1 FA/h)."""


def meets_fa_target(fa_per_hour: np.ndarray | float, target: float) -> np.ndarray | bool:
    """``fa_per_hour <= target`` up to :data:`FA_RTOL` (float rounding of the stream's duration is not a false accept)."""
    return np.asarray(fa_per_hour) <= float(target) * (1.0 + FA_RTOL)


def _as_1d(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    """A float64 1-D array, ValueError for other shapes."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def trigger_frames(scores: np.ndarray, threshold: float, refractory_frames: int) -> np.ndarray:
    """Frames where the detector fires: first frame above ``threshold``, then nothing for ``refractory_frames``."""
    scores = _as_1d(scores, "scores")
    if refractory_frames < 1:
        raise ValueError(f"refractory_frames must be >= 1, got {refractory_frames}")
    above = np.flatnonzero(scores > threshold)
    if above.size == 0:
        return above
    # next_index[i]: the first crossing at or after above[i] + refractory (a pointer chase over at most
    # len(scores) / refractory triggers, so the loop is short even for hours of audio)
    next_index = np.searchsorted(above, above + refractory_frames, side="left")
    fired = []
    i = 0
    while i < above.size:
        fired.append(above[i])
        i = int(next_index[i])
    return np.asarray(fired, dtype=np.int64)


def count_triggers(scores: np.ndarray, threshold: float, refractory_frames: int) -> int:
    """Number of triggers of :func:`trigger_frames`."""
    return int(trigger_frames(scores, threshold, refractory_frames).size)


def window_max(scores: np.ndarray, start: int, stop: int) -> float:
    """Max score over frames ``[start, stop)`` clipped to the sequence (-inf for an empty window)."""
    scores = _as_1d(scores, "scores")
    lo, hi = max(0, int(start)), min(scores.size, int(stop))
    return float(scores[lo:hi].max()) if hi > lo else -math.inf


def sweep_thresholds(positive_max: np.ndarray, negative_scores: np.ndarray, max_points: int = 400) -> np.ndarray:
    """Thresholds for a DET sweep: quantiles of the positives' maxima and of the negatives' upper tail.

    Always includes one threshold at or above every score (FRR 1, FA/h 0) and one below every positive
    maximum, so the curve spans both ends.
    """
    positive_max = _as_1d(positive_max, "positive_max")
    negative_scores = _as_1d(negative_scores, "negative_scores")
    finite_pos = positive_max[np.isfinite(positive_max)]
    finite_neg = negative_scores[np.isfinite(negative_scores)]
    candidates = [np.quantile(finite_pos, np.linspace(0, 1, max_points // 2))] if finite_pos.size else []
    if finite_neg.size:
        tail = np.quantile(finite_neg, 1 - np.geomspace(1e-6, 0.5, max_points // 2))
        candidates.append(tail)
    everything = np.concatenate([finite_pos, finite_neg]) if (finite_pos.size or finite_neg.size) else np.zeros(1)
    top, bottom = float(everything.max()), float(everything.min())
    span = max(1e-6, top - bottom)
    candidates.append(np.array([top + 1e-3 * span, bottom - 1e-3 * span]))
    return np.unique(np.concatenate(candidates))


def det_curve(
    positive_max: Sequence[float] | np.ndarray,
    negative_stream_scores: np.ndarray | Sequence[np.ndarray],
    negative_hours: float,
    refractory_frames: int = FRAMES_PER_SECOND,
    thresholds: Sequence[float] | np.ndarray | None = None,
) -> pd.DataFrame:
    """DET curve as a DataFrame (threshold, frr, fa_per_hour, false_accepts, misses), thresholds ascending.

    ``positive_max``: each positive utterance's max score in its acceptance window (:func:`window_max`);
    ``negative_stream_scores``: the score sequence of the negative stream (or a list of separate streams,
    triggers counted per stream and summed); ``negative_hours``: total duration of those streams.
    """
    positive_max = _as_1d(positive_max, "positive_max")
    if positive_max.size == 0:
        raise ValueError("det_curve needs at least one positive utterance")
    if not negative_hours > 0:
        raise ValueError(f"negative_hours must be > 0, got {negative_hours}")
    streams = [negative_stream_scores] if isinstance(negative_stream_scores, np.ndarray) else list(negative_stream_scores)
    streams = [_as_1d(s, "negative_stream_scores") for s in streams]
    if thresholds is None:
        thresholds = sweep_thresholds(positive_max, np.concatenate(streams) if streams else np.zeros(0))
    thresholds = np.sort(_as_1d(thresholds, "thresholds"))
    rows = []
    for theta in thresholds:
        misses = int(np.sum(~(positive_max > theta)))
        false_accepts = sum(count_triggers(s, float(theta), refractory_frames) for s in streams)
        rows.append((float(theta), misses / positive_max.size, false_accepts / negative_hours, false_accepts, misses))
    return pd.DataFrame(rows, columns=list(DET_COLUMNS))


def frr_at_fa(det: pd.DataFrame, fa_per_hour: float, method: str = "step") -> dict[str, float]:
    """FRR at the operating point for a target FA/h (see the module docstring); returns frr, threshold, fa_per_hour.

    ``step``: the lowest threshold with FA/h <= target (its FRR and actual FA/h); ``linear``: FRR linearly
    interpolated in FA/h between the bracketing points (threshold interpolated the same way).
    """
    if method not in ("step", "linear"):
        raise ValueError(f"method must be 'step' or 'linear', got {method!r}")
    if det.empty:
        raise ValueError("empty DET curve")
    ordered = det.sort_values("threshold").reset_index(drop=True)
    allowed = ordered[meets_fa_target(ordered["fa_per_hour"].to_numpy(), fa_per_hour)]
    if allowed.empty:  # even the highest threshold false-accepts too often: reject everything
        return {"frr": 1.0, "threshold": math.inf, "fa_per_hour": 0.0}
    best = allowed.iloc[0]  # lowest threshold meeting the target
    result = {"frr": float(best["frr"]), "threshold": float(best["threshold"]), "fa_per_hour": float(best["fa_per_hour"])}
    if method == "step":
        return result
    index = int(allowed.index[0])
    if index == 0 or float(best["fa_per_hour"]) == fa_per_hour:
        return result
    above = ordered.iloc[index - 1]  # next lower threshold: FA/h above the target
    fa_lo, fa_hi = float(best["fa_per_hour"]), float(above["fa_per_hour"])
    if fa_hi <= fa_lo:
        return result
    weight = (fa_per_hour - fa_lo) / (fa_hi - fa_lo)
    frr = float(best["frr"]) + weight * (float(above["frr"]) - float(best["frr"]))
    threshold = float(best["threshold"]) + weight * (float(above["threshold"]) - float(best["threshold"]))
    return {"frr": frr, "threshold": threshold, "fa_per_hour": float(fa_per_hour)}


def relative_reduction(baseline: float, system: float) -> float:
    """``(baseline - system) / baseline``: e.g. 0.73 for a 73 % relative FRR reduction (NaN if baseline is 0)."""
    if not baseline > 0:
        return math.nan
    return (baseline - system) / baseline


def start_error_summary(predicted_s: Sequence[float], reference_s: Sequence[float], tolerance_ms: float = 50.0) -> dict[str, float]:
    """Median/mean absolute start error (ms), % within ``tolerance_ms`` and count, over pairs with finite values."""
    predicted = _as_1d(predicted_s, "predicted_s")
    reference = _as_1d(reference_s, "reference_s")
    if predicted.shape != reference.shape:
        raise ValueError(f"predicted_s and reference_s differ in length: {predicted.size} vs {reference.size}")
    keep = np.isfinite(predicted) & np.isfinite(reference)
    errors_ms = np.abs(predicted[keep] - reference[keep]) * 1000.0
    if errors_ms.size == 0:
        return {"median_abs_ms": math.nan, "mean_abs_ms": math.nan, "within_pct": math.nan, "n": 0}
    return {
        "median_abs_ms": float(np.median(errors_ms)),
        "mean_abs_ms": float(np.mean(errors_ms)),
        "within_pct": float(100.0 * np.mean(errors_ms <= tolerance_ms)),
        "n": int(errors_ms.size),
    }


def clip_auc(positive: Tensor, negative: Tensor) -> float:
    """Area under the ROC curve of clip scores: P(positive > negative) + P(tie) / 2 (NaN if a class is empty)."""
    if positive.numel() == 0 or negative.numel() == 0:
        return math.nan
    diff = positive.double().reshape(-1, 1) - negative.double().reshape(1, -1)
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


def _operating_frr(frr: np.ndarray, fa: np.ndarray, target: float) -> np.ndarray:
    """FRR at the lowest threshold whose FA/h <= target, per row of ``frr``/``fa`` ``[R, n_thresholds]`` (1 if none)."""
    allowed = meets_fa_target(fa, target)
    first = np.argmax(allowed, axis=1)
    out = frr[np.arange(frr.shape[0]), first]
    return np.where(allowed.any(axis=1), out, 1.0)


@dataclasses.dataclass(frozen=True)
class NegativeBlocks:
    """Trigger counts of fixed-length negative-stream blocks at each threshold: what the bootstrap resamples."""

    thresholds: np.ndarray  # ascending
    counts: np.ndarray  # [n_blocks, n_thresholds] triggers within each block
    hours: np.ndarray  # [n_blocks] duration of each block


def negative_block_counts(
    negative_stream_scores: np.ndarray | Sequence[np.ndarray],
    thresholds: Sequence[float] | np.ndarray,
    refractory_frames: int = FRAMES_PER_SECOND,
    block_frames: int = 60 * FRAMES_PER_SECOND,
) -> NegativeBlocks:
    """Cut the negative streams into ``block_frames``-long blocks and count each block's triggers per threshold.

    Computed once per stream and threshold grid, it serves every split's :func:`bootstrap_frr_at_fa`.
    """
    if block_frames < 1:
        raise ValueError(f"block_frames must be >= 1, got {block_frames}")
    streams = [negative_stream_scores] if isinstance(negative_stream_scores, np.ndarray) else list(negative_stream_scores)
    blocks = [_as_1d(s, "negative_stream_scores")[i:i + block_frames]
              for s in streams for i in range(0, len(s), block_frames)]
    blocks = [b for b in blocks if b.size]
    if not blocks:
        raise ValueError("bootstrap_frr_at_fa needs a non-empty negative stream")
    thresholds = np.sort(_as_1d(thresholds, "thresholds"))
    counts = np.array([[count_triggers(b, float(t), refractory_frames) for t in thresholds] for b in blocks])
    hours = np.array([b.size for b in blocks], dtype=np.float64) / FRAMES_PER_SECOND / 3600.0
    return NegativeBlocks(thresholds, counts, hours)


def bootstrap_frr_at_fa(
    positive_max: Sequence[float] | np.ndarray,
    negative: np.ndarray | Sequence[np.ndarray] | NegativeBlocks,
    fa_per_hour: float | Sequence[float],
    thresholds: Sequence[float] | np.ndarray,
    refractory_frames: int = FRAMES_PER_SECOND,
    block_frames: int = 60 * FRAMES_PER_SECOND,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[float, tuple[float, float]]:
    """Percentile bootstrap interval of FRR at each target FA/h: ``{fa: (low, high)}`` (see the module docstring).

    Positives and ``block_frames``-long blocks of the negative streams are resampled independently; every
    replicate recomputes the step operating point on ``thresholds``. The generator is seeded by ``seed``.
    ``negative`` is the negative stream(s), or their :func:`negative_block_counts` on the same thresholds.
    """
    from lopkit.seeding import derive_seed

    positive_max = _as_1d(positive_max, "positive_max")
    if positive_max.size == 0:
        raise ValueError("bootstrap_frr_at_fa needs at least one positive utterance")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1 or block_frames < 1:
        raise ValueError(f"n_boot and block_frames must be >= 1, got {n_boot}, {block_frames}")
    thresholds = np.sort(_as_1d(thresholds, "thresholds"))
    if not isinstance(negative, NegativeBlocks):
        negative = negative_block_counts(negative, thresholds, refractory_frames, block_frames)
    elif not np.array_equal(negative.thresholds, thresholds):
        raise ValueError("the negative block counts were made on another threshold grid")
    counts, hours = negative.counts, negative.hours
    rng = np.random.default_rng(derive_seed(int(seed), 0x4B5753))
    block_index = rng.integers(0, hours.size, size=(n_boot, hours.size))
    pos_index = rng.integers(0, positive_max.size, size=(n_boot, positive_max.size))
    fa = counts[block_index].sum(axis=1) / hours[block_index].sum(axis=1, keepdims=True)  # [R, n_thr]
    sampled = np.sort(positive_max[pos_index], axis=1)
    misses = np.stack([np.searchsorted(row, thresholds, side="right") for row in sampled])  # max <= theta: a miss
    frr = misses / positive_max.size
    targets = [fa_per_hour] if np.isscalar(fa_per_hour) else list(fa_per_hour)
    tail = 100.0 * (1.0 - level) / 2.0
    out = {}
    for target in targets:
        values = _operating_frr(frr, fa, float(target))
        out[float(target)] = (float(np.percentile(values, tail)), float(np.percentile(values, 100.0 - tail)))
    return out


def fa_by_kind(
    negative_stream_scores: Sequence[np.ndarray],
    segments: Sequence[Sequence[dict]],
    threshold: float,
    negative_hours: float,
    refractory_frames: int = FRAMES_PER_SECOND,
    tail_s: float = 0.5,
) -> dict[str, float]:
    """FA/h at ``threshold`` split by the kind of negative each trigger falls in (see the module docstring).

    ``segments[i]`` lists stream ``i``'s utterances as dicts with ``start_s``, ``end_s`` and ``kind``; a trigger at
    frame ``t`` happens at ``(160 t + 400) / 16000`` s and is charged to the last utterance that started before it
    and ended less than ``tail_s`` earlier, else to ``noise``. Kinds without triggers are reported as 0.
    """
    if len(negative_stream_scores) != len(segments):
        raise ValueError(f"{len(negative_stream_scores)} streams but {len(segments)} segment lists")
    if not negative_hours > 0:
        raise ValueError(f"negative_hours must be > 0, got {negative_hours}")
    counts: dict[str, int] = {"noise": 0}
    for scores, utterances in zip(negative_stream_scores, segments):
        ordered = sorted(utterances, key=lambda u: float(u["start_s"]))
        for utterance in ordered:
            counts.setdefault(str(utterance.get("kind", "") or "unknown"), 0)
        for frame in trigger_frames(scores, threshold, refractory_frames):
            hit = segment_at((int(frame) * 160 + 400) / 16000, ordered, tail_s)
            counts["noise" if hit is None else str(hit.get("kind", "") or "unknown")] += 1
    return {kind: n / negative_hours for kind, n in sorted(counts.items())}


def segment_at(time_s: float, ordered_segments: Sequence[dict], tail_s: float = 0.5) -> dict | None:
    """The utterance a stream event at ``time_s`` is charged to: the last one started before it and ended less than
    ``tail_s`` earlier (``ordered_segments`` sorted by ``start_s``); None for the noise between utterances."""
    starts = np.array([float(u["start_s"]) for u in ordered_segments])
    index = int(np.searchsorted(starts, time_s, side="right")) - 1
    if index >= 0 and time_s <= float(ordered_segments[index]["end_s"]) + tail_s:
        return ordered_segments[index]
    return None


def top_negative_events(
    negative_stream_scores: Sequence[np.ndarray],
    segments: Sequence[Sequence[dict]],
    top: int = 50,
    window_frames: int = FRAMES_PER_SECOND,
    tail_s: float = 0.5,
) -> pd.DataFrame:
    """The highest-scoring events of the negative streams, with the utterance each falls in (what false-accepts first).

    Each stream is cut into ``window_frames``-long windows, each summarised by its maximum; taken from the highest
    down, a window's maximum is an event unless it lies within ``window_frames`` of an event already taken in the
    same stream (so one utterance's peak is listed once, and peaks 1 s apart are both kept). Columns: stream, frame,
    time_s (window end of the frame, as for triggers), score, kind (``noise`` outside every utterance, see
    :func:`fa_by_kind`), text, engine, voice; sorted by score, highest first, at most ``top`` rows.
    """
    if len(negative_stream_scores) != len(segments):
        raise ValueError(f"{len(negative_stream_scores)} streams but {len(segments)} segment lists")
    if window_frames < 1 or top < 1:
        raise ValueError(f"window_frames and top must be >= 1, got {window_frames}, {top}")
    candidates = []  # (score, stream, frame)
    for stream, scores in enumerate(negative_stream_scores):
        scores = _as_1d(scores, "negative_stream_scores")
        if scores.size == 0:
            continue
        padded = np.full(-(-scores.size // window_frames) * window_frames, -np.inf)
        padded[:scores.size] = scores
        windows = padded.reshape(-1, window_frames)
        frames = np.arange(windows.shape[0]) * window_frames + np.argmax(windows, axis=1)
        candidates += [(float(v), stream, int(f)) for v, f in zip(windows.max(axis=1), frames)]
    candidates.sort(key=lambda c: -c[0])  # stable: ties keep stream and time order
    taken: list[tuple[float, int, int]] = []
    for score, stream, frame in candidates:
        if len(taken) == top:
            break
        if all(s != stream or abs(f - frame) >= window_frames for _v, s, f in taken):
            taken.append((score, stream, frame))
    rows = []
    ordered = [sorted(u, key=lambda x: float(x["start_s"])) for u in segments]
    for score, stream, frame in taken:
        time_s = (frame * 160 + 400) / 16000
        hit = segment_at(time_s, ordered[stream], tail_s) or {}
        rows.append({"stream": stream, "frame": frame, "time_s": time_s, "score": score,
                     "kind": str(hit.get("kind", "") or ("noise" if not hit else "unknown")),
                     "text": str(hit.get("text", "")), "engine": str(hit.get("engine", "")),
                     "voice": str(hit.get("voice", ""))})
    return pd.DataFrame(rows, columns=["stream", "frame", "time_s", "score", "kind", "text", "engine", "voice"])
