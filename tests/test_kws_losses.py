"""HEiMDaL losses against hand-worked examples (labels, class balancing, offsets, ablations, phone targets)."""

import math

import pytest
import torch

from lopkit.kws.losses import (
    IGNORE_INDEX,
    batch_frame_targets,
    class_balanced_weights,
    detection_loss,
    frame_targets,
    heimdal_loss,
    offset_loss,
    phone_frame_loss,
    phone_frame_targets,
    seconds_to_frame,
    utterance_loss,
    window_maxpool_loss,
)


def _decode(pattern):
    """'0' = negative, '1' = positive, 'x' = ignored -> (labels, weights)."""
    labels = torch.tensor([1.0 if c == "1" else 0.0 for c in pattern])
    weights = torch.tensor([0.0 if c == "x" else 1.0 for c in pattern])
    return labels, weights


def _bce(z, y):
    p = 1 / (1 + math.exp(-z))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def _smooth_l1(d):
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


# Worked by hand: T=30, keyword start s=8, end e=14, delta=5, margin=3.
#   frames 0..4   (t < s-m = 5)            -> 0
#   frames 5..13  (s-m <= t < e)           -> ignored (lead margin + keyword)
#   frames 14..19 (e <= t <= e+delta)      -> 1
#   frames 20..22 (e+delta < t <= e+d+m)   -> ignored (tail margin)
#   frames 23..29 (t > e+delta+m = 22)     -> 0
HAND_PATTERN = "00000" + "x" * 9 + "111111" + "xxx" + "0" * 7


def test_frame_targets_match_the_hand_worked_30_frame_example():
    labels, weights = frame_targets(30, 8, 14, delta=5, margin=3)
    expected_labels, expected_weights = _decode(HAND_PATTERN)
    assert torch.equal(labels, expected_labels) and torch.equal(weights, expected_weights)


def test_frame_targets_edges_and_negatives():
    labels, weights = frame_targets(20, 2, 15, delta=10, margin=5)  # window runs past the clip end
    expected_labels, expected_weights = _decode("x" * 15 + "11111")
    assert torch.equal(labels, expected_labels) and torch.equal(weights, expected_weights)
    for missing in (None, float("nan")):
        labels, weights = frame_targets(12, missing, missing)
        assert labels.sum() == 0 and weights.sum() == 12
    with pytest.raises(ValueError, match="before its start"):
        frame_targets(10, 5, 3)
    y, w = batch_frame_targets(30, [8, float("nan"), torch.tensor(8.0)], [14, float("nan"), 14], delta=5, margin=3)
    assert y.shape == (3, 30) and torch.equal(y[0], y[2]) and y[1].sum() == 0 and w[1].sum() == 30
    assert seconds_to_frame(0.144) == 14 and seconds_to_frame(0.146) == 15


def test_balanced_detection_loss_equals_mean_of_class_means():
    labels, valid = _decode(HAND_PATTERN)
    logits = torch.linspace(-3, 2.5, 30)
    weights = class_balanced_weights(labels, valid, "balanced")
    loss = detection_loss(logits, labels, weights)
    pos = [_bce(float(logits[t]), 1) for t in range(30) if HAND_PATTERN[t] == "1"]
    neg = [_bce(float(logits[t]), 0) for t in range(30) if HAND_PATTERN[t] == "0"]
    assert len(pos) == 6 and len(neg) == 12
    assert math.isclose(float(loss), 0.5 * sum(pos) / 6 + 0.5 * sum(neg) / 12, rel_tol=1e-6)
    unweighted = detection_loss(logits, labels, class_balanced_weights(labels, valid, "none"))
    assert math.isclose(float(unweighted), (sum(pos) + sum(neg)) / 18, rel_tol=1e-6)
    pos_weighted = detection_loss(logits, labels, class_balanced_weights(labels, valid, "pos_weight", pos_weight=3.0))
    assert math.isclose(float(pos_weighted), (3 * sum(pos) + sum(neg)) / (3 * 6 + 12), rel_tol=1e-6)
    with pytest.raises(ValueError, match="balance"):
        class_balanced_weights(labels, valid, "inverse")


def test_offset_loss_and_total_on_the_hand_example():
    labels, valid = _decode(HAND_PATTERN)
    offsets = torch.zeros(30)
    offsets[14:20] = torch.tensor([0.05, 0.07, 0.07, 2.0, 0.10, -1.0])  # scaled targets (t-8)/100 = .06 .. .11
    scale = 0.01
    expected_off = sum(_smooth_l1(float(offsets[t]) - scale * (t - 8)) for t in range(14, 20)) / 6
    positive = (labels > 0.5) & (valid > 0)
    off = offset_loss(offsets[None], torch.tensor([8]), positive[None], offset_scale=scale)
    assert math.isclose(float(off), expected_off, rel_tol=1e-6)
    logits = torch.linspace(-3, 2.5, 30)
    parts = heimdal_loss(logits[None], offsets[None], labels[None], valid[None], torch.tensor([8.0]),
                         offset_weight=0.7, offset_scale=scale)
    cls = detection_loss(logits, labels, class_balanced_weights(labels, valid))
    assert math.isclose(float(parts.total), float(cls) + 0.7 * expected_off, rel_tol=1e-6)
    assert math.isclose(parts.classification, float(cls), rel_tol=1e-6) and math.isclose(parts.offset, expected_off, rel_tol=1e-6)
    no_offset = heimdal_loss(logits[None], None, labels[None], valid[None], torch.tensor([8.0]))
    assert math.isclose(float(no_offset.total), float(cls), rel_tol=1e-6) and no_offset.offset == 0.0


def test_losses_have_gradients_and_handle_empty_and_nan():
    logits = torch.zeros(2, 10, requires_grad=True)
    offsets = torch.zeros(2, 10, requires_grad=True)
    y, w = batch_frame_targets(10, [None, None], [None, None])
    parts = heimdal_loss(logits, offsets, y, w, torch.tensor([float("nan"), float("nan")]))
    parts.total.backward()
    assert math.isclose(float(parts.total.detach()), math.log(2), rel_tol=1e-6) and parts.offset == 0.0
    assert offsets.grad is not None and offsets.grad.abs().sum() == 0
    with pytest.raises(FloatingPointError, match="NaN"):
        detection_loss(torch.full((1, 4), float("nan")), torch.zeros(1, 4), torch.ones(1, 4))
    with pytest.raises(FloatingPointError):
        offset_loss(torch.full((1, 4), float("nan")), torch.tensor([0]), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="shapes"):
        detection_loss(torch.zeros(1, 4), torch.zeros(1, 5), torch.ones(1, 4))


def test_utterance_loss_is_bce_of_max_pooled_logit():
    logits = torch.tensor([[-2.0, 1.5, 0.3, -4.0], [-1.0, -3.0, -0.5, 9.0]])
    loss = utterance_loss(logits, torch.tensor([1, 0]), lengths=torch.tensor([4, 3]))
    expected = (_bce(1.5, 1) + _bce(-0.5, 0)) / 2  # second clip: frame 3 is padding
    assert math.isclose(float(loss), expected, rel_tol=1e-6)


def test_window_maxpool_loss_on_a_small_case():
    labels, valid = _decode("00xx11x0")
    logits = torch.tensor([-1.0, 0.5, 7.0, 7.0, 0.2, 1.1, 7.0, -2.0])
    negatives = [_bce(-1.0, 0), _bce(0.5, 0), _bce(-2.0, 0)]
    expected = 0.5 * _bce(1.1, 1) + 0.5 * sum(negatives) / 3
    assert math.isclose(float(window_maxpool_loss(logits[None], labels[None], valid[None])), expected, rel_tol=1e-6)


def test_phone_frame_targets_and_cross_entropy():
    targets = phone_frame_targets(12, [(2, 3, 6), (5, 6, 9)], background_id=0)
    assert targets.tolist() == [0, 0, 0, 2, 2, 2, 5, 5, 5, 0, 0, 0]
    fuzzy = phone_frame_targets(12, [(2, 3, 6), (5, 6, 9)], background_id=0, ignore_boundaries=1)
    i = IGNORE_INDEX
    assert fuzzy.tolist() == [0, 0, i, i, 2, i, i, 5, i, i, 0, 0]
    assert phone_frame_targets(5, [(1, 3, 9)], background_id=4).tolist() == [4, 4, 4, 1, 1]
    with pytest.raises(ValueError, match="overlap"):
        phone_frame_targets(12, [(2, 3, 7), (5, 6, 9)], background_id=0)
    logits = torch.randn(1, 6, 12)
    loss = phone_frame_loss(logits, fuzzy[None])
    log_probs = torch.log_softmax(logits[0], dim=0)
    kept = [t for t in range(12) if fuzzy[t] != i]
    expected = -sum(float(log_probs[fuzzy[t], t]) for t in kept) / len(kept)
    assert math.isclose(float(loss), expected, rel_tol=1e-5)


def test_offset_training_mask_spans_from_inside_the_keyword_to_the_window_end():
    from lopkit.kws.losses import batch_frame_targets, offset_training_mask

    labels, valid = batch_frame_targets(60, [10, float("nan")], [30, float("nan")], delta=5, margin=2)
    mask = offset_training_mask(labels, valid, torch.tensor([10.0, float("nan")]), 4)
    positive = (labels[0] > 0.5) & (valid[0] > 0)
    last = int(torch.nonzero(positive).max())
    expected = torch.zeros(60, dtype=torch.bool)
    expected[14:last + 1] = True
    assert torch.equal(mask[0], expected)
    assert not mask[1].any()  # a clip without a keyword trains no offset
