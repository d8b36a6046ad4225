"""Log-mel front end for keyword spotting: offline, streaming, and fixed global normalisation.

Conventions (used everywhere in :mod:`lopkit.kws`):

- 16 kHz mono float audio in [-1, 1]; 25 ms window (400 samples), 10 ms hop (160 samples), 100 frames/s.
- Frame ``t`` covers samples ``[160 t, 160 t + 400)`` exactly: ``torch.stft`` runs with ``center=False`` and a
  periodic Hann window of 400 samples zero-padded on the right to ``n_fft = 512``; the audio is zero-padded on the
  right by ``n_fft - 400`` samples, which only ever meets zero window taps. A clip of ``S`` samples gives
  ``T = 1 + (S - 400) // 160`` frames (0 when ``S < 400``). No pre-emphasis, no dither.
- Power spectrum ``|X|^2`` -> 40 triangular mel filters -> ``log(mel + 1e-6)``.
- Mel scale: HTK, ``mel(f) = 2595 log10(1 + f / 700)``. Filter centres are equally spaced in mel between
  ``f_min`` and ``f_max``; each triangle rises linearly in Hz from the previous centre to its centre and falls to
  the next one (peak 1, no area normalisation), evaluated at the FFT bin frequencies ``k sr / n_fft``.

Per-utterance mean normalisation is not streaming-friendly, so features are normalised with fixed global
per-mel mean/std (:class:`FeatureStats`) fitted once on training features and stored as module buffers (they
travel in ``state_dict``).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn

__all__ = [
    "SAMPLE_RATE",
    "WIN_SAMPLES",
    "HOP_SAMPLES",
    "N_FFT",
    "N_MELS",
    "LOG_FLOOR",
    "hz_to_mel_htk",
    "mel_to_hz_htk",
    "mel_filterbank",
    "padded_window",
    "num_frames",
    "log_mel",
    "log_mel_frames",
    "StreamingLogMel",
    "FRAMES_PER_SECOND",
    "FeatureStats",
]

SAMPLE_RATE = 16000
WIN_SAMPLES = 400
HOP_SAMPLES = 160
#: Feature frames per second of audio (10 ms hop): the one definition the metrics, losses and streaming use.
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_SAMPLES
N_FFT = 512
N_MELS = 40
LOG_FLOOR = 1e-6


def hz_to_mel_htk(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: 2595 * log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz_htk(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel_htk`."""
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    n_mels: int = N_MELS, n_fft: int = N_FFT, sr: int = SAMPLE_RATE, f_min: float = 0.0, f_max: float | None = None
) -> torch.Tensor:
    """Triangular HTK-mel filterbank as a float32 matrix of shape ``[n_mels, n_fft // 2 + 1]``."""
    f_max = sr / 2.0 if f_max is None else float(f_max)
    if n_mels < 1 or n_fft < 2 or sr <= 0:
        raise ValueError(f"mel_filterbank: need n_mels >= 1, n_fft >= 2, sr > 0; got {n_mels}, {n_fft}, {sr}")
    if not 0.0 <= f_min < f_max <= sr / 2.0:
        raise ValueError(f"mel_filterbank: need 0 <= f_min < f_max <= sr/2; got f_min={f_min}, f_max={f_max}")
    edges_mel = np.linspace(hz_to_mel_htk(f_min), hz_to_mel_htk(f_max), n_mels + 2)
    edges_hz = mel_to_hz_htk(edges_mel)
    bin_hz = np.arange(n_fft // 2 + 1) * sr / n_fft
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bin_hz[None, :] - lower) / (centre - lower)
    falling = (upper - bin_hz[None, :]) / (upper - centre)
    weights = np.clip(np.minimum(rising, falling), 0.0, None)
    return torch.from_numpy(weights.astype(np.float32))


def num_frames(n_samples: int) -> int:
    """Number of complete 25 ms / 10 ms frames in ``n_samples`` samples."""
    return 0 if n_samples < WIN_SAMPLES else 1 + (n_samples - WIN_SAMPLES) // HOP_SAMPLES


_FILTERBANKS: dict[tuple[int, str], torch.Tensor] = {}
_WINDOWS: dict[str, torch.Tensor] = {}


def _filterbank(n_mels: int, device: torch.device) -> torch.Tensor:
    key = (n_mels, str(device))
    if key not in _FILTERBANKS:
        _FILTERBANKS[key] = mel_filterbank(n_mels).to(device)
    return _FILTERBANKS[key]


def padded_window() -> torch.Tensor:
    """The analysis window: a periodic 400-sample Hann window zero-padded on the right to ``N_FFT`` taps."""
    window = torch.zeros(N_FFT)
    window[:WIN_SAMPLES] = torch.hann_window(WIN_SAMPLES, periodic=True)
    return window


def _window(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _WINDOWS:
        _WINDOWS[key] = padded_window().to(device)
    return _WINDOWS[key]


def log_mel(audio: torch.Tensor | np.ndarray, n_mels: int = N_MELS) -> torch.Tensor:
    """Log-mel features ``[..., n_mels, T]`` of float audio ``[..., S]`` at 16 kHz (frame t = samples [160t, 160t+400))."""
    audio = torch.as_tensor(audio)
    if audio.dim() == 0:
        raise ValueError("log_mel: audio must have a time axis, got a scalar")
    if not audio.is_floating_point():
        raise ValueError(f"log_mel: audio must be float in [-1, 1], got dtype {audio.dtype}")
    audio = audio.float()
    lead_shape, n_samples = audio.shape[:-1], audio.shape[-1]
    n_out = num_frames(n_samples)
    if n_out == 0:
        return audio.new_zeros(*lead_shape, n_mels, 0)
    flat = audio.reshape(-1, n_samples)
    return log_mel_frames(flat, _window(flat.device), _filterbank(n_mels, flat.device)).reshape(*lead_shape, n_mels, n_out)


def log_mel_frames(flat: torch.Tensor, window: torch.Tensor, filterbank: torch.Tensor, win_samples: int = WIN_SAMPLES,
                   hop_samples: int = HOP_SAMPLES, log_floor: float = LOG_FLOOR) -> torch.Tensor:
    """Log-mel ``[B, n_mels, T]`` of every complete frame of ``flat`` ``[B, S]`` (S >= 400), given the padded window.

    The one implementation of the front end's arithmetic (TorchScript-compatible, so constants are arguments: the exported streaming spotter
    of :mod:`lopkit.kws.export` calls it too); :func:`log_mel` wraps it with checks and cached constants.
    """
    n_fft = window.shape[0]
    n_out = 1 + (flat.shape[-1] - win_samples) // hop_samples
    flat = flat[:, : win_samples + (n_out - 1) * hop_samples]
    flat = torch.nn.functional.pad(flat, (0, n_fft - win_samples))
    spec = torch.stft(
        flat, n_fft=n_fft, hop_length=hop_samples, win_length=n_fft, window=window,
        center=False, return_complex=True,
    )
    power = spec.real.square() + spec.imag.square()  # [B, n_fft//2+1, T]
    return torch.log(torch.matmul(filterbank, power) + log_floor)


class StreamingLogMel:
    """Feed audio chunks of any size; emits exactly the frames :func:`log_mel` gives on the concatenated audio."""

    def __init__(self, n_mels: int = N_MELS):
        self.n_mels = n_mels
        self._buffer = torch.zeros(0)
        self.frames_emitted = 0

    def reset(self) -> None:
        """Forget buffered audio and restart frame counting."""
        self._buffer = torch.zeros(0)
        self.frames_emitted = 0

    def push(self, chunk: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Append a mono chunk ``[S]``; return the newly complete frames ``[n_mels, n_new]`` (n_new may be 0)."""
        chunk = torch.as_tensor(chunk)
        if chunk.dim() != 1:
            raise ValueError(f"StreamingLogMel.push: expected a mono chunk of shape [S], got {tuple(chunk.shape)}")
        if not chunk.is_floating_point():
            raise ValueError(f"StreamingLogMel.push: audio must be float in [-1, 1], got dtype {chunk.dtype}")
        self._buffer = torch.cat([self._buffer, chunk.float()])
        n_new = num_frames(self._buffer.numel())
        if n_new == 0:
            return torch.zeros(self.n_mels, 0)
        frames = log_mel(self._buffer, self.n_mels)
        self._buffer = self._buffer[n_new * HOP_SAMPLES :]
        self.frames_emitted += n_new
        return frames


class FeatureStats(nn.Module):
    """Fixed global per-mel mean/std normaliser; buffers ``mean``, ``std`` live in ``state_dict``."""

    def __init__(self, n_mels: int = N_MELS):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_mels))
        self.register_buffer("std", torch.ones(n_mels))
        self.register_buffer("frames_seen", torch.zeros((), dtype=torch.float64))

    @property
    def n_mels(self) -> int:
        """Number of mel channels these stats describe."""
        return self.mean.numel()

    @classmethod
    def fit(cls, features: torch.Tensor | Iterable[torch.Tensor], min_std: float = 1e-3) -> "FeatureStats":
        """Fit per-mel mean/std over every frame of ``features`` (a ``[..., n_mels, T]`` tensor or an iterable of them)."""
        batches = [features] if isinstance(features, torch.Tensor) else features
        total = total_sq = None
        count = 0
        for batch in batches:
            batch = torch.as_tensor(batch)
            if batch.dim() < 2:
                raise ValueError(f"FeatureStats.fit: expected [..., n_mels, T] features, got shape {tuple(batch.shape)}")
            frames = batch.double().movedim(-2, -1).reshape(-1, batch.shape[-2])
            if not torch.isfinite(frames).all():
                raise FloatingPointError("FeatureStats.fit: features contain NaN/inf; check the audio and log floor")
            total = frames.sum(0) if total is None else total + frames.sum(0)
            total_sq = frames.square().sum(0) if total_sq is None else total_sq + frames.square().sum(0)
            count += frames.shape[0]
        if total is None or count == 0:
            raise ValueError("FeatureStats.fit: no frames given; fit on a non-empty set of training features")
        mean = total / count
        var = (total_sq / count - mean.square()).clamp_min(0.0)
        stats = cls(mean.numel())
        stats.mean.copy_(mean.float())
        stats.std.copy_(var.sqrt().clamp_min(min_std).float())
        stats.frames_seen.fill_(count)
        return stats

    def load_from(self, other: "FeatureStats") -> None:
        """Copy another FeatureStats' values into this one (shapes must match)."""
        if other.n_mels != self.n_mels:
            raise ValueError(f"FeatureStats: n_mels mismatch ({other.n_mels} vs {self.n_mels})")
        self.load_state_dict(other.state_dict())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Normalise ``[..., n_mels, T]`` features: (x - mean) / std per mel channel."""
        if features.dim() < 2 or features.shape[-2] != self.n_mels:
            raise ValueError(f"FeatureStats: expected [..., {self.n_mels}, T] features, got {list(features.shape)}")
        return (features - self.mean[:, None]) / self.std[:, None]

