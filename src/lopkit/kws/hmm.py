"""Keyword-vs-filler Viterbi decoding for the DNN-HMM baseline (NumPy, online).

Model. The frame classifier gives log posteriors ``log p(c | x_t)`` over keyword phones plus filler/silence
classes. Hybrid "scaled likelihoods" are ``ll[t, c] = log p(c | x_t) - prior_scale * log p(c)`` (Bayes' rule up to
a per-frame constant, which cancels in the keyword-minus-filler difference); without ``log_priors`` the
posteriors are used as they are. Log posteriors are floored at ``LOG_FLOOR`` (-69, about log 1e-30) so that no
infinities enter the sums.

- Keyword HMM: a left-to-right chain of ``K = n_phones * states_per_phone`` states; state ``k`` emits
  ``ll[t, phone(k)]``; each state has a self-loop (log prob ``self_loop_logp``) and an advance to the next state
  (``advance_logp``); both default to 0 (no transition scores, as is usual in hybrid keyword decoding). Every
  state is occupied for at least one frame, so a phone lasts at least ``states_per_phone`` frames. A keyword path
  may start at any frame (free entry, no cost) and ends when it leaves the last state.
- Filler model: a free loop over the filler classes, i.e. at each frame the best single filler class:
  ``f[t] = max_{c in filler_ids} ll[t, c]`` (default filler: every class not in the keyword).
- Score of a keyword path over the span ``[s, t]`` = its keyword log score minus ``sum_{tau=s..t} f[tau]`` (the
  filler path over the same span). This difference decomposes per frame, so the best path ending at ``t``
  maximises ``sum ll[tau, phone(k_tau)] - f[tau]`` + transition scores; ``score[t]`` is that maximum and
  ``start[t]`` is the first frame of the maximising path (from the backtrace; kept as a start pointer).
- ``normalize="length"`` divides ``score[t]`` by the duration ``t - start[t] + 1`` of that best (sum-maximising)
  path; it is *not* the maximum over paths of the per-frame average. ``normalize="none"`` returns the raw sum.

Algorithm. For one state, the Viterbi recursion ``D[t] = a[t] + max(D[t-1] + c_self, E[t-1])`` (``E`` = the
previous state's scores plus ``c_adv``) is a max-plus linear recurrence with the closed form
``D[t] = S[t] + t c_self + max_{j <= t} (E[j-1] - S[j-1] - j c_self)`` (``S`` = prefix sums of ``a``), i.e. a
running maximum. The decoder therefore sweeps the K states, each one vectorised over time with
``np.maximum.accumulate``: O(K T) work and no Python loop over frames. Exact ties (measure zero for real-valued
posteriors) resolve to the latest entry into each state. The same code continues from a carried state, so :class:`KeywordViterbiStream` is exact online
(per-chunk or per-frame) and equals the offline decoder.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

__all__ = [
    "LOG_FLOOR",
    "KeywordScores",
    "scaled_log_likelihoods",
    "estimate_log_priors",
    "keyword_state_phones",
    "viterbi_keyword_scores",
    "KeywordViterbiStream",
]

LOG_FLOOR = -69.0


class KeywordScores(NamedTuple):
    """Per-frame keyword-vs-filler score and the start frame of the best keyword path ending at that frame."""

    score: np.ndarray  # [T] float64 (-inf before any complete keyword path fits)
    start: np.ndarray  # [T] int64 (-1 where score is -inf)


def estimate_log_priors(frame_labels: np.ndarray, n_classes: int, smoothing: float = 1.0) -> np.ndarray:
    """Log class priors from training frame labels (ids < 0 ignored), add-``smoothing`` counts."""
    labels = np.asarray(frame_labels).reshape(-1)
    labels = labels[labels >= 0]
    if labels.size and labels.max() >= n_classes:
        raise ValueError(f"estimate_log_priors: label {labels.max()} out of range for {n_classes} classes")
    counts = np.bincount(labels.astype(np.int64), minlength=n_classes).astype(np.float64) + smoothing
    return np.log(counts / counts.sum())


def scaled_log_likelihoods(log_post: np.ndarray, log_priors: np.ndarray | None = None,
                           prior_scale: float = 1.0) -> np.ndarray:
    """``max(log_post, LOG_FLOOR) - prior_scale * log_priors`` as float64 ``[T, C]``."""
    log_post = np.asarray(log_post, dtype=np.float64)
    if log_post.ndim != 2:
        raise ValueError(f"expected log posteriors [T, n_classes], got shape {log_post.shape}")
    if np.isnan(log_post).any():
        raise FloatingPointError("log posteriors contain NaN; check the acoustic model's outputs")
    ll = np.maximum(log_post, LOG_FLOOR)
    if log_priors is not None:
        log_priors = np.asarray(log_priors, dtype=np.float64).reshape(-1)
        if log_priors.shape[0] != ll.shape[1]:
            raise ValueError(f"log_priors has {log_priors.shape[0]} classes, posteriors have {ll.shape[1]}")
        ll = ll - prior_scale * np.maximum(log_priors, LOG_FLOOR)
    return ll


def keyword_state_phones(keyword_phone_ids: Sequence[int], states_per_phone: int = 1) -> np.ndarray:
    """Class id emitted by each keyword HMM state (each phone repeated ``states_per_phone`` times)."""
    if states_per_phone < 1:
        raise ValueError(f"states_per_phone must be >= 1; got {states_per_phone}")
    ids = np.asarray(list(keyword_phone_ids), dtype=np.int64)
    if ids.size == 0:
        raise ValueError("keyword_phone_ids is empty; give the class ids of the keyword's phones")
    return np.repeat(ids, states_per_phone)


def _filler_ids(n_classes: int, keyword_phone_ids: Sequence[int], filler_ids: Sequence[int] | None) -> np.ndarray:
    if filler_ids is None:
        filler = np.setdiff1d(np.arange(n_classes), np.asarray(list(keyword_phone_ids)))
    else:
        filler = np.unique(np.asarray(list(filler_ids), dtype=np.int64))
    if filler.size == 0:
        raise ValueError("no filler classes: pass filler_ids (e.g. the filler and silence class ids)")
    if filler.min() < 0 or filler.max() >= n_classes:
        raise ValueError(f"filler_ids out of range for {n_classes} classes: {filler.tolist()}")
    return filler


def _running_argmax(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Running max of ``values`` and, per position, the latest index attaining it."""
    running = np.maximum.accumulate(values)
    index = np.where(values >= running, np.arange(values.shape[0]), -1)
    return running, np.maximum.accumulate(index)


def _viterbi_chunk(adjusted: np.ndarray, prev_score: np.ndarray, prev_start: np.ndarray, first_frame: int,
                   self_loop_logp: float, advance_logp: float) -> tuple[np.ndarray, np.ndarray]:
    """State scores ``D[L, K]`` and start pointers for a chunk, continuing from the previous frame's ``D``/starts."""
    length, n_states = adjusted.shape
    scores = np.empty((length, n_states))
    starts = np.empty((length, n_states), dtype=np.int64)
    local = np.arange(length)
    for state in range(n_states):
        prefix = np.cumsum(adjusted[:, state])
        prefix_before = np.concatenate([[0.0], prefix[:-1]])  # S[j-1]
        if state == 0:
            entry = np.zeros(length)  # free entry at every frame
            entry_start = first_frame + local
        else:
            entry = np.concatenate([[prev_score[state - 1]], scores[:-1, state - 1]]) + advance_logp
            entry_start = np.concatenate([[prev_start[state - 1]], starts[:-1, state - 1]])
        candidates = entry - prefix_before - self_loop_logp * local
        # the carried path (already in this state at the previous frame) acts as a candidate at "j = -1"
        stay = prev_score[state] + self_loop_logp
        best, best_index = _running_argmax(candidates)
        use_stay = stay > best  # on a tie the later entry (inside this chunk) wins, as in the offline sweep
        best = np.where(use_stay, stay, best)
        scores[:, state] = prefix + self_loop_logp * local + best
        starts[:, state] = np.where(use_stay, prev_start[state], entry_start[np.maximum(best_index, 0)])
        unreachable = ~np.isfinite(best)
        scores[unreachable, state] = -np.inf
        starts[unreachable, state] = -1
    return scores, starts


class KeywordViterbiStream:
    """Online keyword Viterbi: feed log posteriors ``[L, C]`` chunk by chunk; equals :func:`viterbi_keyword_scores`."""

    def __init__(self, keyword_phone_ids: Sequence[int], n_classes: int, filler_ids: Sequence[int] | None = None,
                 log_priors: np.ndarray | None = None, prior_scale: float = 1.0, states_per_phone: int = 1,
                 self_loop_logp: float = 0.0, advance_logp: float = 0.0, normalize: str = "none"):
        if normalize not in ("none", "length"):
            raise ValueError(f"normalize must be 'none' or 'length'; got {normalize!r}")
        ids = np.asarray(list(keyword_phone_ids), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= n_classes):
            raise ValueError(f"keyword_phone_ids out of range for {n_classes} classes: {ids.tolist()}")
        self.state_phones = keyword_state_phones(ids, states_per_phone)
        self.filler = _filler_ids(n_classes, ids, filler_ids)
        self.n_classes, self.log_priors, self.prior_scale = n_classes, log_priors, prior_scale
        self.self_loop_logp, self.advance_logp, self.normalize = float(self_loop_logp), float(advance_logp), normalize
        self.reset()

    def reset(self) -> None:
        """Start a new stream (frame 0, no partial paths)."""
        n_states = self.state_phones.shape[0]
        self._score = np.full(n_states, -np.inf)
        self._start = np.full(n_states, -1, dtype=np.int64)
        self.frames_seen = 0

    def step(self, log_post: np.ndarray) -> KeywordScores:
        """Scores and start frames (absolute stream frame indices) for the frames of this chunk."""
        log_post = np.asarray(log_post, dtype=np.float64)
        if log_post.ndim == 1:
            log_post = log_post[None, :]
        if log_post.ndim != 2 or log_post.shape[1] != self.n_classes:
            raise ValueError(f"expected log posteriors [L, {self.n_classes}], got shape {log_post.shape}")
        if log_post.shape[0] == 0:
            return KeywordScores(np.zeros(0), np.zeros(0, dtype=np.int64))
        ll = scaled_log_likelihoods(log_post, self.log_priors, self.prior_scale)
        adjusted = ll[:, self.state_phones] - ll[:, self.filler].max(axis=1, keepdims=True)
        scores, starts = _viterbi_chunk(adjusted, self._score, self._start, self.frames_seen,
                                        self.self_loop_logp, self.advance_logp)
        self._score, self._start = scores[-1].copy(), starts[-1].copy()
        first = self.frames_seen
        self.frames_seen += log_post.shape[0]
        score, start = scores[:, -1].copy(), starts[:, -1].copy()
        if self.normalize == "length":
            frames = np.arange(first, self.frames_seen)
            finite = np.isfinite(score)
            score[finite] = score[finite] / (frames[finite] - start[finite] + 1)
        return KeywordScores(score, start)


def viterbi_keyword_scores(log_post: np.ndarray, keyword_phone_ids: Sequence[int],
                           filler_ids: Sequence[int] | None = None, log_priors: np.ndarray | None = None,
                           prior_scale: float = 1.0, states_per_phone: int = 1, self_loop_logp: float = 0.0,
                           advance_logp: float = 0.0, normalize: str = "none") -> KeywordScores:
    """Per-frame score (best keyword path ending at t minus the filler path over its span) and its start frame."""
    log_post = np.asarray(log_post)
    if log_post.ndim != 2:
        raise ValueError(f"expected log posteriors [T, n_classes], got shape {log_post.shape}")
    stream = KeywordViterbiStream(keyword_phone_ids, log_post.shape[1], filler_ids, log_priors, prior_scale,
                                  states_per_phone, self_loop_logp, advance_logp, normalize)
    return stream.step(log_post)
