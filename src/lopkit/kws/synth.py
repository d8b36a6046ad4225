"""Offline speech synthesis with word/phone timings: espeak-ng (ctypes events), flite and festival (segments).

Everything returns 16 kHz mono float32 audio. espeak-ng gives exact word and phoneme start times from its event
callback (a free forced alignment). flite and festival have no event API: texts are synthesised as separate
segments, silence-trimmed and concatenated with gaps, so segment (e.g. keyword) boundaries are exact; their phone
timings are an approximation (espeak-ng en-us phone durations rescaled to the segment; see ``segment_phones``).

espeak-ng is a process-global C library with hidden state: every call goes through a module lock (threads are
safe but serialised; use processes for parallelism) and reloads the library, so a call's audio depends only on its
arguments (see ``_Espeak``).
"""

from __future__ import annotations

import ctypes
import _ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import wave
from dataclasses import dataclass, field
from functools import lru_cache
from math import gcd

import numpy as np
from scipy.signal import firwin, resample_poly

SAMPLE_RATE = 16000
APT_HINT = (
    "apt-get install espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts "
    "sox libsox-fmt-all"
)
ESPEAK_VOICE_DIR = "/usr/lib/x86_64-linux-gnu/espeak-ng-data/voices/!v"
# English espeak-ng languages (accents) that load without mbrola; "en" is British English (gmw/en).
ESPEAK_LANGUAGES = (
    "en", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc",
)
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")  # `awb_time` is a talking-clock voice: excluded
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")
DEFAULT_KEYWORD = "hey computer"


class SynthesisUnavailableError(RuntimeError):
    """A speech engine (binary, library or voice) is missing; the message names the apt packages to install."""


@dataclass(frozen=True)
class WordTiming:
    """One word (or segment) with start/end times in seconds."""

    word: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class PhoneTiming:
    """One phone (espeak-ng mnemonic) with start/end in seconds and the index of its word in ``words`` (-1: pause)."""

    phone: str
    start_s: float
    end_s: float
    word_index: int


@dataclass
class Utterance:
    """Synthesised audio (16 kHz float32) with word and phone timings."""

    audio: np.ndarray
    words: list[WordTiming] = field(default_factory=list)
    phonemes: list[PhoneTiming] = field(default_factory=list)
    engine: str = ""
    voice: str = ""
    keyword_words: tuple[int, int] | None = None  # first/last index in ``words`` of the keyword (set by the corpus)

    @property
    def duration_s(self) -> float:
        """Length of the audio in seconds."""
        return len(self.audio) / SAMPLE_RATE


# --------------------------------------------------------------------------------------------------- helpers
@lru_cache(maxsize=64)
def _polyphase_filter(up: int, down: int) -> np.ndarray:
    """scipy.signal.resample_poly's default anti-alias FIR (Kaiser 5.0), designed once per (up, down)."""
    max_rate = max(up, down)
    return firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))


def resample_ratio(audio: np.ndarray, up: int, down: int) -> np.ndarray:
    """Polyphase resampling by up/down (same result as scipy's resample_poly default, cached filter), float32."""
    g = gcd(up, down)
    up, down = up // g, down // g
    if up == down:
        return audio.astype(np.float32)
    return resample_poly(audio.astype(np.float64), up, down, window=_polyphase_filter(up, down)).astype(np.float32)


def resample_to_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    """Resample float audio from ``rate`` Hz to 16 kHz with a polyphase filter (sample 0 stays at t=0)."""
    return resample_ratio(audio, SAMPLE_RATE, rate)


def read_wav(path: str) -> np.ndarray:
    """Read a 16-bit PCM wav (mono or first channel) and return 16 kHz float32 in [-1, 1]."""
    with wave.open(path, "rb") as handle:
        rate, channels, width = handle.getframerate(), handle.getnchannels(), handle.getsampwidth()
        raw = handle.readframes(handle.getnframes())
    if width != 2:
        raise ValueError(f"{path}: expected 16-bit PCM, got {8 * width}-bit")
    audio = np.frombuffer(raw, dtype="<i2").reshape(-1, channels)[:, 0].astype(np.float32) / 32768.0
    return resample_to_16k(audio, rate)


def trim_silence(audio: np.ndarray, threshold: float = 0.01, frame: int = 160) -> np.ndarray:
    """Cut leading/trailing frames whose peak is below ``threshold`` x the clip's peak (numpy `sox silence`)."""
    if len(audio) == 0:
        return audio
    peak = float(np.max(np.abs(audio)))
    if peak == 0.0:
        return audio[:0]
    n_frames = (len(audio) + frame - 1) // frame
    padded = np.pad(np.abs(audio), (0, n_frames * frame - len(audio)))
    loud = np.flatnonzero(padded.reshape(n_frames, frame).max(axis=1) >= threshold * peak)
    return audio[loud[0] * frame : min(len(audio), (loud[-1] + 1) * frame)]


def normalize_phone(mnemonic: str) -> str:
    """Canonical espeak phone mnemonic: drop stress marks and the '#' variant suffix (t# -> t)."""
    return mnemonic.replace("'", "").replace(",", "").replace("#", "").strip()


def is_pause(mnemonic: str) -> bool:
    """True for espeak pause pseudo-phones ('_', '_:', '_!' ...)."""
    return mnemonic.startswith("_") or mnemonic == ""


def _require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SynthesisUnavailableError(f"`{name}` not found on PATH. Install the speech tools: {APT_HINT}")
    return path


# --------------------------------------------------------------------------------------------------- espeak-ng
_EVENT_END, _EVENT_WORD, _EVENT_PHONEME = 0, 1, 7
_AUDIO_OUTPUT_SYNCHRONOUS, _INIT_PHONEME_EVENTS, _INIT_DONT_EXIT = 2, 0x0001, 0x8000
_PARAM_RATE, _PARAM_PITCH = 1, 3


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
        ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p), ("id", _EventId),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class _Espeak:
    """libespeak-ng loaded fresh for one synthesis: audio chunks and events collected by the synth callback.

    espeak-ng keeps hidden static state between utterances (e.g. the pitch-flutter phase), so the same call gives
    slightly different audio depending on what was synthesised before. To make every call a pure function of its
    arguments the library is unloaded (dlclose) and reloaded around each utterance (~5 ms) and libc's rand() (used
    by the klatt/whisper noise sources) is re-seeded.
    """

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.events: list[tuple[int, int, int, int, str]] = []
        self.callback = _CALLBACK(self._on_audio)  # keep a reference: ctypes must not free it
        self.libc = ctypes.CDLL(None)
        self.rate = 0

    def _on_audio(self, wav, n_samples, events) -> int:
        if n_samples > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n_samples,)).copy())
        i = 0
        while events[i].type != _EVENT_END:
            ev = events[i]
            if ev.type in (_EVENT_WORD, _EVENT_PHONEME):
                name = ev.id.string.decode("ascii", "replace") if ev.type == _EVENT_PHONEME else ""
                self.events.append((ev.type, ev.text_position, ev.length, ev.sample, name))
            i += 1
        return 0

    def synthesize(self, text: str, voice: str, rate: int, pitch: int):
        """Raw int16-scaled float audio at the native rate and the (type, text_pos, length, sample, name) events."""
        try:
            lib = ctypes.CDLL("libespeak-ng.so.1")
        except OSError:
            raise SynthesisUnavailableError(f"libespeak-ng.so.1 not found. Install the speech tools: {APT_HINT}")
        try:
            options = _INIT_PHONEME_EVENTS | _INIT_DONT_EXIT
            self.rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, options)
            if self.rate <= 0:
                raise SynthesisUnavailableError(f"espeak_Initialize failed ({self.rate}); reinstall: {APT_HINT}")
            lib.espeak_SetSynthCallback(self.callback)
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise SynthesisUnavailableError(f"espeak-ng voice {voice!r} not available; see espeak_voices()")
            lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
            lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
            self.chunks, self.events = [], []
            self.libc.srand(12345)
            data = text.encode("utf-8")
            status = lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 1, None, None)  # POS_CHARACTER, CHARS_UTF8
            lib.espeak_Synchronize()
            if status != 0:
                raise RuntimeError(f"espeak_Synth failed with status {status} for {text!r}")
        finally:
            lib.espeak_Terminate()
            handle = lib._handle
            del lib
            _ctypes.dlclose(handle)
        audio = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
        return audio.astype(np.float32) / 32768.0, list(self.events)


_ESPEAK_LOCK = threading.Lock()
_ESPEAK: dict[int, _Espeak] = {}


def _espeak() -> _Espeak:
    """The espeak wrapper of this process (created on first use, again in a forked child)."""
    pid = os.getpid()
    if pid not in _ESPEAK:
        _ESPEAK.clear()
        _ESPEAK[pid] = _Espeak()
    return _ESPEAK[pid]


def espeak_variants() -> list[str]:
    """Sorted voice-variant names available to espeak-ng (files in espeak-ng-data/voices/!v)."""
    if not os.path.isdir(ESPEAK_VOICE_DIR):
        raise SynthesisUnavailableError(f"{ESPEAK_VOICE_DIR} missing. Install the speech tools: {APT_HINT}")
    return sorted(os.listdir(ESPEAK_VOICE_DIR))


def _hash_unit(text: str) -> float:
    """A stable pseudo-random number in [0, 1) from a string (sha1), independent of Python's hash seed."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16) / float(16**12)


def espeak_voice_split(test_fraction: float = 0.2, languages: tuple[str, ...] = ESPEAK_LANGUAGES):
    """Deterministic speaker split: variants whose sha1 falls below ``test_fraction`` are held out for test.

    Returns (train_voices, test_voices) as "language+variant" names; the two sets share no variant.
    """
    variants = espeak_variants()
    test_variants = [v for v in variants if _hash_unit("variant:" + v) < test_fraction]
    train_variants = [v for v in variants if v not in test_variants]
    train = [f"{lang}+{v}" for lang in languages for v in train_variants]
    test = [f"{lang}+{v}" for lang in languages for v in test_variants]
    return train, test


def voice_variant(voice: str) -> str:
    """The speaker part of a voice name: 'en-us+m3' -> 'm3', 'flite:kal' -> 'flite:kal'."""
    return voice.split("+", 1)[1] if "+" in voice else voice


def espeak_synthesize(text: str, voice: str = "en-us", rate: int = 160, pitch: int = 50) -> Utterance:
    """Synthesise ``text`` with libespeak-ng; word/phone times come from the synthesiser's events (exact).

    A word starts at its first phone and ends where the next phone (or pause) starts; phone ends likewise.
    """
    with _ESPEAK_LOCK:
        engine = _espeak()
        raw, events = engine.synthesize(text, voice, rate, pitch)
        native_rate = engine.rate
    n_native = len(raw)
    audio = resample_to_16k(raw, native_rate)
    word_spans: dict[int, str] = {}
    current_word = -1
    order: list[int] = []
    phones_raw: list[tuple[str, int, int]] = []  # (name, sample, word_position)
    encoded = text.encode("utf-8")
    for kind, position, length, sample, name in events:
        if kind == _EVENT_WORD:
            word_spans[position] = encoded[position - 1 : position - 1 + length].decode("utf-8", "replace")
            order.append(position)
            current_word = position
        else:
            phones_raw.append((name, sample, current_word if not is_pause(name) else -1))
    word_index = {pos: i for i, pos in enumerate(order)}
    phonemes: list[PhoneTiming] = []
    for k, (name, sample, pos) in enumerate(phones_raw):
        end_sample = phones_raw[k + 1][1] if k + 1 < len(phones_raw) else n_native
        phonemes.append(
            PhoneTiming(name, sample / native_rate, max(sample, end_sample) / native_rate, word_index.get(pos, -1))
        )
    words: list[WordTiming] = []
    for i, pos in enumerate(order):
        own = [p for p in phonemes if p.word_index == i]
        if own:
            words.append(WordTiming(word_spans[pos], own[0].start_s, own[-1].end_s))
        else:  # a word without phones (rare: punctuation-only) gets an empty span at the next phone
            at = words[-1].end_s if words else 0.0
            words.append(WordTiming(word_spans[pos], at, at))
    return Utterance(audio, words, phonemes, engine="espeak", voice=voice)


@lru_cache(maxsize=64)
def espeak_phone_template(text: str) -> tuple[tuple[str, float, int], ...]:
    """Phones of ``text`` under espeak-ng en-us at rate 160: (phone, relative duration, word index), no pauses."""
    utt = espeak_synthesize(text, "en-us", 160, 50)
    return tuple((p.phone, p.end_s - p.start_s, p.word_index) for p in utt.phonemes if p.word_index >= 0)


@lru_cache(maxsize=16)
def keyword_phones(keyword: str = DEFAULT_KEYWORD) -> list[str]:
    """The keyword's phones (normalised espeak en-us mnemonics): 'hey computer' -> h eI k @ m p j u: t 3."""
    return [normalize_phone(p) for p, _dur, _w in espeak_phone_template(keyword)]


def phone_set(keyword: str = DEFAULT_KEYWORD) -> list[str]:
    """Baseline phone classes: ['sil', 'filler'] + the keyword's distinct phones in order of first appearance.

    Mapping (``phone_id``): pauses -> 'sil'; a keyword phone -> itself; every other phone -> 'filler'.
    """
    out = ["sil", "filler"]
    for phone in keyword_phones(keyword):
        if phone not in out:
            out.append(phone)
    return out


def phone_id(mnemonic: str, keyword: str = DEFAULT_KEYWORD, in_keyword: bool = True) -> int:
    """Class index of an espeak phone in ``phone_set(keyword)``; with in_keyword=False non-pause phones are filler.

    Use in_keyword=False for phones outside the keyword's words to get keyword-specific (Hey-Siri-style) labels.
    """
    classes = phone_set(keyword)
    if is_pause(mnemonic):
        return 0
    name = normalize_phone(mnemonic)
    if in_keyword and name in classes[2:]:
        return classes.index(name)
    return 1


PHONE_SET = ["sil", "filler", "h", "eI", "k", "@", "m", "p", "j", "u:", "t", "3"]  # == phone_set("hey computer")


# --------------------------------------------------------------------------------------------------- flite / festival
def _flite_audio(text: str, voice: str, stretch: float = 1.0) -> np.ndarray:
    binary = _require_binary("flite")
    with tempfile.TemporaryDirectory(prefix="lopkit_flite_") as tmp:
        out = os.path.join(tmp, "out.wav")
        cmd = [binary, "-voice", voice, "--setf", f"duration_stretch={stretch:.4f}", "-t", text, "-o", out]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not os.path.exists(out):
            raise SynthesisUnavailableError(f"flite failed for voice {voice!r}: {result.stderr.strip()} ({APT_HINT})")
        return read_wav(out)


def _festival_string(text: str) -> str:
    return '"' + text.replace("\\", " ").replace('"', " ") + '"'


def _festival_batch(texts: list[str], voice: str, stretches: list[float]) -> list[np.ndarray]:
    """Synthesise several texts with one festival process (startup is the slow part)."""
    binary = _require_binary("festival")
    with tempfile.TemporaryDirectory(prefix="lopkit_festival_") as tmp:
        lines = [f"(voice_{voice})"]
        for i, (text, stretch) in enumerate(zip(texts, stretches)):
            path = os.path.join(tmp, f"seg{i}.wav")
            lines += [
                f"(Parameter.set 'Duration_Stretch {stretch:.4f})",
                f"(set! u (Utterance Text {_festival_string(text)}))",
                "(utt.synth u)",
                f'(utt.save.wave u "{path}" \'riff)',
            ]
        script = os.path.join(tmp, "run.scm")
        with open(script, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        result = subprocess.run([binary, "-b", script], capture_output=True, text=True)
        paths = [os.path.join(tmp, f"seg{i}.wav") for i in range(len(texts))]
        if result.returncode != 0 or not all(os.path.exists(p) for p in paths):
            raise SynthesisUnavailableError(
                f"festival failed for voice {voice!r}: {result.stderr.strip()[-300:]} (install: {APT_HINT})"
            )
        return [read_wav(p) for p in paths]


def flite_synthesize(text: str, voice: str = "kal", stretch: float = 1.0) -> Utterance:
    """Synthesise ``text`` with flite (no timings: words/phonemes empty)."""
    return Utterance(_flite_audio(text, voice, stretch), engine="flite", voice=f"flite:{voice}")


def festival_synthesize(text: str, voice: str = "kal_diphone", stretch: float = 1.0) -> Utterance:
    """Synthesise ``text`` with festival (no timings: words/phonemes empty)."""
    return Utterance(_festival_batch([text], voice, [stretch])[0], engine="festival", voice=f"festival:{voice}")


def synthesize_segments_raw(engine: str, voice: str, texts: list[str], stretches: list[float]) -> list[np.ndarray]:
    """Silence-trimmed 16 kHz audio of each text segment for engine 'flite' or 'festival' (one process per batch)."""
    if engine == "flite":
        raw = [_flite_audio(t, voice, s) for t, s in zip(texts, stretches)]
    elif engine == "festival":
        raw = _festival_batch(texts, voice, stretches)
    else:
        raise ValueError(f"engine must be 'flite' or 'festival', got {engine!r}")
    return [trim_silence(a) for a in raw]


def segment_phones(text: str, start_s: float, end_s: float, word_offset: int) -> list[PhoneTiming]:
    """Approximate phones for a segment: espeak en-us phones with their relative durations rescaled to the span.

    Documented approximation (flite/festival have no phone events); only the segment boundaries are exact.
    """
    template = espeak_phone_template(text)
    total = sum(d for _p, d, _w in template)
    phones, t = [], start_s
    for name, dur, _word in template:  # all phones belong to the segment's single WordTiming
        step = (end_s - start_s) * (dur / total if total > 0 else 1.0 / len(template))
        phones.append(PhoneTiming(name, t, t + step, word_offset))
        t += step
    return phones


def concatenate_segments(
    segments: list[np.ndarray], texts: list[str], gaps_s: list[float], lead_s: float, tail_s: float,
    engine: str, voice: str, with_phones: bool = True,
) -> Utterance:
    """Join trimmed segments with silent gaps; each segment's text becomes one WordTiming with exact boundaries.

    ``gaps_s`` has len(segments) - 1 entries. Phones (if requested) are spread with ``segment_phones``.
    """
    if len(gaps_s) != max(0, len(segments) - 1):
        raise ValueError(f"need {len(segments) - 1} gaps, got {len(gaps_s)}")
    pieces = [np.zeros(int(round(lead_s * SAMPLE_RATE)), np.float32)]
    words, phones, cursor = [], [], len(pieces[0])
    for i, (audio, text) in enumerate(zip(segments, texts)):
        start, end = cursor / SAMPLE_RATE, (cursor + len(audio)) / SAMPLE_RATE
        words.append(WordTiming(text, start, end))
        if with_phones:
            phones += segment_phones(text, start, end, i)
        pieces.append(audio.astype(np.float32))
        cursor += len(audio)
        if i < len(gaps_s):
            gap = np.zeros(int(round(gaps_s[i] * SAMPLE_RATE)), np.float32)
            pieces.append(gap)
            cursor += len(gap)
    pieces.append(np.zeros(int(round(tail_s * SAMPLE_RATE)), np.float32))
    return Utterance(np.concatenate(pieces), words, phones, engine=engine, voice=voice)


def available_cross_voices() -> list[str]:
    """Cross-engine voices 'flite:<v>' / 'festival:<v>' whose engine binary is installed (flite voices via -lv)."""
    voices: list[str] = []
    if shutil.which("flite"):
        listed = subprocess.run(["flite", "-lv"], capture_output=True, text=True).stdout.split()
        voices += [f"flite:{v}" for v in FLITE_VOICES if v in listed]
    if shutil.which("festival"):
        roots = ["/usr/share/festival/voices/english", "/usr/share/festival/voices/us"]
        present = {d for r in roots if os.path.isdir(r) for d in os.listdir(r)}
        voices += [f"festival:{v}" for v in FESTIVAL_VOICES if v in present]
    return voices


def phone_frame_labels(
    phones: list, n_frames: int, keyword: str = DEFAULT_KEYWORD, keyword_specific: bool = True,
    hop_s: float = 0.01, win_s: float = 0.025,
) -> np.ndarray:
    """Per-frame phone class ids (``phone_set(keyword)``) from stored phone rows [phone, start_s, end_s, word, in_kw].

    Frame t covers [t*hop, t*hop + win); it takes the class of the phone containing its centre (sil if none).
    keyword_specific=True: phones outside the keyword's words are 'filler' (Hey-Siri-style keyword model);
    False: any keyword phone keeps its class wherever it occurs.
    """
    labels = np.zeros(n_frames, np.int64)
    if not phones or n_frames == 0:
        return labels
    starts = np.array([float(p[1]) for p in phones])
    ends = np.array([float(p[2]) for p in phones])
    ids = np.array([
        phone_id(str(p[0]), keyword, in_keyword=(bool(p[4]) if keyword_specific and len(p) > 4 else True))
        for p in phones
    ])
    centres = np.arange(n_frames) * hop_s + win_s / 2.0
    order = np.argsort(starts, kind="stable")
    starts, ends, ids = starts[order], ends[order], ids[order]
    k = np.searchsorted(starts, centres, side="right") - 1  # last phone starting at or before the centre
    valid = (k >= 0) & (centres < ends[np.clip(k, 0, None)])
    labels[valid] = ids[k[valid]]
    return labels
