"""Streaming wake-word detection: PCM chunks in, ``Detection(time_s, start_s, score)`` out, plus the real-time factor.

The pipeline of one detector is

    PCM chunk -> :class:`StreamingFeatures` (log-mel frames, exactly those of the offline ``log_mel``)
              -> a frame scorer (:class:`CNNScorer`: HEiMDaL CNN, score = P(keyword just ended), start =
                 t - offset; :class:`HMMScorer`: frame phone classifier + keyword Viterbi, score = keyword path
                 minus filler, start = the path's first frame)
              -> :class:`TriggerLogic` (causal moving average over ``smooth_frames``, fire at the first frame
                 strictly above the threshold, then a refractory period).

Every stage is causal and keeps only bounded state, so feeding a file in 10 ms chunks or in one piece gives the
same detections; the offline evaluation (:func:`score_features`) computes the same scores in batches.
Frame ``t`` covers samples ``[160 t, 160 t + 400)``; a detection at frame ``t`` is reported at the end of that
window, ``(160 t + 400) / 16000`` s, and a start frame ``s`` as ``s / 100`` s (the keyword reference start
``start_s`` maps to frame ``round(100 * start_s)`` in the training targets).
"""

from __future__ import annotations

import dataclasses
import io
import math
import sys
import time
import wave
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from lopkit.kws.features import FRAMES_PER_SECOND, HOP_SAMPLES, SAMPLE_RATE, WIN_SAMPLES

__all__ = [
    "SAMPLE_RATE",
    "CNNScorer",
    "Detection",
    "HMMScorer",
    "ListenResult",
    "StreamingDetector",
    "compute_features",
    "TriggerLogic",
    "causal_moving_average",
    "check_threshold",
    "frame_end_seconds",
    "listen",
    "read_audio",
    "score_features",
]


@dataclasses.dataclass(frozen=True)
class Detection:
    """One trigger: when it fired (s from stream start), the estimated keyword start (s) and the smoothed score."""

    time_s: float
    start_s: float
    score: float


def frame_end_seconds(frame: int | np.ndarray) -> Any:
    """End time (s) of the analysis window of frame ``frame``."""
    return (np.asarray(frame) * HOP_SAMPLES + WIN_SAMPLES) / SAMPLE_RATE


def causal_moving_average(scores: np.ndarray, width: int) -> np.ndarray:
    """Mean of the last ``width`` values at each frame (fewer at the start): the streaming smoother, offline."""
    scores = np.asarray(scores, dtype=np.float64)
    if width < 1:
        raise ValueError(f"smoothing width must be >= 1, got {width}")
    if width == 1 or scores.size == 0:
        return scores.copy()
    cumulative = np.concatenate([[0.0], np.cumsum(scores, axis=-1)])
    index = np.arange(1, scores.size + 1)
    lower = np.maximum(0, index - width)
    return (cumulative[index] - cumulative[lower]) / (index - lower)


def check_threshold(threshold: float, kind: str) -> float:
    """``threshold`` as a float if it is valid for a ``kind`` model's score, else ValueError saying the range.

    The HEiMDaL CNNs (every kind but ``dnn_hmm``) score a frame with a probability (the sigmoid of the detect
    logit), and the smoothed score is a mean of probabilities, so a useful threshold lies strictly between 0 and
    1 (at 0 or below every frame fires, at 1 or above none does). The DNN-HMM's score is a log-likelihood ratio
    (best keyword path minus the filler path), so any finite number is valid.
    """
    value = float(threshold)
    if kind == "dnn_hmm":
        if not math.isfinite(value):
            raise ValueError(f"--threshold {threshold} is not a finite number; the dnn_hmm score is a log-likelihood "
                             "ratio (keyword path minus filler), pass a finite value such as 0")
        return value
    if not 0.0 < value < 1.0:
        raise ValueError(f"--threshold {threshold} is outside (0, 1); the {kind} score is a probability (sigmoid of "
                         "its detect logit), pass a value strictly between 0 and 1 such as 0.5, or omit --threshold "
                         "to use the model's stored operating threshold")
    return value


class TriggerLogic:
    """Causal smoothing + threshold + refractory period over per-frame scores and start estimates."""

    def __init__(self, threshold: float, smooth_frames: int = 3, refractory_frames: int = FRAMES_PER_SECOND):
        if smooth_frames < 1:
            raise ValueError(f"smooth_frames must be >= 1, got {smooth_frames}")
        if refractory_frames < 1:
            raise ValueError(f"refractory_frames must be >= 1, got {refractory_frames}")
        self.threshold = float(threshold)
        self.smooth_frames = int(smooth_frames)
        self.refractory_frames = int(refractory_frames)
        self.reset()

    def reset(self) -> None:
        """Forget the stream: frame counter, smoothing window and refractory period."""
        self.frame = 0
        self._recent: list[float] = []
        self._blocked_until = 0

    def push(self, scores: np.ndarray, start_frames: np.ndarray) -> list[Detection]:
        """Feed the next frames' raw scores and start-frame estimates; return the detections they trigger."""
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        start_frames = np.asarray(start_frames, dtype=np.float64).reshape(-1)
        if scores.shape != start_frames.shape:
            raise ValueError(f"scores and start_frames differ in length: {scores.size} vs {start_frames.size}")
        detections = []
        for score, start in zip(scores, start_frames):
            self._recent.append(float(score))
            if len(self._recent) > self.smooth_frames:
                self._recent.pop(0)
            smoothed = sum(self._recent) / len(self._recent)
            t = self.frame
            if t >= self._blocked_until and smoothed > self.threshold:
                detections.append(Detection(float(frame_end_seconds(t)), float(start) / FRAMES_PER_SECOND, smoothed))
                self._blocked_until = t + self.refractory_frames
            self.frame += 1
        return detections


def compute_features(audio: Tensor | np.ndarray, n_mels: int = 40) -> Tensor:
    """Raw log-mel ``[..., n_mels, T]`` of audio ``[..., S]`` (the models normalise with their own FeatureStats)."""
    from lopkit.kws.features import log_mel

    return log_mel(torch.as_tensor(audio).float(), n_mels=n_mels)


# --------------------------------------------------------------------------------------------- scorers


def model_outputs(output: Any) -> tuple[Tensor, Tensor | None]:
    """(first head ``[B, T]`` or ``[B, C, T]``, offset ``[B, T]`` or None) from a model's forward output."""
    if isinstance(output, dict):
        main = output.get("detect", output.get("logits", output.get("log_probs")))
        if main is None:
            main = next(iter(output.values()))
        return main, output.get("offset")
    if isinstance(output, (tuple, list)):
        return output[0], (output[1] if len(output) > 1 else None)
    return output, None


def receptive_field(model: nn.Module) -> int:
    """Left context (frames) the causal model needs; a conservative default if it does not say."""
    value = getattr(model, "receptive_field_frames", None)
    return int(value) if value is not None else 256


class _ContextModel:
    """Runs a causal model chunk by chunk: its own ``stream_step`` caches when it has one, else a left-context buffer."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        self.native = callable(getattr(model, "stream_step", None))
        self.context = max(0, receptive_field(model) - 1)
        self._cache: Any = None

    def reset(self) -> None:
        """Forget the cached context."""
        self._cache = None

    @torch.no_grad()
    def push(self, frames: Tensor) -> tuple[Tensor, Tensor | None]:
        """Outputs (main head, offset) for the new ``frames[n_mels, n]``; each ``[..., n]``."""
        n = frames.shape[-1]
        if n == 0:
            return frames.new_zeros(0), None
        if self.native:
            output, self._cache = self.model.stream_step(frames[None], self._cache)
            main, offset = model_outputs(output)
            return main[0], None if offset is None else offset[0]
        joined = frames if self._cache is None else torch.cat([self._cache, frames], dim=-1)
        main, offset = model_outputs(self.model(joined[None]))
        self._cache = joined[..., -self.context:] if self.context else joined[..., :0]
        return main[0, ..., -n:], None if offset is None else offset[0, ..., -n:]


class CNNScorer:
    """HEiMDaL CNN frame scorer: score = sigmoid(detect logit), start frame = t - predicted offset."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.runner = _ContextModel(model)
        self.frame = 0

    def reset(self) -> None:
        """Forget the stream."""
        self.runner.reset()
        self.frame = 0

    def push(self, frames: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(scores, start frames) for the new frames."""
        logits, offset = self.runner.push(frames)
        n = frames.shape[-1]
        t = np.arange(self.frame, self.frame + n, dtype=np.float64)
        self.frame += n
        scores = torch.sigmoid(logits.double()).numpy()  # float64: float32 sigmoids tie at 1.0 from logit 16.7
        if offset is None:
            return scores, np.full(n, np.nan)
        to_frames = getattr(self.model, "offset_frames", None)
        frames_back = to_frames(offset.float()) if callable(to_frames) else offset.float()
        return scores, t - frames_back.numpy().astype(np.float64)


class HMMScorer:
    """DNN-HMM baseline: frame phone log-posteriors -> online keyword Viterbi (:class:`lopkit.kws.hmm.KeywordViterbiStream`).

    Score = best keyword path ending at the frame minus the filler path over its span; start = that path's first
    frame. Frames before any complete keyword path get ``score_floor`` instead of -inf (so smoothing stays finite).
    """

    def __init__(self, model: nn.Module, keyword_phone_ids: Iterable[int], n_classes: int, score_floor: float = -1e4,
                 **hmm_kwargs: Any):
        from lopkit.kws.hmm import KeywordViterbiStream

        self.runner = _ContextModel(model)
        self.decoder = KeywordViterbiStream(list(keyword_phone_ids), n_classes, **hmm_kwargs)
        self.score_floor = float(score_floor)

    def reset(self) -> None:
        """Forget the stream."""
        self.runner.reset()
        self.decoder.reset()

    def push(self, frames: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(scores, start frames) for the new frames."""
        logits, _ = self.runner.push(frames)
        if frames.shape[-1] == 0:
            return np.zeros(0), np.zeros(0)
        log_post = torch.log_softmax(logits.float(), dim=0).T.numpy().astype(np.float64)  # [n, C]
        result = self.decoder.step(log_post)
        scores = np.maximum(np.nan_to_num(result.score, nan=self.score_floor, neginf=self.score_floor), self.score_floor)
        starts = np.where(result.start >= 0, result.start, np.nan).astype(np.float64)
        return scores, starts


@torch.no_grad()
def score_features(scorer: CNNScorer | HMMScorer, feats: Tensor, chunk_frames: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """Scores and start frames of one normalised feature sequence ``[n_mels, T]`` (fed in chunks; scorer reset)."""
    scorer.reset()
    scores, starts = [], []
    for begin in range(0, feats.shape[-1], chunk_frames):
        s, st = scorer.push(feats[..., begin:begin + chunk_frames])
        scores.append(s)
        starts.append(st)
    scorer.reset()
    if not scores:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(scores), np.concatenate(starts)


# ------------------------------------------------------------------------------------------- detector


class StreamingDetector:
    """PCM chunks in, detections out: features -> frame scorer -> smoothing, threshold and refractory period."""

    def __init__(self, scorer: CNNScorer | HMMScorer, threshold: float, smooth_frames: int = 3,
                 refractory_s: float = 1.0, n_mels: int = 40):
        from lopkit.kws.features import StreamingLogMel

        self.features = StreamingLogMel(n_mels)
        self.scorer = scorer
        self.trigger = TriggerLogic(threshold, smooth_frames, max(1, round(refractory_s * FRAMES_PER_SECOND)))
        self.samples_seen = 0
        self.compute_seconds = 0.0
        self.chunk_seconds: list[float] = []

    def reset(self) -> None:
        """Start a new stream."""
        self.features.reset()
        self.scorer.reset()
        self.trigger.reset()
        self.samples_seen = 0
        self.compute_seconds = 0.0
        self.chunk_seconds = []

    def push(self, samples: np.ndarray) -> list[Detection]:
        """Process the next PCM chunk (float32 at 16 kHz); return the detections it completes."""
        tick = time.perf_counter()
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self.samples_seen += samples.size
        frames = self.features.push(torch.from_numpy(samples))
        detections: list[Detection] = []
        if frames.shape[-1]:
            scores, starts = self.scorer.push(frames)
            detections = self.trigger.push(scores, starts)
        elapsed = time.perf_counter() - tick
        self.compute_seconds += elapsed
        self.chunk_seconds.append(elapsed)
        return detections

    @property
    def real_time_factor(self) -> float:
        """Processing time divided by the duration of the audio processed so far."""
        audio_seconds = self.samples_seen / SAMPLE_RATE
        return self.compute_seconds / audio_seconds if audio_seconds > 0 else float("nan")


# --------------------------------------------------------------------------------------------- listen


def _resample(audio: np.ndarray, rate: int) -> np.ndarray:
    """Resample to 16 kHz (polyphase) when needed."""
    if rate == SAMPLE_RATE:
        return audio
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(rate, SAMPLE_RATE)
    return resample_poly(audio, SAMPLE_RATE // g, rate // g).astype(np.float32)


def read_audio(path: str | Path) -> np.ndarray:
    """A WAV file as mono float32 at 16 kHz (PCM 8/16/32-bit or float; channels averaged, resampled)."""
    from scipy.io import wavfile

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such audio file: {path}")
    rate, data = wavfile.read(str(path))
    if data.dtype == np.int16:
        audio = data.astype(np.float32) / 32768.0
    elif data.dtype == np.int32:
        audio = data.astype(np.float32) / 2147483648.0
    elif data.dtype == np.uint8:
        audio = (data.astype(np.float32) - 128.0) / 128.0
    else:
        audio = data.astype(np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    return _resample(audio, int(rate))


def _pcm_chunks(stream: BinaryIO, chunk_samples: int) -> Iterator[np.ndarray]:
    """Raw 16-bit little-endian mono 16 kHz PCM from a binary stream, as float32 chunks."""
    leftover = b""
    while True:
        data = stream.read(2 * chunk_samples)
        if not data:
            break
        data = leftover + data
        usable = len(data) - len(data) % 2
        leftover = data[usable:]
        if usable:
            yield np.frombuffer(data[:usable], dtype="<i2").astype(np.float32) / 32768.0


@dataclasses.dataclass
class ListenResult:
    """What :func:`listen` found: detections, audio duration, compute time and the real-time factor."""

    detections: list[Detection]
    audio_seconds: float
    compute_seconds: float
    chunk_seconds: list[float] = dataclasses.field(default_factory=list)

    def latency_ms(self) -> dict[str, float]:
        """Per-chunk processing time in ms: mean, p95, max and the number of chunks (empty if none)."""
        if not self.chunk_seconds:
            return {}
        values = np.asarray(self.chunk_seconds) * 1000.0
        return {"mean": float(values.mean()), "p95": float(np.percentile(values, 95)), "max": float(values.max()),
                "chunks": float(values.size)}

    @property
    def real_time_factor(self) -> float:
        """Compute time / audio time (below 1: faster than real time)."""
        return self.compute_seconds / self.audio_seconds if self.audio_seconds > 0 else float("nan")


def listen(source: str | Path | BinaryIO, detector: StreamingDetector, chunk_s: float = 0.1,
           on_detection: Any = None) -> ListenResult:
    """Run ``detector`` over a WAV file, ``"-"`` (raw 16-bit PCM on stdin) or a binary stream, in ``chunk_s`` chunks.

    ``on_detection(detection)`` is called as soon as each detection is made (e.g. to print it live).
    """
    chunk = max(1, int(round(chunk_s * SAMPLE_RATE)))
    detector.reset()
    if isinstance(source, (str, Path)) and str(source) != "-":
        audio = read_audio(source)
        chunks: Iterable[np.ndarray] = (audio[i:i + chunk] for i in range(0, audio.size, chunk))
    else:
        stream = sys.stdin.buffer if str(source) == "-" else source
        if isinstance(stream, (bytes, bytearray)):
            stream = io.BytesIO(stream)
        chunks = _pcm_chunks(stream, chunk)  # type: ignore[arg-type]
    found: list[Detection] = []
    for piece in chunks:
        for detection in detector.push(piece):
            found.append(detection)
            if on_detection is not None:
                on_detection(detection)
    return ListenResult(found, detector.samples_seen / SAMPLE_RATE, detector.compute_seconds,
                        list(detector.chunk_seconds))


def write_wav(path: str | Path, audio: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    """Write mono float audio as 16-bit PCM WAV."""
    pcm = np.clip(np.asarray(audio, dtype=np.float64), -1.0, 1.0)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes((pcm * 32767.0).astype("<i2").tobytes())
    return Path(path)
