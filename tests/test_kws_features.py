"""Log-mel front end: HTK filterbank, frame alignment, streaming = offline, global feature stats."""

import math

import numpy as np
import pytest
import torch

from lopkit.kws.features import (
    HOP_SAMPLES,
    LOG_FLOOR,
    WIN_SAMPLES,
    FeatureStats,
    StreamingLogMel,
    log_mel,
    mel_filterbank,
    num_frames,
)


def _reference_filterbank(n_mels, n_fft, sr):
    """Triangles built one bin at a time from the HTK formula (independent of the vectorised version)."""
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    inv = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    top = mel(sr / 2)
    edges = [inv(top * i / (n_mels + 1)) for i in range(n_mels + 2)]
    bank = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        for k in range(n_fft // 2 + 1):
            f = k * sr / n_fft
            if lo < f <= mid:
                bank[m, k] = (f - lo) / (mid - lo)
            elif mid < f < hi:
                bank[m, k] = (hi - f) / (hi - mid)
    return bank


def test_filterbank_matches_bin_by_bin_htk_triangles():
    bank = mel_filterbank(40, 512, 16000).numpy()
    assert bank.shape == (40, 257)
    np.testing.assert_allclose(bank, _reference_filterbank(40, 512, 16000), atol=1e-6)


def test_pure_tone_peaks_in_the_band_centred_nearest_to_it():
    sr = 16000
    t = np.arange(sr) / sr
    centres = 700.0 * (10 ** (np.linspace(0, 2595 * math.log10(1 + 8000 / 700), 42)[1:-1] / 2595) - 1)
    for band in (5, 20, 33):
        tone = torch.tensor(0.5 * np.sin(2 * np.pi * centres[band] * t), dtype=torch.float32)
        feats = log_mel(tone)
        assert int(feats.mean(dim=1).argmax()) == band


def test_frame_t_covers_samples_160t_to_160t_plus_400():
    n_samples = 4000
    assert num_frames(n_samples) == 1 + (n_samples - WIN_SAMPLES) // HOP_SAMPLES
    for position in (0, 1, 159, 160, 399, 400, 1234, 3999):
        audio = torch.zeros(n_samples)
        audio[position] = 1.0
        energetic = (log_mel(audio) > math.log(LOG_FLOOR) + 1e-4).any(dim=0)
        # periodic Hann: tap 0 is exactly zero, taps 1..399 are positive
        expected = torch.tensor([1 <= position - HOP_SAMPLES * t <= WIN_SAMPLES - 1 for t in range(num_frames(n_samples))])
        assert torch.equal(energetic, expected), position


def test_short_audio_gives_zero_frames_and_batches_match_single_clips():
    assert log_mel(torch.zeros(399)).shape == (40, 0)
    assert log_mel(torch.zeros(400)).shape == (40, 1)
    audio = torch.randn(3, 5000) * 0.1
    batch = log_mel(audio)
    for i in range(3):
        torch.testing.assert_close(batch[i], log_mel(audio[i]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="float"):
        log_mel(torch.zeros(1000, dtype=torch.int16))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_equals_offline_for_random_chunkings(seed):
    rng = np.random.default_rng(seed)
    audio = torch.tensor(rng.normal(0, 0.1, 16000 + int(rng.integers(0, 400))), dtype=torch.float32)
    offline = log_mel(audio)
    stream = StreamingLogMel()
    pieces, position = [], 0
    while position < audio.numel():
        size = int(rng.choice([1, 7, 160, 399, 400, 1000, 2500]))
        pieces.append(stream.push(audio[position : position + size].numpy()))
        position += size
    streamed = torch.cat(pieces, dim=-1)
    assert streamed.shape == offline.shape
    assert stream.frames_emitted == offline.shape[-1]
    assert float((streamed - offline).abs().max()) <= 1e-5


def test_feature_stats_fit_over_batches_equals_direct_moments_and_round_trips():
    rng = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 40, 50, generator=rng) * 3 + 2, torch.randn(2, 40, 30, generator=rng) - 1]
    stats = FeatureStats.fit(iter(batches))
    frames = torch.cat([b.permute(0, 2, 1).reshape(-1, 40) for b in batches]).double()
    torch.testing.assert_close(stats.mean.double(), frames.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.std.double(), frames.std(0, unbiased=False), atol=1e-5, rtol=0)
    assert int(stats.frames_seen) == frames.shape[0]
    normalised = stats(torch.cat([b.permute(1, 0, 2).reshape(40, -1) for b in batches], dim=1))
    torch.testing.assert_close(normalised.mean(1), torch.zeros(40), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalised.std(1, unbiased=False), torch.ones(40), atol=1e-4, rtol=0)
    restored = FeatureStats(40)
    restored.load_state_dict(stats.state_dict())
    assert torch.equal(restored.mean, stats.mean) and torch.equal(restored.std, stats.std)


def test_feature_stats_rejects_bad_input():
    with pytest.raises(FloatingPointError):
        FeatureStats.fit(torch.full((1, 40, 5), float("nan")))
    with pytest.raises(ValueError, match="no frames"):
        FeatureStats.fit([])
    with pytest.raises(ValueError, match="40"):
        FeatureStats(40)(torch.zeros(1, 30, 5))
