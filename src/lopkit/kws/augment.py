"""Seeded NumPy audio augmentation for keyword spotting: speed, reverb, coloured/babble noise, gain, band-limit.

Every function takes an explicit ``numpy.random.Generator`` (or explicit values) so a clip's augmentation is a pure
function of its seed. Timing-aware: ``speed_perturb`` returns the factor by which times scale; the other transforms
keep sample positions (causal reverb with the direct path at lag 0, zero-phase band-limit filter).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import butter, fftconvolve, sosfiltfilt

from lopkit.configs import require
from lopkit.kws.synth import resample_ratio

SAMPLE_RATE = 16000
NOISE_COLORS = ("white", "pink", "brown")


def power(audio: np.ndarray) -> float:
    """Mean square of a signal (float64)."""
    return float(np.mean(np.square(audio, dtype=np.float64))) if len(audio) else 0.0


def speed_perturb(audio: np.ndarray, factor: float, resolution: int = 100) -> tuple[np.ndarray, float]:
    """Play ``audio`` ``factor`` times faster by resampling (pitch shifts too); returns (audio, time_scale).

    The factor is rounded to a ratio ``down/resolution``; times in the output are input times x ``time_scale``
    (= resolution/down, exact for the polyphase resampler whose sample 0 stays at t=0).
    """
    if factor <= 0:
        raise ValueError(f"speed factor must be > 0, got {factor}")
    down = max(1, int(round(factor * resolution)))
    if down == resolution:
        return audio.astype(np.float32), 1.0
    return resample_ratio(audio, resolution, down), resolution / down


def colored_noise(rng: np.random.Generator, n: int, color: str = "white") -> np.ndarray:
    """Unit-power Gaussian noise with a 1/f^alpha power spectrum: white (0), pink (1), brown (2)."""
    if color not in NOISE_COLORS:
        raise ValueError(f"noise color must be one of {NOISE_COLORS}, got {color!r}")
    white = rng.standard_normal(n)
    if color == "white" or n < 2:
        noise = white
    else:
        alpha = 1.0 if color == "pink" else 2.0
        spectrum = np.fft.rfft(white)
        freqs = np.fft.rfftfreq(n)
        freqs[0] = freqs[1]  # avoid dividing by zero at DC
        noise = np.fft.irfft(spectrum / freqs ** (alpha / 2.0), n)
    noise = noise - noise.mean()
    return (noise / np.sqrt(max(power(noise), 1e-20))).astype(np.float32)


def babble_noise(
    rng: np.random.Generator, sources: list[np.ndarray], n: int, n_talkers: tuple[int, int] = (3, 6)
) -> np.ndarray:
    """Unit-power babble: sum of 3-6 randomly chosen, randomly offset (tiled) speech clips."""
    if not sources:
        raise ValueError("babble noise needs at least one source clip")
    k = int(rng.integers(n_talkers[0], n_talkers[1] + 1))
    mix = np.zeros(n, np.float64)
    for _ in range(k):
        src = sources[int(rng.integers(len(sources)))].astype(np.float64)
        if len(src) == 0:
            continue
        reps = int(np.ceil((n + len(src)) / len(src)))
        tiled = np.tile(src, reps)
        offset = int(rng.integers(len(src)))
        piece = tiled[offset : offset + n]
        mix += piece / np.sqrt(max(power(piece), 1e-20))
    return (mix / np.sqrt(max(power(mix), 1e-20))).astype(np.float32)


def mix_at_snr(
    signal: np.ndarray, noise: np.ndarray, snr_db: float, reference_power: float | None = None
) -> np.ndarray:
    """signal + scaled noise so that 10 log10(P_signal / P_noise) = snr_db (P_signal: whole clip or given)."""
    if len(noise) != len(signal):
        raise ValueError(f"noise length {len(noise)} != signal length {len(signal)}")
    p_signal = power(signal) if reference_power is None else reference_power
    p_noise = power(noise)
    if p_noise == 0.0 or p_signal == 0.0:
        return signal.astype(np.float32)
    scale = np.sqrt(p_signal / (p_noise * 10.0 ** (snr_db / 10.0)))
    return (signal.astype(np.float64) + scale * noise).astype(np.float32)


def synthetic_rir(rng: np.random.Generator, rt60_s: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Exponential-decay room impulse response: unit direct path at lag 0, then decaying noise tail (-60 dB at rt60)."""
    n = max(2, int(rt60_s * sample_rate))
    t = np.arange(n) / sample_rate
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60_s)  # ln(1000) = 6.9078: amplitude -60 dB at rt60
    tail[: int(0.002 * sample_rate)] = 0.0  # first reflection after 2 ms keeps the onset sharp
    rir = 0.3 * tail / max(np.sqrt(np.sum(tail**2)), 1e-12)
    rir[0] = 1.0
    return rir


def reverberate(audio: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """Causal convolution with ``rir`` truncated to the input length (times unchanged), power renormalised."""
    wet = fftconvolve(audio.astype(np.float64), rir)[: len(audio)]
    p_in, p_out = power(audio), power(wet)
    if p_out > 0:
        wet *= np.sqrt(p_in / p_out)
    return wet.astype(np.float32)


def band_limit(audio: np.ndarray, low_hz: float, high_hz: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Zero-phase 4th-order Butterworth band-pass (no time shift)."""
    nyquist = sample_rate / 2.0
    high = min(high_hz, nyquist * 0.99)
    sos = butter(4, [low_hz / nyquist, high / nyquist], btype="bandpass", output="sos")
    if len(audio) <= 27:  # sosfiltfilt needs some padding room
        return audio.astype(np.float32)
    return sosfiltfilt(sos, audio.astype(np.float64)).astype(np.float32)


def apply_gain_db(audio: np.ndarray, gain_db: float, peak_limit: float = 0.99) -> np.ndarray:
    """Multiply by 10^(gain/20), then scale down if the peak would exceed ``peak_limit`` (no clipping)."""
    out = audio.astype(np.float64) * 10.0 ** (gain_db / 20.0)
    peak = float(np.max(np.abs(out))) if len(out) else 0.0
    if peak > peak_limit:
        out *= peak_limit / peak
    return out.astype(np.float32)


@dataclass
class AugmentConfig:
    """Ranges and probabilities of the clip augmentation (spec 2.6)."""

    speed_range: tuple[float, float] = (0.9, 1.1)
    reverb_prob: float = 0.5
    rt60_range: tuple[float, float] = (0.1, 0.6)
    noise_prob: float = 0.9
    snr_range: tuple[float, float] = (0.0, 20.0)
    babble_prob: float = 0.25
    gain_db_range: tuple[float, float] = (-10.0, 6.0)
    band_limit_prob: float = 0.3
    base_level: float = 0.1  # target RMS before the random gain

    def validate(self) -> None:
        """Reject impossible ranges."""
        require(0 < self.speed_range[0] <= self.speed_range[1], "speed_range must be (lo, hi) with 0 < lo <= hi")
        require(0 < self.rt60_range[0] <= self.rt60_range[1], "rt60_range must be positive (lo, hi)")
        require(self.snr_range[0] <= self.snr_range[1], "snr_range must be (lo, hi) with lo <= hi")
        for name in ("reverb_prob", "noise_prob", "babble_prob", "band_limit_prob"):
            require(0.0 <= getattr(self, name) <= 1.0, f"{name} must be a probability in [0, 1]")


def normalize_rms(audio: np.ndarray, level: float) -> np.ndarray:
    """Scale to RMS ``level`` (silence stays silence)."""
    p = power(audio)
    return audio.astype(np.float32) if p == 0 else (audio * (level / np.sqrt(p))).astype(np.float32)


def augment_speech(
    audio: np.ndarray, rng: np.random.Generator, config: AugmentConfig
) -> tuple[np.ndarray, float, dict]:
    """Speed + reverb + band-limit + level on clean speech (no noise); returns (audio, time_scale, params)."""
    factor = float(rng.uniform(*config.speed_range))
    out, time_scale = speed_perturb(audio, factor)
    params: dict = {"speed": 1.0 / time_scale}
    if rng.random() < config.reverb_prob:
        rt60 = float(rng.uniform(*config.rt60_range))
        out = reverberate(out, synthetic_rir(rng, rt60))
        params["rt60"] = rt60
    if rng.random() < config.band_limit_prob:
        low, high = float(rng.uniform(80, 300)), float(rng.uniform(3400, 7800))
        out = band_limit(out, low, high)
        params["band"] = [low, high]
    return normalize_rms(out, config.base_level), time_scale, params


def add_background(
    audio: np.ndarray, rng: np.random.Generator, config: AugmentConfig, babble_sources: list[np.ndarray] | None = None,
    reference_power: float | None = None,
) -> tuple[np.ndarray, dict]:
    """Add noise (coloured or babble) at a random SNR, then a random gain; returns (audio, params)."""
    params: dict = {}
    out = audio
    if rng.random() < config.noise_prob:
        snr = float(rng.uniform(*config.snr_range))
        if babble_sources and rng.random() < config.babble_prob:
            noise, kind = babble_noise(rng, babble_sources, len(audio)), "babble"
        else:
            kind = NOISE_COLORS[int(rng.integers(len(NOISE_COLORS)))]
            noise = colored_noise(rng, len(audio), kind)
        out = mix_at_snr(audio, noise, snr, reference_power)
        params.update(noise=kind, snr_db=snr)
    gain = float(rng.uniform(*config.gain_db_range))
    params["gain_db"] = gain
    return apply_gain_db(out, gain), params
