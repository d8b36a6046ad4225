"""HEiMDaL training losses (spec 2.2): alignment-window frame labels, class-balanced BCE, start-offset regression;
the utterance-level ablation; phone frame targets and cross-entropy for the DNN-HMM baseline.

Frame labels for one utterance of ``T`` frames with keyword start ``s`` and end ``e`` (frames, ``s <= e``):

- ``y_t = 1`` for ``e <= t <= e + delta`` (the network fires just after hearing the whole keyword);
- ``y_t = 0`` for ``t < s - margin`` and ``t > e + delta + margin``;
- ignored (weight 0): the lead margin ``s - margin <= t < s``, the keyword itself ``s <= t < e`` and the tail
  margin ``e + delta < t <= e + delta + margin``;
- a negative utterance (no keyword: ``start=None`` or NaN) has ``y_t = 0`` with weight 1 on every frame.

Classification loss ``L_cls = sum_t w_t BCE(sigmoid(z_t), y_t) / sum_t w_t`` where ``w_t`` = valid mask times a
class weight. ``balance="balanced"`` sets the class weights so that positive and negative frames of the batch
carry equal total weight (``L_cls = (mean BCE over positive frames + mean BCE over negative frames) / 2`` when both
exist); ``"none"`` uses weight 1; ``"pos_weight"`` uses ``pos_weight`` on positive frames and 1 on negatives.

Offset loss on the positive frames P (``y_t = 1``, valid): target ``o_t = offset_scale * (t - s)``,
``L_off = mean_{t in P} SmoothL1(o_hat_t - o_t)``. Total ``L = L_cls + offset_weight * L_off``.

Utterance-level ablation (no alignment): one label per clip; the clip's logit is the max over its frames
(max-pooling over time, the standard alignment-free KWS loss), ``L = mean_b BCE(sigmoid(max_t z_bt), label_b)``.
The alternative alignment-based max-pool loss (Sun et al. 2017) is :func:`window_maxpool_loss`.

Time/frame conversion: :func:`seconds_to_frame` rounds ``seconds * 100`` (the frame whose start is nearest).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch.nn import functional as F

from lopkit.kws.features import FRAMES_PER_SECOND

__all__ = [
    "FRAMES_PER_SECOND",
    "IGNORE_INDEX",
    "seconds_to_frame",
    "frame_targets",
    "batch_frame_targets",
    "class_balanced_weights",
    "offset_training_mask",
    "detection_loss",
    "offset_loss",
    "HeimdalLoss",
    "heimdal_loss",
    "utterance_loss",
    "window_maxpool_loss",
    "phone_frame_targets",
    "phone_frame_loss",
]

IGNORE_INDEX = -100


def seconds_to_frame(seconds: float) -> int:
    """Frame index (10 ms hop) whose start time is nearest to ``seconds``."""
    return int(round(float(seconds) * FRAMES_PER_SECOND))


def _is_missing(value) -> bool:
    return value is None or math.isnan(float(value))


def frame_targets(n_frames: int, start_frame: int | float | None, end_frame: int | float | None,
                  delta: int = 15, margin: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Alignment-window labels ``y[T]`` and validity weights ``w[T]`` (1 = labelled, 0 = ignored) for one utterance."""
    if n_frames < 0 or delta < 0 or margin < 0:
        raise ValueError(f"frame_targets: need n_frames, delta, margin >= 0; got {n_frames}, {delta}, {margin}")
    labels = torch.zeros(n_frames)
    weights = torch.ones(n_frames)
    if _is_missing(start_frame) or _is_missing(end_frame):
        return labels, weights
    start, end = int(round(float(start_frame))), int(round(float(end_frame)))
    if end < start:
        raise ValueError(f"frame_targets: keyword end {end} is before its start {start}")
    frames = torch.arange(n_frames)
    positive = (frames >= end) & (frames <= end + delta)
    ignored = ((frames >= start - margin) & (frames < end)) | ((frames > end + delta) & (frames <= end + delta + margin))
    labels[positive] = 1.0
    weights[ignored] = 0.0
    return labels, weights


def batch_frame_targets(n_frames: int, start_frames: Sequence, end_frames: Sequence, delta: int = 15,
                        margin: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack :func:`frame_targets` over a batch: ``y[B, T]``, ``w[B, T]`` (None/NaN start = negative clip)."""
    if len(start_frames) != len(end_frames):
        raise ValueError(f"batch_frame_targets: {len(start_frames)} starts but {len(end_frames)} ends")
    pairs = [frame_targets(n_frames, _as_scalar(s), _as_scalar(e), delta, margin) for s, e in zip(start_frames, end_frames)]
    if not pairs:
        return torch.zeros(0, n_frames), torch.zeros(0, n_frames)
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def _as_scalar(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if value is not None and not isinstance(value, int):
        value = float(value)
        return value if math.isnan(value) else int(round(value))
    return value


def class_balanced_weights(labels: torch.Tensor, valid: torch.Tensor, balance: str = "balanced",
                           pos_weight: float = 1.0) -> torch.Tensor:
    """Per-frame loss weights: ``valid`` times a class weight (see module docstring for the modes)."""
    if labels.shape != valid.shape:
        raise ValueError(f"class_balanced_weights: labels {tuple(labels.shape)} vs valid {tuple(valid.shape)}")
    valid = valid.float()
    positive = (labels > 0.5).float() * valid
    negative = (labels <= 0.5).float() * valid
    if balance == "none":
        return valid
    if balance == "pos_weight":
        return negative + pos_weight * positive
    if balance == "balanced":
        n_pos, n_neg = positive.sum(), negative.sum()
        if n_pos == 0 or n_neg == 0:
            return valid
        return negative / n_neg + positive / n_pos
    raise ValueError(f"class_balanced_weights: balance must be 'balanced', 'none' or 'pos_weight'; got {balance!r}")


def _check_finite(loss: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"{name} is {loss.item()}: check the inputs for NaN/inf (features, model outputs) and lower the learning rate"
        )
    return loss


def detection_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted per-frame BCE ``sum w BCE(sigmoid(z), y) / sum w`` over ``[B, T]`` (0 if all weights are 0)."""
    if not (logits.shape == labels.shape == weights.shape):
        raise ValueError(f"detection_loss: shapes differ: z {tuple(logits.shape)}, y {tuple(labels.shape)}, "
                         f"w {tuple(weights.shape)}")
    per_frame = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    total_weight = weights.sum()
    if total_weight <= 0:
        return _check_finite(logits.sum() * 0.0, "detection loss")
    return _check_finite((per_frame * weights).sum() / total_weight, "detection loss")


def offset_loss(offsets: torch.Tensor, start_frames: torch.Tensor, positive_mask: torch.Tensor,
                offset_scale: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """SmoothL1 between ``o_hat[B, T]`` and ``offset_scale * (t - s_b)`` averaged over positive frames."""
    if offsets.shape != positive_mask.shape:
        raise ValueError(f"offset_loss: offsets {tuple(offsets.shape)} vs mask {tuple(positive_mask.shape)}")
    start_frames = torch.as_tensor(start_frames, dtype=offsets.dtype, device=offsets.device).reshape(-1, 1)
    if start_frames.shape[0] != offsets.shape[0]:
        raise ValueError(f"offset_loss: {start_frames.shape[0]} start frames for a batch of {offsets.shape[0]}")
    mask = positive_mask.bool()
    if not mask.any():
        return _check_finite(offsets.sum() * 0.0, "offset loss")
    frames = torch.arange(offsets.shape[1], dtype=offsets.dtype, device=offsets.device)
    targets = offset_scale * (frames.unsqueeze(0) - torch.nan_to_num(start_frames, nan=0.0))
    loss = F.smooth_l1_loss(offsets[mask], targets.expand_as(offsets)[mask], beta=beta)
    return _check_finite(loss, "offset loss")


def offset_training_mask(labels: torch.Tensor, valid: torch.Tensor, start_frames: torch.Tensor,
                         min_frames_after_start: int) -> torch.Tensor:
    """Frames from ``start + min_frames_after_start`` to the last positive-window frame, for clips with a keyword.

    The start estimate is read at the first threshold crossing, which is often inside the keyword, before the
    positive window ``e..e+Delta`` where the offset head is trained by default; this mask trains it there too.
    """
    positive = (labels > 0.5) & (valid > 0)
    frames = torch.arange(labels.shape[-1], device=labels.device)
    last = torch.where(positive, frames, torch.full_like(frames, -1)).amax(dim=-1, keepdim=True)
    starts = torch.nan_to_num(torch.as_tensor(start_frames, dtype=torch.float64, device=labels.device),
                              nan=float("inf")).reshape(-1, 1)
    return (frames >= starts + min_frames_after_start) & (frames <= last) & positive.any(dim=-1, keepdim=True)


class HeimdalLoss(NamedTuple):
    """Total loss and its parts (the parts are detached floats for logging)."""

    total: torch.Tensor
    classification: float
    offset: float


def heimdal_loss(logits: torch.Tensor, offsets: torch.Tensor | None, labels: torch.Tensor, valid: torch.Tensor,
                 start_frames: torch.Tensor, offset_weight: float = 1.0, offset_scale: float = 1.0,
                 balance: str = "balanced", pos_weight: float = 1.0, beta: float = 1.0,
                 offset_mask: torch.Tensor | None = None) -> HeimdalLoss:
    """``L_cls + offset_weight * L_off`` from targets of :func:`batch_frame_targets` (offsets None = no offset head).

    The offset loss covers the positive-window frames unless ``offset_mask`` says which frames (see
    :func:`offset_training_mask`).
    """
    weights = class_balanced_weights(labels, valid, balance, pos_weight)
    classification = detection_loss(logits, labels, weights)
    if offsets is None or offset_weight == 0.0:
        return HeimdalLoss(classification, classification.item(), 0.0)
    positive = (labels > 0.5) & (valid > 0) if offset_mask is None else offset_mask
    off = offset_loss(offsets, start_frames, positive, offset_scale, beta)
    return HeimdalLoss(classification + offset_weight * off, classification.item(), off.item())


def utterance_loss(logits: torch.Tensor, clip_labels: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Alignment-free ablation: BCE of the max-over-time logit of each clip against its clip label (0/1)."""
    if logits.dim() != 2:
        raise ValueError(f"utterance_loss: expected logits [B, T], got {tuple(logits.shape)}")
    clip_labels = torch.as_tensor(clip_labels, dtype=logits.dtype, device=logits.device).reshape(-1)
    if clip_labels.shape[0] != logits.shape[0]:
        raise ValueError(f"utterance_loss: {clip_labels.shape[0]} labels for a batch of {logits.shape[0]}")
    if lengths is not None:
        frames = torch.arange(logits.shape[1], device=logits.device)
        beyond = frames.unsqueeze(0) >= torch.as_tensor(lengths, device=logits.device).reshape(-1, 1)
        logits = logits.masked_fill(beyond, float("-inf"))
    pooled = logits.max(dim=1).values
    return _check_finite(F.binary_cross_entropy_with_logits(pooled, clip_labels), "utterance loss")


def window_maxpool_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Max-pool variant (Sun et al. 2017): positive clips get BCE(max over their y=1 window, 1); every valid
    negative frame gets BCE(z_t, 0); the two terms are averaged with equal weight (each over its own count)."""
    if not (logits.shape == labels.shape == valid.shape):
        raise ValueError("window_maxpool_loss: logits, labels and valid must share the shape [B, T]")
    positive = (labels > 0.5) & (valid > 0)
    negative = (labels <= 0.5) & (valid > 0)
    parts = []
    has_window = positive.any(dim=1)
    if has_window.any():
        pooled = logits.masked_fill(~positive, float("-inf")).max(dim=1).values[has_window]
        parts.append(F.binary_cross_entropy_with_logits(pooled, torch.ones_like(pooled)))
    if negative.any():
        parts.append(F.binary_cross_entropy_with_logits(logits[negative], torch.zeros_like(logits[negative])))
    if not parts:
        return logits.sum() * 0.0
    return _check_finite(sum(parts) / len(parts), "max-pool loss")


def phone_frame_targets(n_frames: int, phone_segments: Sequence[tuple[int, int, int]], background_id: int,
                        ignore_boundaries: int = 0) -> torch.Tensor:
    """Per-frame class ids ``[T]`` from ``(phone_id, start_frame, end_frame)`` segments (end exclusive).

    Frames covered by no segment get ``background_id`` (filler/silence). With ``ignore_boundaries = k > 0`` the
    ``k`` frames on either side of every segment boundary get :data:`IGNORE_INDEX` (alignment uncertainty).
    """
    targets = torch.full((n_frames,), int(background_id), dtype=torch.long)
    previous_end = None
    for phone_id, start, end in phone_segments:
        start, end = int(start), int(end)
        if end < start:
            raise ValueError(f"phone_frame_targets: segment ({phone_id}, {start}, {end}) ends before it starts")
        if previous_end is not None and start < previous_end:
            raise ValueError(f"phone_frame_targets: segment starting at {start} overlaps the previous one "
                             f"(ending at {previous_end}); phone timings must be sorted and disjoint")
        previous_end = end
        targets[max(0, start) : max(0, min(end, n_frames))] = int(phone_id)
    if ignore_boundaries > 0:
        boundaries = {b for _, s, e in phone_segments for b in (int(s), int(e))}
        for boundary in boundaries:
            targets[max(0, boundary - ignore_boundaries) : max(0, min(n_frames, boundary + ignore_boundaries))] = IGNORE_INDEX
    return targets


def phone_frame_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Frame cross-entropy of ``logits[B, C, T]`` against ``targets[B, T]`` (IGNORE_INDEX frames skipped)."""
    if logits.dim() != 3 or targets.shape != (logits.shape[0], logits.shape[2]):
        raise ValueError(f"phone_frame_loss: logits [B, C, T] and targets [B, T] expected; got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    if not (targets != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return _check_finite(F.cross_entropy(logits, targets.long(), ignore_index=IGNORE_INDEX), "phone frame loss")
