"""lopkit.kws.metrics: triggers, DET points by hand, FRR at FA/h, relative reduction, start errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from lopkit.kws.metrics import (
    count_triggers,
    det_curve,
    frr_at_fa,
    relative_reduction,
    start_error_summary,
    sweep_thresholds,
    trigger_frames,
    window_max,
)


def _brute_force_max_spaced(crossings: list[int], spacing: int) -> int:
    """Largest subset of crossings with pairwise gaps >= spacing (exhaustive)."""
    best = 0
    for size in range(len(crossings), 0, -1):
        for subset in itertools.combinations(crossings, size):
            if all(b - a >= spacing for a, b in zip(subset, subset[1:])):
                return size
    return best


def test_trigger_frames_by_hand():
    scores = np.array([0, 0.9, 0.95, 0.2, 0.8, 0.1, 0.0, 0.7, 0.9, 0.0])
    # threshold 0.5: crossings 1,2,4,7,8; refractory 3 -> fire at 1, skip to >=4 -> 4, skip to >=7 -> 7
    assert trigger_frames(scores, 0.5, 3).tolist() == [1, 4, 7]
    assert trigger_frames(scores, 0.5, 5).tolist() == [1, 7]
    assert count_triggers(scores, 0.95, 1) == 0  # strictly above
    assert count_triggers(scores, 0.94, 1) == 1


def test_trigger_count_is_max_spaced_subset_and_monotone():
    rng = np.random.default_rng(0)
    for _ in range(30):
        scores = rng.random(14)
        refractory = int(rng.integers(1, 5))
        previous = None
        for theta in sorted(set(np.round(scores, 6)) | {1.1}, reverse=True):
            n = count_triggers(scores, theta, refractory)
            crossings = np.flatnonzero(scores > theta).tolist()
            assert n == _brute_force_max_spaced(crossings, refractory)
            if previous is not None:
                assert n >= previous  # lowering the threshold never removes a false accept
            previous = n


def test_det_curve_hand_computed_points():
    positive_max = np.array([0.9, 0.6, 0.3, 0.8])
    stream = np.array([0.1, 0.7, 0.2, 0.1, 0.5, 0.55, 0.1, 0.1])
    det = det_curve(positive_max, stream, negative_hours=0.5, refractory_frames=2, thresholds=[0.25, 0.5, 0.65, 0.85])
    assert list(det.columns) == ["threshold", "frr", "fa_per_hour", "false_accepts", "misses"]
    # theta 0.25: misses none; stream crossings 1,4,5 -> triggers 1,4 (5 is within 2 of 4) -> 2 FA / 0.5 h = 4
    # theta 0.5 : misses 0.3 -> frr 1/4; crossings 1,5 -> 2 FA -> 4/h
    # theta 0.65: misses 0.6, 0.3 -> 1/2; crossings 1 -> 2/h
    # theta 0.85: misses all but 0.9 -> 3/4; no crossing -> 0/h
    expected = pd.DataFrame({"frr": [0.0, 0.25, 0.5, 0.75], "fa_per_hour": [4.0, 4.0, 2.0, 0.0]})
    np.testing.assert_allclose(det["frr"], expected["frr"])
    np.testing.assert_allclose(det["fa_per_hour"], expected["fa_per_hour"])
    assert det["false_accepts"].tolist() == [2, 2, 1, 0]


def test_det_curve_sums_separate_streams():
    a, b = np.array([0.0, 0.9, 0.0]), np.array([0.9, 0.0, 0.9])
    det = det_curve([1.0], [a, b], negative_hours=1.0, refractory_frames=2, thresholds=[0.5])
    assert det["false_accepts"].tolist() == [1 + 2]


def test_frr_at_fa_step_and_linear():
    det = pd.DataFrame({"threshold": [0.1, 0.3, 0.5, 0.7, 0.9], "frr": [0.0, 0.1, 0.2, 0.4, 1.0],
                        "fa_per_hour": [10.0, 6.0, 2.0, 1.0, 0.0], "false_accepts": 0, "misses": 0})
    step = frr_at_fa(det, 3.0)
    assert step["threshold"] == 0.5 and step["frr"] == 0.2 and step["fa_per_hour"] == 2.0
    linear = frr_at_fa(det, 3.0, method="linear")
    # between (fa 2, frr 0.2) and (fa 6, frr 0.1): weight (3-2)/(6-2) = 0.25 -> 0.2 - 0.025
    assert linear["frr"] == pytest.approx(0.175)
    assert linear["threshold"] == pytest.approx(0.5 - 0.25 * 0.2)
    assert frr_at_fa(det, 100.0)["frr"] == 0.0
    exact = frr_at_fa(det, 1.0, method="linear")
    assert exact["frr"] == 0.4
    none_ok = pd.DataFrame({"threshold": [0.5], "frr": [0.0], "fa_per_hour": [5.0], "false_accepts": 5, "misses": 0})
    assert frr_at_fa(none_ok, 1.0)["frr"] == 1.0
    with pytest.raises(ValueError, match="method"):
        frr_at_fa(det, 1.0, method="cubic")


def test_sweep_thresholds_span_both_ends():
    pos = np.array([0.2, 0.8, 0.9])
    neg = np.linspace(0, 0.95, 1000)
    thresholds = sweep_thresholds(pos, neg)
    det = det_curve(pos, neg, 1.0, 10, thresholds)
    assert det["frr"].iloc[-1] == 1.0 and det["fa_per_hour"].iloc[-1] == 0.0
    assert det["frr"].iloc[0] == 0.0
    assert np.all(np.diff(det["frr"].to_numpy()) >= 0)
    assert np.all(np.diff(det["fa_per_hour"].to_numpy()) <= 0)


def test_window_max_and_relative_reduction():
    scores = np.array([0.1, 0.5, 0.3, 0.9])
    assert window_max(scores, 1, 3) == 0.5
    assert window_max(scores, -5, 100) == 0.9
    assert window_max(scores, 4, 6) == -math.inf
    assert relative_reduction(0.4, 0.1) == pytest.approx(0.75)
    assert math.isnan(relative_reduction(0.0, 0.1))


def test_start_error_summary():
    predicted = [1.00, 1.02, 0.90, np.nan, 2.0]
    reference = [1.01, 1.00, 1.00, 1.0, 2.2]
    summary = start_error_summary(predicted, reference, tolerance_ms=50)
    errors = np.array([10.0, 20.0, 100.0, 200.0])
    assert summary["n"] == 4
    assert summary["median_abs_ms"] == pytest.approx(np.median(errors))
    assert summary["mean_abs_ms"] == pytest.approx(errors.mean())
    assert summary["within_pct"] == pytest.approx(50.0)
    with pytest.raises(ValueError):
        start_error_summary([1.0], [1.0, 2.0])


def test_bootstrap_interval_with_one_replicate_is_the_resampled_operating_point():
    """n_boot=1: both ends equal FRR at the operating point recomputed by det_curve on the same resample."""
    from lopkit.kws.metrics import bootstrap_frr_at_fa, det_curve, frr_at_fa, sweep_thresholds
    from lopkit.seeding import derive_seed

    rng = np.random.default_rng(5)
    positive_max = rng.uniform(0.2, 1.0, size=40)
    stream = rng.uniform(0.0, 0.6, size=6000 * 5) ** 3
    thresholds = sweep_thresholds(positive_max, stream)
    interval = bootstrap_frr_at_fa(positive_max, stream, [2.0, 50.0], thresholds, refractory_frames=100,
                                   block_frames=6000, n_boot=1, seed=3)
    draw = np.random.default_rng(derive_seed(3, 0x4B5753))
    blocks = [stream[i:i + 6000] for i in range(0, stream.size, 6000)]
    picked = [blocks[i] for i in draw.integers(0, len(blocks), size=(1, len(blocks)))[0]]
    resampled = positive_max[draw.integers(0, positive_max.size, size=(1, positive_max.size))[0]]
    det = det_curve(resampled, picked, sum(b.size for b in picked) / 100 / 3600, 100, thresholds)
    for target in (2.0, 50.0):
        expected = frr_at_fa(det, target)["frr"]
        assert interval[target] == pytest.approx((expected, expected))


def test_bootstrap_interval_brackets_the_point_estimate_and_is_reproducible():
    from lopkit.kws.metrics import bootstrap_frr_at_fa, det_curve, frr_at_fa, sweep_thresholds

    rng = np.random.default_rng(6)
    positive_max = rng.uniform(0.3, 1.0, size=200)
    stream = rng.uniform(0.0, 0.7, size=6000 * 20) ** 2
    thresholds = sweep_thresholds(positive_max, stream)
    point = frr_at_fa(det_curve(positive_max, stream, stream.size / 100 / 3600, 100, thresholds), 30.0)["frr"]
    first = bootstrap_frr_at_fa(positive_max, stream, 30.0, thresholds, n_boot=300, seed=1)
    assert first == bootstrap_frr_at_fa(positive_max, stream, 30.0, thresholds, n_boot=300, seed=1)
    low, high = first[30.0]
    assert low <= point <= high and low < high
    with pytest.raises(ValueError, match="positive"):
        bootstrap_frr_at_fa([], stream, 1.0, thresholds)


def test_fa_by_kind_charges_each_trigger_to_the_utterance_it_falls_in():
    from lopkit.kws.metrics import fa_by_kind

    scores = np.zeros(2000)
    # window end of frame t is (160 t + 400) / 16000 s = t / 100 + 0.025 s
    for frame in (150, 420, 1100, 1900):
        scores[frame] = 1.0
    segments = [{"start_s": 1.0, "end_s": 2.0, "kind": "confusable"},  # frame 150 -> 1.525 s: inside
                {"start_s": 3.0, "end_s": 3.9, "kind": "sentence"},  # frame 420 -> 4.225 s: within 0.5 s after
                {"start_s": 12.0, "end_s": 13.0, "kind": "sentence"}]  # frame 1100 -> 11.025 s: before it: noise
    hours = 2000 / 100 / 3600
    result = fa_by_kind([scores], [segments], 0.5, hours, refractory_frames=100)
    assert result == pytest.approx({"confusable": 1 / hours, "sentence": 1 / hours, "noise": 2 / hours})
    with pytest.raises(ValueError, match="segment lists"):
        fa_by_kind([scores], [], 0.5, hours)


def test_precomputed_negative_blocks_give_the_same_interval_and_must_match_the_grid():
    from lopkit.kws.metrics import bootstrap_frr_at_fa, negative_block_counts, sweep_thresholds

    rng = np.random.default_rng(7)
    positive_max = rng.uniform(0.3, 1.0, size=60)
    stream = rng.uniform(0.0, 0.7, size=6000 * 4) ** 2
    thresholds = sweep_thresholds(positive_max, stream)
    blocks = negative_block_counts(stream, thresholds, 100)
    assert blocks.counts.shape == (4, thresholds.size)
    assert bootstrap_frr_at_fa(positive_max, blocks, [1.0, 30.0], thresholds, n_boot=200, seed=2) == \
        bootstrap_frr_at_fa(positive_max, stream, [1.0, 30.0], thresholds, n_boot=200, seed=2)
    with pytest.raises(ValueError, match="threshold grid"):
        bootstrap_frr_at_fa(positive_max, blocks, 1.0, thresholds[:-1], n_boot=10)


def test_one_false_accept_in_an_hour_of_chunks_meets_one_fa_per_hour():
    """Issue 19: six 10 min chunks sum to 0.9999999999999999 h; their single false accept still meets 1 FA/h."""
    from lopkit.kws.metrics import bootstrap_frr_at_fa, meets_fa_target

    chunk_hours = [600 * 16000 / 16000 / 3600] * 6
    hours = sum(chunk_hours)
    assert hours < 1.0  # the rounding the evaluation used to carry
    chunks = [np.zeros(60000) for _ in range(6)]
    chunks[2][30000] = 0.9  # the hour's only false accept, above every positive
    positive_max = np.full(20, 0.5)
    thresholds = np.array([0.25, 0.7, 1.0])
    det = det_curve(positive_max, chunks, hours, 100, thresholds)
    assert det["false_accepts"].tolist() == [1, 1, 0]
    op = frr_at_fa(det, 1.0)
    assert op["threshold"] == 0.25 and op["frr"] == 0.0
    assert meets_fa_target(1 / hours, 1.0) and not meets_fa_target(1.001, 1.0)
    # the bootstrap's replicate hours are sums of block hours too: one trigger per 10 min block is 6 FA/h exactly
    blocks = [np.zeros(60000) for _ in range(6)]
    for block in blocks:
        block[100] = 0.9
    interval = bootstrap_frr_at_fa(positive_max, np.concatenate(blocks), [6.0], thresholds, refractory_frames=100,
                                   block_frames=60000, n_boot=50, seed=0)
    assert interval[6.0] == (0.0, 0.0)


def test_top_negative_events_lists_each_peak_once_with_its_utterance():
    from lopkit.kws.metrics import top_negative_events

    scores = np.zeros(1000)
    scores[198:203] = [0.5, 0.8, 0.9, 0.7, 0.6]  # one utterance's peak straddling the 1 s window edge at frame 200
    scores[610] = 0.95  # inside the second utterance's 0.5 s tail
    scores[900] = 0.3  # between utterances: noise
    segments = [{"start_s": 1.0, "end_s": 2.0, "kind": "confusable", "text": "hey commuter", "engine": "espeak",
                 "voice": "en"},
                {"start_s": 5.0, "end_s": 5.8, "kind": "sentence", "text": "a sentence", "engine": "flite",
                 "voice": "kal"}]
    events = top_negative_events([scores], [segments], top=3)
    assert events["frame"].tolist() == [610, 200, 900]  # highest first, the straddling peak listed once
    assert events["kind"].tolist() == ["sentence", "confusable", "noise"]
    assert events["text"].tolist()[:2] == ["a sentence", "hey commuter"]
    assert events["time_s"].tolist()[1] == pytest.approx((200 * 160 + 400) / 16000)
    rest = top_negative_events([scores], [segments], top=50)
    assert rest["frame"].tolist() == [610, 200, 900, 0, 300, 400, 500, 800]  # then flat windows >= 1 s from those
    close = np.zeros(1000)
    close[[133, 299]] = [0.9, 0.8]  # two utterances' peaks 1.66 s apart in adjacent windows: both listed
    assert top_negative_events([close], [[]], top=2)["frame"].tolist() == [133, 299]
