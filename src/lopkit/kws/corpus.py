"""Synthetic wake-word corpus (spec 2.6): seeded, sharded, resumable build of clips and long streams.

Layout of ``out_dir``::

    config.json                 the CorpusConfig (written first; a different config in the same dir is an error)
    clips/<split>_<k>.npz       shard k of a clip split: audio [n, S] float16, label, kw_start_s, kw_end_s, meta (JSON)
    streams/<name>_<k>.npz      chunk k of a stream: audio [L] float16, meta (JSON: segments and keyword events)
    index.json                  written last, when every shard exists

Every clip is a pure function of (config, split, clip index): its RNG is seeded with (seed, split, index), so a
build that was killed and restarted, or built with any number of workers, gives identical files.

Splits: ``train``/``val`` (espeak-ng train voices), ``test_seen`` (held-out espeak-ng voice variants),
``test_cross`` (flite + festival voices), ``stream_neg`` (minutes of negative speech, gaps and noise, for FA/h) and
``stream_pos`` (positives embedded in context with known keyword start/end times). Times are in seconds.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator

import numpy as np

from lopkit.configs import ConfigError, build_config, config_to_dict, require
from lopkit.data.errors import DatasetNotFoundError
from lopkit.kws import synth
from lopkit.kws.augment import (
    AugmentConfig, add_background, augment_speech, colored_noise, mix_at_snr, power, speed_perturb,
)
from lopkit.kws.synth import SAMPLE_RATE, Utterance

CLIP_SPLITS = ("train", "val", "test_seen", "test_cross")
STREAM_SPLITS = ("stream_neg", "stream_pos")
_SPLIT_CODE = {"train": 1, "val": 2, "test_seen": 3, "test_cross": 4, "stream_neg": 5, "stream_pos": 6, "babble": 7}
FORTUNES_DIR = "/usr/share/games/fortunes"
GCIDE_PATH = "/usr/share/dictd/gcide.dict.dz"

LEAD_INS = (
    "well", "okay", "so", "um", "alright", "excuse me", "and now", "oh", "please", "listen", "good morning",
    "right", "by the way", "you know what",
)
COMMANDS = (
    "set a timer", "turn on the lights", "what time is it", "play some music", "call mom", "stop", "open the door",
    "how is the weather", "turn it off", "next song", "volume up", "remind me tomorrow", "start the car",
    "lock the door", "read my messages", "what is on my calendar", "dim the lights", "pause", "add milk to the list",
    "tell me a joke", "how far is the station", "wake me up at seven",
)
CONFUSABLES = (  # hand-written for the default phrase; kept as extra negatives when that phrase is used
    "hey commuter", "a computer", "hey, compute her", "computer", "hey", "computer hey", "hey you",
    "my computer is slow", "hey, commuter train", "they computed it", "the computer is on", "hey, come here",
)


class CorpusMismatchError(ConfigError):
    """out_dir already holds (part of) a corpus built from a different config."""


@dataclass
class CorpusConfig:
    """What to synthesise: sizes of each split, voices, prosody ranges, augmentation, stream lengths and the seed."""

    keyword: str = synth.DEFAULT_KEYWORD
    n_pos: int = 8000  # positives in train + val (espeak-ng train voices)
    n_neg: int = 16000  # negatives in train + val
    val_fraction: float = 0.1
    n_test_pos: int = 1000  # test_seen: held-out espeak-ng variants
    n_test_neg: int = 1000
    n_cross_pos: int = 1000  # test_cross: flite + festival voices
    n_cross_neg: int = 1000
    clip_seconds: float = 2.0
    keyword_margin_s: tuple[float, float] = (0.1, 0.35)  # min time before keyword start / after keyword end in a clip
    stream_neg_minutes: float = 300.0
    n_stream_pos: int = 1000
    stream_chunk_minutes: float = 10.0
    stream_cross_fraction: float = 0.25  # share of stream utterances from flite/festival voices
    stream_snr_range: tuple[float, float] = (5.0, 20.0)
    stream_gap_range: tuple[float, float] = (0.3, 2.0)
    rate_range: tuple[int, int] = (130, 210)  # espeak-ng words/min
    pitch_range: tuple[int, int] = (20, 80)  # espeak-ng 0..99
    stretch_range: tuple[float, float] = (0.85, 1.15)  # flite/festival duration stretch
    languages: tuple[str, ...] = synth.ESPEAK_LANGUAGES
    test_variant_fraction: float = 0.2
    cross_voices: tuple[str, ...] = ()  # empty: every flite/festival voice installed
    confusable_fraction: float = 0.3
    confusables: tuple[str, ...] = ()  # empty: generated from the keyword (see generate_confusables)
    lead_in_prob: float = 0.5
    command_prob: float = 0.8
    augment: bool = True
    speed_range: tuple[float, float] = (0.9, 1.1)
    snr_range: tuple[float, float] = (0.0, 20.0)
    shard_size: int = 100
    seed: int = 0

    def validate(self) -> None:
        """Reject impossible sizes and ranges with a message saying how to fix them."""
        for name in ("n_pos", "n_neg", "n_test_pos", "n_test_neg", "n_cross_pos", "n_cross_neg", "n_stream_pos"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0")
        require(0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)")
        require(self.clip_seconds >= 1.0, "clip_seconds must be >= 1.0 (the keyword alone takes ~0.8 s)")
        require(sum(self.keyword_margin_s) < self.clip_seconds - 0.5, "keyword_margin_s leaves no room for the keyword")
        require(self.stream_neg_minutes >= 0 and self.stream_chunk_minutes > 0, "stream minutes must be >= 0 / > 0")
        require(0.0 <= self.stream_cross_fraction <= 1.0, "stream_cross_fraction must be in [0, 1]")
        require(self.rate_range[0] <= self.rate_range[1] and 80 <= self.rate_range[0], "rate_range: (lo, hi), lo >= 80")
        require(0 <= self.pitch_range[0] <= self.pitch_range[1] <= 99, "pitch_range must lie within 0..99")
        require(0.0 < self.test_variant_fraction < 1.0, "test_variant_fraction must be in (0, 1)")
        require(self.shard_size >= 1, "shard_size must be >= 1")
        require(len(self.keyword.split()) >= 1, "keyword must contain a word")
        for voice in self.cross_voices:
            require(voice.split(":")[0] in ("flite", "festival"),
                    f"cross voice {voice!r}: use 'flite:<v>' or 'festival:<v>'")
        require(0 < self.speed_range[0] <= self.speed_range[1], "speed_range must be (lo, hi) with 0 < lo <= hi")

    @property
    def clip_samples(self) -> int:
        """Samples per clip."""
        return int(round(self.clip_seconds * SAMPLE_RATE))

    def split_sizes(self) -> dict[str, tuple[int, int]]:
        """(n_pos, n_neg) per clip split."""
        n_val_pos, n_val_neg = int(round(self.n_pos * self.val_fraction)), int(round(self.n_neg * self.val_fraction))
        return {
            "train": (self.n_pos - n_val_pos, self.n_neg - n_val_neg),
            "val": (n_val_pos, n_val_neg),
            "test_seen": (self.n_test_pos, self.n_test_neg),
            "test_cross": (self.n_cross_pos, self.n_cross_neg),
        }


_SMOKE = dict(
    n_pos=80, n_neg=80, val_fraction=0.2, n_test_pos=10, n_test_neg=10, n_cross_pos=10, n_cross_neg=10,
    stream_neg_minutes=1.0, n_stream_pos=10, stream_chunk_minutes=1.0, shard_size=50,
)
_MINI = dict(
    n_pos=1500, n_neg=3000, n_test_pos=300, n_test_neg=300, n_cross_pos=300, n_cross_neg=300,
    stream_neg_minutes=60.0, n_stream_pos=150, stream_chunk_minutes=10.0,
)
CORPUS_PRESETS: dict[str, CorpusConfig] = {
    "smoke": build_config(CorpusConfig, _SMOKE),
    "mini": build_config(CorpusConfig, _MINI),
    "default": build_config(CorpusConfig),
}


# --------------------------------------------------------------------------------------------------- text sources
_SPEAKABLE = re.compile(r"[A-Za-z0-9 ,.;:'!?\-]+")


def _speakable(sentence: str, keyword: str) -> bool:
    n_words = sentence.count(" ") + 1
    return (
        3 <= n_words <= 14
        and _SPEAKABLE.fullmatch(sentence) is not None
        and keyword not in _normalize_text(sentence)
    )


def _normalize_text(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


def _sentences(text: str) -> list[str]:
    flat = " ".join(text.split())
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", flat) if s.strip()]


@lru_cache(maxsize=1)
def _fortune_sentences() -> tuple[str, ...]:
    """Sentences from the plain-text fortune files (entries separated by '%'), offensive dir skipped."""
    files = sorted(
        p for p in glob.glob(os.path.join(FORTUNES_DIR, "*")) if os.path.isfile(p) and not p.endswith((".dat", ".u8"))
    )
    if not files:
        raise DatasetNotFoundError(f"no fortune files in {FORTUNES_DIR}: apt-get install fortunes")
    out: list[str] = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for entry in handle.read().split("\n%\n"):
                if "--" in entry:  # drop attributions
                    entry = entry.split("--")[0]
                out.extend(_sentences(entry))
    return tuple(out)


@lru_cache(maxsize=1)
def _gcide_definitions() -> tuple[str, ...]:
    """Numbered definitions ('   2. To use ill; ...') from GCIDE, markup removed."""
    if not os.path.exists(GCIDE_PATH):
        raise DatasetNotFoundError(f"{GCIDE_PATH} missing: apt-get install dict-gcide")
    with gzip.open(GCIDE_PATH, "rt", encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    out = []
    for match in re.finditer(r"\n {3}\d+\. ([^\[\n]*(?:\n {6}[^\[\n]*)*)", text):
        body = re.sub(r"\([^)]*\)|[{}\"]", "", " ".join(match.group(1).split())).split("--")[0]
        first = " ".join(body.split(";")[0].split()).rstrip(".")
        if first:
            out.append(first + ".")
    return tuple(out)


@lru_cache(maxsize=4)
def _sentence_groups(keyword: str) -> dict[str, tuple[str, ...]]:
    pool = sorted(set(s for s in _fortune_sentences() + _gcide_definitions() if _speakable(s, keyword)))
    is_train = [synth._hash_unit("text:" + s) < 0.8 for s in pool]
    return {
        "train": tuple(s for s, t in zip(pool, is_train) if t),
        "test": tuple(s for s, t in zip(pool, is_train) if not t),
    }


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    """Lower-case alphabetic words (2-12 letters) of the fortune and GCIDE sentences, sorted: the confusable source."""
    words = set()
    for sentence in _fortune_sentences() + _gcide_definitions():
        words.update(w for w in re.findall(r"[a-z]+", sentence.lower()) if 2 <= len(w) <= 12)
    return tuple(sorted(words))


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions) between two strings."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def similar_words(word: str, vocabulary: tuple[str, ...], count: int = 3) -> list[str]:
    """Up to ``count`` vocabulary words that sound alike on paper: edit distance <= 2, same first or last letters.

    Ranked by (distance, length difference, word), so the choice is deterministic.
    """
    word = word.lower()
    if len(word) < 3:
        return []
    ranked = []
    for other in vocabulary:
        if other == word or abs(len(other) - len(word)) > 2 or not (other[0] == word[0] or other[-2:] == word[-2:]):
            continue
        distance = edit_distance(word, other)
        if distance <= 2:
            ranked.append((distance, abs(len(other) - len(word)), other))
    return [w for _, _, w in sorted(ranked)[:count]]


@lru_cache(maxsize=4096)
def phone_sequence(text: str) -> tuple[str, ...]:
    """Normalised espeak-ng en-us phones of ``text`` (pauses dropped): what the keyword test compares."""
    return tuple(synth.normalize_phone(p) for p, _dur, _word in synth.espeak_phone_template(_normalize_text(text)))


def sounds_like_keyword(phrase: str, keyword: str) -> bool:
    """True when ``phrase`` contains the keyword's phone sequence (a homophone: 'hay computer' for 'hey computer').

    Such a phrase is the keyword to the ear (and to any detector), so it must never be a negative. The test is on
    espeak-ng en-us phones (``phone_sequence``), stress and variant marks removed; the written-text test
    (``keyword in phrase``) misses homophones.
    """
    target, phones = phone_sequence(keyword), phone_sequence(phrase)
    if not target or len(phones) < len(target):
        return False
    return any(phones[i:i + len(target)] == target for i in range(len(phones) - len(target) + 1))


@lru_cache(maxsize=8)
def confusable_candidates(keyword: str, vocabulary: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Every phrase :func:`generate_confusables` considers, before homophones of the keyword are removed (sorted).

    Corpus plans draw a confusable's index from this list (and draw again from the valid ones when the index
    lands on a homophone), so corpora keep every other utterance when the homophone rule changes the pool.
    """
    words = _normalize_text(keyword).split()
    if not words:
        raise ValueError(f"keyword {keyword!r} has no words to derive confusables from")
    vocabulary = _vocabulary() if vocabulary is None else vocabulary
    first, last = words[0], words[-1]
    phrases = set(words)
    if len(words) > 1:
        phrases.add(" ".join(reversed(words)))
        phrases.update({f"{first} you", f"{first}, come here"})
    for position, word in enumerate(words):
        for other in similar_words(word, vocabulary):
            phrases.add(" ".join(words[:position] + [other] + words[position + 1:]))
    phrases.update({f"a {last}", f"the {last} is on", f"my {last} is slow", f"they said {last}"})
    if _normalize_text(keyword) == _normalize_text(synth.DEFAULT_KEYWORD):
        phrases.update(CONFUSABLES)
    target = " ".join(words)
    return tuple(sorted(p for p in phrases if target not in _normalize_text(p) and _normalize_text(p) != ""))


@lru_cache(maxsize=8)
def generate_confusables(keyword: str, vocabulary: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Negative phrases that sound like parts of ``keyword`` but never contain it, derived from the phrase itself.

    Kinds: each word alone; the words reversed; the phrase with one word swapped for a similar word
    (:func:`similar_words` over the fortune/GCIDE vocabulary); the last word after an article and inside short
    carrier sentences; the first word followed by a common word. For the default phrase the hand-written list
    :data:`CONFUSABLES` is added. A phrase is dropped when its text contains the keyword or when it is a homophone
    of it (:func:`sounds_like_keyword`: a swapped word that sounds the same, e.g. 'hay computer'). Deterministic
    (sorted, no randomness).
    """
    kept = tuple(p for p in confusable_candidates(keyword, vocabulary) if not sounds_like_keyword(p, keyword))
    if not kept:
        raise ValueError(f"no confusables could be derived from keyword {keyword!r}; pass confusables= explicitly")
    return kept


def confusables_for(config: "CorpusConfig") -> tuple[str, ...]:
    """The confusable negatives of a corpus: ``config.confusables`` if given, else generated from its keyword.

    A given phrase that sounds like the keyword (:func:`sounds_like_keyword`) is a ConfigError: it would be the
    keyword labelled as a negative.
    """
    if not config.confusables:
        return generate_confusables(config.keyword)
    same = [p for p in config.confusables if sounds_like_keyword(p, config.keyword)]
    if same:
        raise ConfigError(f"confusables {same} sound like the keyword {config.keyword!r} (same espeak phones); "
                          "a negative must not be the keyword: remove them from confusables")
    return tuple(config.confusables)


def _draw_confusable(config: "CorpusConfig", rng: np.random.Generator) -> str:
    """One confusable for a negative plan: an index into the candidate list, redrawn among the valid ones on a homophone."""
    valid = confusables_for(config)
    pool = tuple(config.confusables) if config.confusables else confusable_candidates(config.keyword)
    phrase = pool[int(rng.integers(len(pool)))]
    if phrase not in valid:
        phrase = valid[int(rng.integers(len(valid)))]
    return phrase


def negative_sentences(keyword: str, group: str) -> tuple[str, ...]:
    """Speakable negative sentences for 'train' (train+val) or 'test' (the rest), a fixed hash split (80/20)."""
    if group not in ("train", "test"):
        raise ValueError(f"group must be 'train' or 'test', got {group!r}")
    return _sentence_groups(keyword)[group]


# --------------------------------------------------------------------------------------------------- planning
@dataclass
class ClipPlan:
    """Everything random about one clip or stream utterance, drawn from its own seed before synthesis."""

    split: str
    index: int
    label: int
    engine: str
    voice: str
    segments: list[str]
    keyword_segment: int  # index of the keyword in ``segments`` (-1 for negatives)
    rate: int = 160
    pitch: int = 50
    stretch: float = 1.0
    gaps_s: list[float] = field(default_factory=list)
    kind: str = ""  # positive / sentence / confusable


def _rng(config: CorpusConfig, split: str, index: int, stage: int = 0) -> np.random.Generator:
    return np.random.default_rng([config.seed, _SPLIT_CODE[split], index, stage])


@lru_cache(maxsize=8)
def _voices(languages: tuple[str, ...], test_fraction: float, cross: tuple[str, ...]) -> dict[str, list[str]]:
    train, test = synth.espeak_voice_split(test_fraction, languages)
    cross_voices = list(cross) if cross else synth.available_cross_voices()
    return {"train": train, "test": test, "cross": cross_voices}


def voices_for(config: CorpusConfig, split: str) -> list[str]:
    """Voice pool of a split: espeak train voices (train/val), held-out espeak voices (test_seen), cross voices."""
    pools = _voices(tuple(config.languages), config.test_variant_fraction, tuple(config.cross_voices))
    if split in ("train", "val"):
        return pools["train"]
    if split == "test_seen":
        return pools["test"]
    if split == "test_cross":
        if not pools["cross"]:
            raise synth.SynthesisUnavailableError(f"no flite/festival voices installed: {synth.APT_HINT}")
        return pools["cross"]
    raise ValueError(f"unknown split {split!r}")


def plan_utterance(
    config: CorpusConfig, rng: np.random.Generator, split: str, index: int, label: int, voices: list[str]
) -> ClipPlan:
    """Draw text, voice and prosody of one utterance (positive: [lead-in] keyword [command])."""
    voice = voices[int(rng.integers(len(voices)))]
    engine = voice.split(":")[0] if ":" in voice else "espeak"
    group = "train" if split in ("train", "val") else "test"
    if label == 1:
        segments, kw = [config.keyword], 0
        if rng.random() < config.lead_in_prob:
            segments.insert(0, LEAD_INS[int(rng.integers(len(LEAD_INS)))])
            kw = 1
        if rng.random() < config.command_prob:
            segments.append(COMMANDS[int(rng.integers(len(COMMANDS)))])
        kind = "positive"
    else:
        kw = -1
        if rng.random() < config.confusable_fraction:
            segments, kind = [_draw_confusable(config, rng)], "confusable"
        else:
            pool = negative_sentences(config.keyword, group)
            segments, kind = [pool[int(rng.integers(len(pool)))]], "sentence"
    return ClipPlan(
        split=split, index=index, label=label, engine=engine, voice=voice, segments=segments, keyword_segment=kw,
        rate=int(rng.integers(config.rate_range[0], config.rate_range[1] + 1)),
        pitch=int(rng.integers(config.pitch_range[0], config.pitch_range[1] + 1)),
        stretch=float(rng.uniform(*config.stretch_range)),
        gaps_s=[float(rng.uniform(0.05, 0.35)) for _ in range(len(segments) - 1)], kind=kind,
    )


def _find_words(words: list[synth.WordTiming], target: list[str]) -> tuple[int, int]:
    names = [_normalize_text(w.word) for w in words]
    for i in range(len(names) - len(target) + 1):
        if names[i : i + len(target)] == target:
            return i, i + len(target) - 1
    raise RuntimeError(f"keyword {' '.join(target)!r} not found in synthesised words {names}")


def synthesize_plans(plans: list[ClipPlan]) -> list[tuple[Utterance, float, float]]:
    """Synthesise plans (festival batched per voice); returns (utterance, kw_start_s, kw_end_s) (NaN for negatives)."""
    results: list[Any] = [None] * len(plans)
    festival: dict[str, list[int]] = {}
    for i, plan in enumerate(plans):
        if plan.engine == "espeak":
            text = ", ".join(plan.segments) if len(plan.segments) > 1 else plan.segments[0]
            results[i] = synth.espeak_synthesize(text, plan.voice, plan.rate, plan.pitch)
        elif plan.engine == "flite":
            name = plan.voice.split(":", 1)[1]
            audio = synth.synthesize_segments_raw("flite", name, plan.segments, [plan.stretch] * len(plan.segments))
            results[i] = _join(plan, audio)
        else:
            festival.setdefault(plan.voice, []).append(i)
    for voice, idx in festival.items():
        texts = [s for i in idx for s in plans[i].segments]
        stretches = [plans[i].stretch for i in idx for _ in plans[i].segments]
        audio = synth.synthesize_segments_raw("festival", voice.split(":", 1)[1], texts, stretches)
        cursor = 0
        for i in idx:
            n = len(plans[i].segments)
            results[i] = _join(plans[i], audio[cursor : cursor + n])
            cursor += n
    out = []
    for plan, utt in zip(plans, results):
        if plan.keyword_segment < 0:
            out.append((utt, float("nan"), float("nan")))
        elif plan.engine == "espeak":
            first, last = _find_words(utt.words, _normalize_text(plan.segments[plan.keyword_segment]).split())
            utt.keyword_words = (first, last)
            out.append((utt, utt.words[first].start_s, utt.words[last].end_s))
        else:
            word = utt.words[plan.keyword_segment]
            utt.keyword_words = (plan.keyword_segment, plan.keyword_segment)
            out.append((utt, word.start_s, word.end_s))
    return out


def _join(plan: ClipPlan, audio: list[np.ndarray]) -> Utterance:
    return synth.concatenate_segments(audio, plan.segments, plan.gaps_s, 0.05, 0.05, plan.engine, plan.voice)


# --------------------------------------------------------------------------------------------------- clips
def _augment_config(config: CorpusConfig) -> AugmentConfig:
    return AugmentConfig(speed_range=config.speed_range, snr_range=config.snr_range)


@lru_cache(maxsize=8)
def _babble_bank(config_json: str, split: str) -> tuple[np.ndarray, ...]:
    """A few negative sentences (voices of the split's espeak pool) used as babble sources; seeded per split."""
    config = build_config(CorpusConfig, json.loads(config_json))
    pool = voices_for(config, "train" if split in ("train", "val") else "test_seen")
    rng = _rng(config, "babble", _SPLIT_CODE[split])
    group = "train" if split in ("train", "val") else "test"
    sentences = negative_sentences(config.keyword, group)
    bank = []
    for _ in range(8):
        voice = pool[int(rng.integers(len(pool)))]
        text = sentences[int(rng.integers(len(sentences)))]
        bank.append(synth.espeak_synthesize(text, voice, int(rng.integers(140, 200)), int(rng.integers(20, 80))).audio)
    return tuple(bank)


def _timings_json(utt: Utterance, shift_s: float, scale: float, clip_s: float) -> tuple[list, list]:
    kw = utt.keyword_words or (-1, -2)
    phones = []
    for p in utt.phonemes:
        start, end = p.start_s * scale + shift_s, p.end_s * scale + shift_s
        if end <= 0 or start >= clip_s:
            continue
        inside = int(kw[0] <= p.word_index <= kw[1])
        phones.append([p.phone, round(max(start, 0.0), 5), round(min(end, clip_s), 5), p.word_index, inside])
    words = [
        [w.word, round(w.start_s * scale + shift_s, 5), round(w.end_s * scale + shift_s, 5)]
        for w in utt.words
        if w.end_s * scale + shift_s > 0 and w.start_s * scale + shift_s < clip_s
    ]
    return phones, words


def render_clip(
    config: CorpusConfig, plan: ClipPlan, utt: Utterance, kw_start: float, kw_end: float
) -> tuple[np.ndarray, dict]:
    """Augment, place into a fixed-length clip (keyword inside with margins) and add noise; returns (audio, record)."""
    rng = _rng(config, plan.split, plan.index, stage=1)
    aug = _augment_config(config)
    if config.augment:
        speech, scale, params = augment_speech(utt.audio, rng, aug)
    else:
        speech, scale, params = utt.audio.astype(np.float32), 1.0, {}
    n, clip_s = config.clip_samples, config.clip_seconds
    room_s = clip_s - sum(config.keyword_margin_s) - 0.02
    if plan.label == 1 and (kw_end - kw_start) * scale > room_s:  # a very slow voice: compress to fit the margins
        speech, extra = speed_perturb(speech, (kw_end - kw_start) * scale / room_s + 0.01)
        scale *= extra
        params["fit_speed"] = 1.0 / extra
    if plan.label == 1:
        a, b = kw_start * scale * SAMPLE_RATE, kw_end * scale * SAMPLE_RATE
        lo = int(np.ceil(config.keyword_margin_s[0] * SAMPLE_RATE - a))
        hi = int(np.floor(n - config.keyword_margin_s[1] * SAMPLE_RATE - b))
        offset = int(rng.integers(lo, hi + 1)) if hi >= lo else lo
    else:
        offset = int(rng.integers(min(0, n - len(speech)), max(0, n - len(speech)) + 1))
    clip = np.zeros(n, np.float32)
    src0, dst0 = max(0, -offset), max(0, offset)
    length = min(len(speech) - src0, n - dst0)
    if length > 0:
        clip[dst0 : dst0 + length] = speech[src0 : src0 + length]
    if config.augment:
        reference = power(speech) if len(speech) else None
        babble = list(_babble_bank(json.dumps(config_to_dict(config), sort_keys=True), plan.split))
        clip, noise_params = add_background(clip, rng, aug, babble, reference)
        params.update(noise_params)
    shift = offset / SAMPLE_RATE
    phones, words = _timings_json(utt, shift, scale, clip_s)
    record = {
        "index": plan.index, "label": plan.label, "kind": plan.kind, "engine": plan.engine, "voice": plan.voice,
        "text": " | ".join(plan.segments), "rate": plan.rate, "pitch": plan.pitch, "stretch": round(plan.stretch, 4),
        "kw_start_s": kw_start * scale + shift if plan.label else float("nan"),
        "kw_end_s": kw_end * scale + shift if plan.label else float("nan"),
        "time_scale": scale, "offset_s": shift, "augment": params, "phones": phones, "words": words,
    }
    return clip, record


def _shard_ranges(config: CorpusConfig, split: str) -> list[tuple[int, int]]:
    n_pos, n_neg = config.split_sizes()[split]
    total = n_pos + n_neg
    return [(s, min(total, s + config.shard_size)) for s in range(0, total, config.shard_size)]


def clip_label(config: CorpusConfig, split: str, index: int) -> int:
    """Label of clip ``index``: positives and negatives interleaved deterministically (Bresenham over the split)."""
    n_pos, n_neg = config.split_sizes()[split]
    total = n_pos + n_neg
    return int((index + 1) * n_pos // total - index * n_pos // total) if total else 0


def build_clip_shard(config: CorpusConfig, split: str, start: int, stop: int) -> tuple[np.ndarray, dict]:
    """Clips [start, stop) of a split: audio [n, S] float32 and the metadata dict (records)."""
    voices = voices_for(config, split)
    plans = [
        plan_utterance(config, _rng(config, split, i), split, i, clip_label(config, split, i), voices)
        for i in range(start, stop)
    ]
    audio, records = [], []
    for plan, (utt, a, b) in zip(plans, synthesize_plans(plans)):
        clip, record = render_clip(config, plan, utt, a, b)
        audio.append(clip)
        records.append(record)
    return np.stack(audio) if audio else np.zeros((0, config.clip_samples), np.float32), {"records": records}


# --------------------------------------------------------------------------------------------------- streams
def _stream_chunks(config: CorpusConfig, name: str) -> list[int]:
    if name == "stream_neg":
        return list(range(int(np.ceil(config.stream_neg_minutes / config.stream_chunk_minutes))))
    per_chunk = max(1, int(config.stream_chunk_minutes * 60 / 6.0))  # ~6 s per embedded positive with context
    return list(range(int(np.ceil(config.n_stream_pos / per_chunk))))


def _stream_voice_pool(config: CorpusConfig, rng: np.random.Generator) -> list[str]:
    use_cross = rng.random() < config.stream_cross_fraction and bool(_voices(
        tuple(config.languages), config.test_variant_fraction, tuple(config.cross_voices))["cross"])
    return voices_for(config, "test_cross" if use_cross else "test_seen")


def build_stream_chunk(config: CorpusConfig, name: str, chunk: int) -> tuple[np.ndarray, dict]:
    """One chunk of a stream: utterances (test voices, flite/festival share) with silent gaps, then background noise.

    stream_neg: negatives only, ``stream_chunk_minutes`` long (last chunk shorter). stream_pos: each positive
    utterance preceded by 0-2 negative sentences; ``meta['events']`` lists keyword start/end times in the chunk.
    """
    rng = _rng(config, name, chunk * 1_000_003)
    if name == "stream_neg":
        left_minutes = config.stream_neg_minutes - chunk * config.stream_chunk_minutes
        target_s = min(config.stream_chunk_minutes, left_minutes) * 60

        def plan_batch(first: int) -> list[ClipPlan]:
            out = []
            remaining_s = target_s - cursor / SAMPLE_RATE
            for j in range(first, first + min(32, int(remaining_s / 3.0) + 1)):  # utterance j: (seed, chunk, j) only
                sub = np.random.default_rng([config.seed, _SPLIT_CODE[name], chunk, j])
                out.append(plan_utterance(config, sub, "test_seen", j, 0, _stream_voice_pool(config, sub)))
            return out
    else:
        target_s = float("inf")
        per_chunk = max(1, int(config.stream_chunk_minutes * 60 / 6.0))
        first_pos = chunk * per_chunk

        def plan_batch(first: int) -> list[ClipPlan]:
            out: list[ClipPlan] = []
            if first > 0:
                return out
            for k in range(first_pos, min(config.n_stream_pos, first_pos + per_chunk)):
                sub = np.random.default_rng([config.seed, _SPLIT_CODE[name], k])
                for _c in range(int(sub.integers(0, 3))):
                    out.append(plan_utterance(config, sub, "test_seen", k, 0, _stream_voice_pool(config, sub)))
                out.append(plan_utterance(config, sub, "test_seen", k, 1, _stream_voice_pool(config, sub)))
            return out

    aug = _augment_config(config)
    pieces, segments, events, speech_power = [], [], [], []
    cursor, j, done = 0, 0, False
    while not done:
        plans = plan_batch(j)
        if not plans:
            break
        for plan, (utt, a, b) in zip(plans, synthesize_plans(plans)):
            sub = np.random.default_rng([config.seed, _SPLIT_CODE[name], chunk, j, 1])
            j += 1
            if config.augment:
                speech, scale, _ = augment_speech(utt.audio, sub, aug)
            else:
                speech, scale = utt.audio, 1.0
            gap = int(sub.uniform(*config.stream_gap_range) * SAMPLE_RATE)
            pieces += [np.zeros(gap, np.float32), speech]
            start = cursor + gap
            segments.append({"start_s": start / SAMPLE_RATE, "end_s": (start + len(speech)) / SAMPLE_RATE,
                             "label": plan.label, "kind": plan.kind, "voice": plan.voice, "engine": plan.engine,
                             "text": " | ".join(plan.segments)})
            if plan.label == 1:
                events.append({"kw_start_s": start / SAMPLE_RATE + a * scale,
                               "kw_end_s": start / SAMPLE_RATE + b * scale,
                               "voice": plan.voice, "engine": plan.engine, "index": plan.index})
            speech_power.append(power(speech))
            cursor = start + len(speech)
            if cursor >= target_s * SAMPLE_RATE:
                done = True
                break
    pieces.append(np.zeros(int(config.stream_gap_range[1] * SAMPLE_RATE), np.float32))
    audio = np.concatenate(pieces)
    if np.isfinite(target_s):
        audio = audio[: int(target_s * SAMPLE_RATE)]
        segments = [s for s in segments if s["start_s"] < target_s]
    if config.augment:
        audio = _add_stream_noise(config, audio, float(np.mean(speech_power)) if speech_power else 0.0, rng)
    return audio, {"segments": segments, "events": events, "duration_s": len(audio) / SAMPLE_RATE}


def _add_stream_noise(
    config: CorpusConfig, audio: np.ndarray, speech_power: float, rng: np.random.Generator
) -> np.ndarray:
    """Continuous background noise in 10 s blocks (colour and SNR per block, relative to the speech power)."""
    out = audio.copy()
    block = 10 * SAMPLE_RATE
    for start in range(0, len(audio), block):
        n = min(block, len(audio) - start)
        color = ("white", "pink", "brown")[int(rng.integers(3))]
        snr = float(rng.uniform(*config.stream_snr_range))
        noise = colored_noise(rng, n, color)
        out[start : start + n] = mix_at_snr(audio[start : start + n], noise, snr, reference_power=speech_power)
    return out


# --------------------------------------------------------------------------------------------------- build / load
def _save_npz(path: str, **arrays: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, path)


def _task_list(config: CorpusConfig) -> list[tuple[str, str, int, int, int]]:
    """(kind, split, shard_number, a, b) for every shard/chunk, in build order."""
    tasks = []
    for split in CLIP_SPLITS:
        for k, (a, b) in enumerate(_shard_ranges(config, split)):
            tasks.append(("clips", split, k, a, b))
    for name in STREAM_SPLITS:
        for k in _stream_chunks(config, name):
            tasks.append(("streams", name, k, 0, 0))
    return tasks


def _task_path(out_dir: str, task: tuple[str, str, int, int, int]) -> str:
    kind, split, k, _a, _b = task
    return os.path.join(out_dir, kind, f"{split}_{k:05d}.npz")


def _run_task(args: tuple[dict, str, tuple]) -> tuple[tuple, int]:
    config_dict, out_dir, task = args
    config = build_config(CorpusConfig, config_dict)
    kind, split, k, a, b = task
    if kind == "clips":
        audio, meta = build_clip_shard(config, split, a, b)
        labels = np.array([r["label"] for r in meta["records"]], np.int8)
        starts = np.array([r["kw_start_s"] for r in meta["records"]], np.float64)
        ends = np.array([r["kw_end_s"] for r in meta["records"]], np.float64)
        _save_npz(_task_path(out_dir, task), audio=audio.astype(np.float16), label=labels, kw_start_s=starts,
                  kw_end_s=ends, meta=np.array(json.dumps(meta)))
        return task, len(labels)
    audio, meta = build_stream_chunk(config, split, k)
    _save_npz(_task_path(out_dir, task), audio=audio.astype(np.float16), meta=np.array(json.dumps(meta)))
    return task, 1


def _check_config_file(out_dir: str, config: CorpusConfig, force: bool) -> None:
    path = os.path.join(out_dir, "config.json")
    wanted = config_to_dict(config)
    if os.path.exists(path):
        with open(path) as handle:
            found = json.load(handle)
        if found != wanted and not force:
            diff = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            raise CorpusMismatchError(
                f"{out_dir} holds a corpus built with a different config (differs in: {', '.join(diff)}). "
                "Use another output directory, or force=True (--force) to delete it and rebuild."
            )
        if found != wanted and force:
            for sub in ("clips", "streams"):
                shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
            for name in ("index.json", "config.json"):
                if os.path.exists(os.path.join(out_dir, name)):
                    os.remove(os.path.join(out_dir, name))
    os.makedirs(os.path.join(out_dir, "clips"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "streams"), exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(wanted, handle, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def build_corpus(
    config: CorpusConfig, out_dir: str, progress: bool = True, workers: int = 2, force: bool = False,
    max_tasks: int | None = None,
) -> "CorpusIndex | None":
    """Build (or resume, or reuse) the corpus in ``out_dir``; returns its index, or None if ``max_tasks`` stopped it.

    Shards that already exist are kept; ``max_tasks`` builds at most that many missing shards and returns None (used
    to test resuming). ``workers`` > 1 synthesises shards in a process pool (espeak is process-global).
    """
    config = build_config(CorpusConfig, config_to_dict(config))  # re-validate
    if config.confusables:  # one that sounds like the keyword: ConfigError before anything is written
        confusables_for(config)
    index_path = os.path.join(out_dir, "index.json")
    _check_config_file(out_dir, config, force)
    if os.path.exists(index_path):
        index = load_corpus(out_dir)
        if index.info.get("homophone_check") != HOMOPHONE_CHECK:  # built before negatives were checked by phones
            counts = repair_homophone_negatives(config, out_dir, workers)
            if counts["clips"] or counts["stream_chunks"]:
                print(f"[kws] corpus {out_dir}: {counts['clips']} clips in {counts['clip_shards']} shards and "
                      f"{counts['stream_chunks']} stream chunks held negatives that sound like the keyword "
                      f"{config.keyword!r}; re-synthesised them (retrain models trained on the old corpus)",
                      file=sys.stderr, flush=True)
            index = load_corpus(out_dir)
        return index
    tasks = _task_list(config)
    pending = [t for t in tasks if not os.path.exists(_task_path(out_dir, t))]
    if max_tasks is not None:
        pending = pending[:max_tasks]
    started = time.time()
    config_dict = config_to_dict(config)
    jobs = [(config_dict, out_dir, t) for t in pending]
    bar = None
    if progress and pending:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), desc=f"kws corpus {os.path.basename(out_dir.rstrip('/'))}", unit="shard")
    if jobs:  # parse the text sources once here so forked workers inherit them
        negative_sentences(config.keyword, "train")
        negative_sentences(config.keyword, "test")
    if workers > 1 and len(jobs) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            for _ in pool.imap_unordered(_run_task, jobs):
                if bar:
                    bar.update(1)
    else:
        for job in jobs:
            _run_task(job)
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    if any(not os.path.exists(_task_path(out_dir, t)) for t in tasks):
        return None
    _write_index(config, out_dir, tasks, time.time() - started)
    return load_corpus(out_dir)


HOMOPHONE_CHECK = 1  # index.json key "homophone_check": corpora written since negatives are checked by phones


def homophone_negatives(config: CorpusConfig, out_dir: str) -> dict[str, list[int]]:
    """Stored negatives that sound like the keyword: ``{shard or chunk path: [clip indices]}`` ([] for a stream chunk).

    Only confusable phrases are checked (background sentences are filtered on their text and are not built from the
    keyword). A corpus built before confusables were checked by phones (:func:`sounds_like_keyword`) can hold such
    negatives, e.g. 'hay computer' for 'hey computer'.
    """
    found: dict[str, list[int]] = {}
    for task in _task_list(config):
        path = _task_path(out_dir, task)
        if not os.path.exists(path):
            continue
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
        rows = meta["records"] if task[0] == "clips" else meta["segments"]
        bad = [int(r["index"]) if task[0] == "clips" else k for k, r in enumerate(rows)
               if int(r.get("label", 0)) == 0 and r.get("kind") == "confusable"
               and sounds_like_keyword(str(r.get("text", "")), config.keyword)]
        if bad:
            found[path] = bad if task[0] == "clips" else []
    return found


def repair_homophone_negatives(config: CorpusConfig, out_dir: str, workers: int = 1) -> dict[str, int]:
    """Re-synthesise only the negatives that sound like the keyword; returns counts of what was redone.

    A clip is a pure function of (config, split, index), so each affected clip is re-planned (its confusable is now
    drawn among the valid phrases) and rendered again in place; every other clip of its shard stays byte-identical.
    A stream chunk holding one is rebuilt whole (the utterances after it move). The index is rewritten (so cached
    features are recomputed) with the check recorded. Models trained on the old corpus must be retrained.
    """
    stale = homophone_negatives(config, out_dir)
    tasks = _task_list(config)
    by_path = {_task_path(out_dir, t): t for t in tasks}
    counts = {"clips": 0, "clip_shards": 0, "stream_chunks": 0}
    rebuild = []
    for path, indices in stale.items():
        task = by_path[path]
        if task[0] == "streams":
            rebuild.append(task)
            continue
        split, first = task[1], task[3]
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
        meta = json.loads(str(arrays["meta"]))
        voices = voices_for(config, split)
        plans = [plan_utterance(config, _rng(config, split, i), split, i, clip_label(config, split, i), voices)
                 for i in indices]
        for plan, (utt, a, b) in zip(plans, synthesize_plans(plans)):
            clip, record = render_clip(config, plan, utt, a, b)
            row = plan.index - first
            arrays["audio"][row] = clip.astype(np.float16)
            meta["records"][row] = record
        arrays["meta"] = np.array(json.dumps(meta))
        _save_npz(path, **arrays)
        counts["clips"] += len(indices)
        counts["clip_shards"] += 1
    for task in rebuild:
        os.remove(_task_path(out_dir, task))
    if rebuild:
        config_dict = config_to_dict(config)
        jobs = [(config_dict, out_dir, t) for t in rebuild]
        if workers > 1 and len(jobs) > 1:
            import multiprocessing

            with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
                list(pool.imap_unordered(_run_task, jobs))
        else:
            for job in jobs:
                _run_task(job)
    counts["stream_chunks"] = len(rebuild)
    previous = load_corpus(out_dir).info.get("last_build_seconds", 0.0) if os.path.exists(
        os.path.join(out_dir, "index.json")) else 0.0
    _write_index(config, out_dir, tasks, float(previous))
    return counts


def _write_index(config: CorpusConfig, out_dir: str, tasks: list, seconds: float) -> None:
    splits: dict[str, Any] = {}
    for task in tasks:
        kind, split, _k, a, b = task
        entry = splits.setdefault(split, {"kind": kind, "files": [], "n_clips": 0, "n_pos": 0, "seconds": 0.0})
        entry["files"].append(os.path.relpath(_task_path(out_dir, task), out_dir))
        with np.load(_task_path(out_dir, task)) as data:
            if kind == "clips":
                entry["n_clips"] += int(len(data["label"]))
                entry["n_pos"] += int(data["label"].sum())
                entry["seconds"] += float(data["audio"].shape[0] * data["audio"].shape[1] / SAMPLE_RATE)
            else:
                meta = json.loads(str(data["meta"]))
                entry["n_pos"] += len(meta["events"])
                entry["seconds"] += float(len(data["audio"]) / SAMPLE_RATE)
    size = sum(os.path.getsize(os.path.join(out_dir, e)) for s in splits.values() for e in s["files"])
    index = {
        "version": 1, "sample_rate": SAMPLE_RATE, "clip_samples": config.clip_samples, "config": config_to_dict(config),
        "splits": splits, "bytes": size, "last_build_seconds": round(seconds, 2),
        "phone_set": synth.phone_set(config.keyword), "keyword_phones": synth.keyword_phones(config.keyword),
        "homophone_check": HOMOPHONE_CHECK,
    }
    with open(os.path.join(out_dir, "index.json.tmp"), "w") as handle:
        json.dump(index, handle, indent=1)
    os.replace(os.path.join(out_dir, "index.json.tmp"), os.path.join(out_dir, "index.json"))


@dataclass
class Clip:
    """One stored clip: audio (float32), label, keyword start/end seconds (NaN for negatives) and its metadata."""

    audio: np.ndarray
    label: int
    kw_start_s: float
    kw_end_s: float
    meta: dict


@dataclass
class Stream:
    """One stored stream chunk: audio (float32) and metadata (segments; events with keyword start/end seconds)."""

    audio: np.ndarray
    meta: dict

    @property
    def events(self) -> list[dict]:
        """Keyword occurrences in this chunk (stream_pos), each with kw_start_s / kw_end_s."""
        return self.meta["events"]


@dataclass
class CorpusIndex:
    """A finished corpus on disk: split summaries plus loaders for clips and streams."""

    out_dir: str
    info: dict

    @property
    def config(self) -> CorpusConfig:
        """The config it was built from."""
        return build_config(CorpusConfig, self.info["config"])

    def files(self, split: str) -> list[str]:
        """Absolute shard/chunk paths of a split."""
        if split not in self.info["splits"]:
            raise KeyError(f"unknown split {split!r}; have {sorted(self.info['splits'])}")
        return [os.path.join(self.out_dir, f) for f in self.info["splits"][split]["files"]]

    def n_clips(self, split: str) -> int:
        """Number of clips in a clip split."""
        return int(self.info["splits"][split]["n_clips"])

    def clips(self, split: str) -> Iterator[Clip]:
        """Iterate over the clips of a split in index order."""
        for path in self.files(split):
            with np.load(path) as data:
                audio = data["audio"].astype(np.float32)
                records = json.loads(str(data["meta"]))["records"]
                for row, record in zip(audio, records):
                    start, end = float(record["kw_start_s"]), float(record["kw_end_s"])
                    yield Clip(row, int(record["label"]), start, end, record)

    def records(self, split: str) -> list[dict[str, Any]]:
        """The per-clip metadata records of a clip split in index order, without reading any audio."""
        out: list[dict[str, Any]] = []
        for path in self.files(split):
            with np.load(path) as data:
                out.extend(json.loads(str(data["meta"]))["records"])
        return out

    def shards(self, split: str, dtype: Any = np.float32) -> Iterator[dict[str, Any]]:
        """Per-shard arrays (audio [n, S], label, kw_start_s, kw_end_s, meta): bounded memory for big splits."""
        for path in self.files(split):
            with np.load(path) as data:
                out = {key: data[key] for key in ("label", "kw_start_s", "kw_end_s")}
                out["audio"] = data["audio"].astype(dtype)
                out["meta"] = json.loads(str(data["meta"]))["records"]
            yield out

    def arrays(self, split: str, dtype: Any = np.float32) -> dict[str, Any]:
        """Whole split at once: audio [N, S], label [N], kw_start_s [N], kw_end_s [N], meta (list of records).

        The default corpus's train split is ~2.8 GB as float32; pass dtype=np.float16 or iterate ``shards``.
        """
        parts: dict[str, list] = {"audio": [], "label": [], "kw_start_s": [], "kw_end_s": [], "meta": []}
        for shard in self.shards(split, dtype):
            parts["meta"].extend(shard.pop("meta"))
            for key, value in shard.items():
                parts[key].append(value)
        out: dict[str, Any] = {k: np.concatenate(v) for k, v in parts.items() if k != "meta" and v}
        if not parts["audio"]:
            n = self.info["clip_samples"]
            out = {"audio": np.zeros((0, n), dtype), "label": np.zeros(0, np.int8),
                   "kw_start_s": np.zeros(0), "kw_end_s": np.zeros(0)}
        out["meta"] = parts["meta"]
        return out

    def streams(self, name: str) -> Iterator[Stream]:
        """Iterate over the chunks of a stream split ('stream_neg' or 'stream_pos')."""
        for path in self.files(name):
            with np.load(path) as data:
                yield Stream(data["audio"].astype(np.float32), json.loads(str(data["meta"])))

    def stream_hours(self, name: str) -> float:
        """Total duration of a stream split in hours."""
        return float(self.info["splits"][name]["seconds"]) / 3600.0


def load_corpus(out_dir: str) -> CorpusIndex:
    """Open a finished corpus (index.json present); a missing or half-built one raises FileNotFoundError."""
    path = os.path.join(out_dir, "index.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: the corpus in {out_dir} is missing or unfinished; run `lopkit kws build` "
            "(build_corpus) to build or resume it."
        )
    with open(path) as handle:
        return CorpusIndex(out_dir, json.load(handle))


def corpus_summary(index: CorpusIndex) -> dict[str, Any]:
    """Sizes per split (clips, positives, hours) and bytes on disk, for reports."""
    return {
        "bytes": index.info["bytes"],
        "splits": {k: {"n_clips": v["n_clips"], "n_pos": v["n_pos"], "hours": round(v["seconds"] / 3600, 4)}
                   for k, v in index.info["splits"].items()},
    }


__all__ = [
    "CLIP_SPLITS", "STREAM_SPLITS", "CORPUS_PRESETS", "CorpusConfig", "CorpusIndex", "CorpusMismatchError", "Clip",
    "Stream", "build_corpus", "load_corpus", "corpus_summary", "negative_sentences", "voices_for", "clip_label",
]
