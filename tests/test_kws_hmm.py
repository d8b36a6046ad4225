"""Keyword Viterbi decoder against brute-force enumeration of every segmentation, planted keywords, streaming."""

import itertools

import numpy as np
import pytest

from lopkit.kws.hmm import (
    KeywordViterbiStream,
    estimate_log_priors,
    viterbi_keyword_scores,
)


def _brute_force(log_post, keyword, filler, log_priors=None, states_per_phone=1, self_loop=0.0, advance=0.0,
                 normalize="none"):
    """Enumerate every span [s, t] and every split of it into consecutive non-empty state segments."""
    ll = np.maximum(log_post, -69.0)
    if log_priors is not None:
        ll = ll - log_priors[None, :]
    states = [phone for phone in keyword for _ in range(states_per_phone)]
    n_states = len(states)
    n_frames = ll.shape[0]
    best = np.full(n_frames, -np.inf)
    best_start = np.full(n_frames, -1)
    for t in range(n_frames):
        for s in range(t + 1):
            length = t - s + 1
            if length < n_states:
                continue
            filler_path = sum(max(ll[tau, c] for c in filler) for tau in range(s, t + 1))
            for cuts in itertools.combinations(range(1, length), n_states - 1):
                bounds = (0, *cuts, length)
                keyword_path = 0.0
                for k in range(n_states):
                    duration = bounds[k + 1] - bounds[k]
                    keyword_path += sum(ll[s + tau, states[k]] for tau in range(bounds[k], bounds[k + 1]))
                    keyword_path += (duration - 1) * self_loop
                keyword_path += (n_states - 1) * advance
                score = keyword_path - filler_path
                if score > best[t] + 1e-12:
                    best[t], best_start[t] = score, s
    if normalize == "length":
        finite = np.isfinite(best)
        best[finite] /= np.arange(n_frames)[finite] - best_start[finite] + 1
    return best, best_start


def _random_log_post(rng, n_frames, n_classes):
    return np.log(rng.dirichlet(np.full(n_classes, 0.7), size=n_frames))


@pytest.mark.parametrize(
    "keyword,states_per_phone,self_loop,advance,normalize,use_priors",
    [
        ([1, 3], 1, 0.0, 0.0, "none", False),
        ([1, 3, 0], 1, -0.3, -0.2, "none", False),
        ([2, 2, 4], 1, 0.0, -1.0, "length", True),
        ([0, 4], 2, -0.1, 0.0, "none", True),
    ],
)
def test_viterbi_equals_brute_force_over_all_segmentations(keyword, states_per_phone, self_loop, advance, normalize,
                                                            use_priors):
    rng = np.random.default_rng(len(keyword) * 10 + states_per_phone)
    n_classes = 6
    filler = [c for c in range(n_classes) if c not in keyword]
    log_priors = np.log(rng.dirichlet(np.ones(n_classes))) if use_priors else None
    for trial in range(4):
        n_frames = 5 + trial  # 5..8 frames
        log_post = _random_log_post(rng, n_frames, n_classes)
        got = viterbi_keyword_scores(log_post, keyword, log_priors=log_priors, states_per_phone=states_per_phone,
                                     self_loop_logp=self_loop, advance_logp=advance, normalize=normalize)
        want, want_start = _brute_force(log_post, keyword, filler, log_priors, states_per_phone, self_loop, advance,
                                        normalize)
        assert np.array_equal(np.isfinite(got.score), np.isfinite(want))
        finite = np.isfinite(want)
        np.testing.assert_allclose(got.score[finite], want[finite], atol=1e-9)
        assert np.array_equal(got.start, want_start)


def test_explicit_filler_ids_and_floor_for_zero_posteriors():
    rng = np.random.default_rng(3)
    log_post = _random_log_post(rng, 7, 5)
    log_post[2, 1] = -np.inf
    got = viterbi_keyword_scores(log_post, [1, 2], filler_ids=[4])
    want, want_start = _brute_force(log_post, [1, 2], [4])
    finite = np.isfinite(want)
    np.testing.assert_allclose(got.score[finite], want[finite], atol=1e-9)
    assert np.array_equal(got.start, want_start)
    with pytest.raises(FloatingPointError):
        viterbi_keyword_scores(np.full((3, 5), np.nan), [1, 2])
    with pytest.raises(ValueError, match="out of range"):
        viterbi_keyword_scores(log_post, [1, 7])


def _planted_stream(rng, n_frames, n_classes, keyword, start, durations, filler_ids):
    """Posteriors that favour a random filler class everywhere, except the keyword's phones in order."""
    probs = np.full((n_frames, n_classes), 0.02)
    probs[np.arange(n_frames), rng.choice(filler_ids, n_frames)] = 1.0
    t = start
    for phone, duration in zip(keyword, durations):
        probs[t : t + duration] = 0.02
        probs[t : t + duration, phone] = 1.0
        t += duration
    probs += rng.uniform(0, 0.05, probs.shape)
    return np.log(probs / probs.sum(1, keepdims=True)), t - 1


def test_planted_keyword_is_found_with_its_start():
    rng = np.random.default_rng(0)
    keyword, fillers = [0, 1, 2, 3, 4], [5, 6]
    log_post, end = _planted_stream(rng, 300, 7, keyword, start=120, durations=[4, 7, 3, 9, 5], filler_ids=fillers)
    result = viterbi_keyword_scores(log_post, keyword, filler_ids=fillers)
    peak = int(np.argmax(result.score))
    assert peak == end and result.start[peak] == 120
    assert result.score[peak] > 20 and np.nanmax(result.score[:120]) < 0 and result.score[end + 1] < result.score[end]


def test_streaming_equals_offline_for_random_chunkings():
    rng = np.random.default_rng(1)
    keyword = [0, 1, 2, 3]
    log_post = _random_log_post(rng, 500, 6)
    log_priors = estimate_log_priors(rng.integers(0, 6, 1000), 6)
    offline = viterbi_keyword_scores(log_post, keyword, log_priors=log_priors, states_per_phone=2,
                                     self_loop_logp=-0.2, normalize="length")
    stream = KeywordViterbiStream(keyword, 6, log_priors=log_priors, states_per_phone=2, self_loop_logp=-0.2,
                                  normalize="length")
    scores, starts, position = [], [], 0
    while position < 500:
        size = int(rng.choice([1, 3, 40]))
        chunk = stream.step(log_post[position : position + size])
        scores.append(chunk.score)
        starts.append(chunk.start)
        position += size
    score, start = np.concatenate(scores), np.concatenate(starts)
    finite = np.isfinite(offline.score)
    assert np.array_equal(np.isfinite(score), finite)
    np.testing.assert_allclose(score[finite], offline.score[finite], atol=1e-9)
    assert np.array_equal(start, offline.start)


def test_estimate_log_priors():
    priors = estimate_log_priors(np.array([0, 0, 1, -100, 2, 2, 2]), 4, smoothing=1.0)
    np.testing.assert_allclose(np.exp(priors), np.array([3, 2, 4, 1]) / 10)
