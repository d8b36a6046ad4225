"""lopkit.kws.stream: trigger logic on constructed posteriors, chunk-invariant streaming, listen on a WAV file."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch


def _brute_force_detections(raw, starts, threshold, smooth, refractory):
    """Independent reference: smoothing by explicit window means, then an explicit scan with a blocking counter."""
    found, blocked_until = [], 0
    for t in range(len(raw)):
        window = raw[max(0, t - smooth + 1):t + 1]
        value = sum(window) / len(window)
        if t >= blocked_until and value > threshold:
            found.append((t, starts[t], value))
            blocked_until = t + refractory
    return found


def test_trigger_logic_on_a_constructed_posterior_sequence():
    from lopkit.kws.stream import TriggerLogic

    raw = np.zeros(400)
    raw[100:112] = 0.9  # keyword 1: fires once (smoothed mean over 3 frames crosses 0.5 at frame 101)
    raw[150:160] = 0.95  # inside the refractory period of the first trigger: ignored
    raw[300:305] = 0.8  # after the refractory period: fires again
    offsets = np.full(400, 60.0)
    starts = np.arange(400) - offsets
    logic = TriggerLogic(threshold=0.5, smooth_frames=3, refractory_frames=100)
    detections = logic.push(raw[:150], starts[:150]) + logic.push(raw[150:], starts[150:])
    assert [round(d.time_s * 16000) for d in detections] == [101 * 160 + 400, 301 * 160 + 400]
    assert [d.start_s for d in detections] == pytest.approx([(101 - 60) / 100, (301 - 60) / 100])
    assert detections[0].score == pytest.approx((0.9 + 0.9 + 0.0) / 3)
    rng = np.random.default_rng(1)
    for _ in range(20):
        raw = rng.random(120) ** 3
        starts = np.arange(120) - rng.integers(0, 50, 120)
        smooth, refractory = int(rng.integers(1, 6)), int(rng.integers(1, 40))
        logic = TriggerLogic(0.4, smooth, refractory)
        cut = int(rng.integers(0, 120))
        got = logic.push(raw[:cut], starts[:cut]) + logic.push(raw[cut:], starts[cut:])
        expected = _brute_force_detections(raw, starts, 0.4, smooth, refractory)
        assert [round((d.time_s * 16000 - 400) / 160) for d in got] == [t for t, _, _ in expected]
        assert [d.start_s * 100 for d in got] == pytest.approx([float(s) for _, s, _ in expected])
        assert [d.score for d in got] == pytest.approx([v for _, _, v in expected])


def test_causal_moving_average_matches_windows():
    from lopkit.kws.stream import causal_moving_average

    x = np.random.default_rng(0).random(50)
    for width in (1, 2, 5):
        expected = [x[max(0, t - width + 1):t + 1].mean() for t in range(50)]
        np.testing.assert_allclose(causal_moving_average(x, width), expected)


def _tiny_cnn():
    from lopkit.kws.model import BCResNetKWS

    torch.manual_seed(0)
    return BCResNetKWS(tau=1, offset_scale=0.01).eval()


def _audio(seconds: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(2)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.2 * np.sin(2 * np.pi * 500 * t) * (np.sin(2 * np.pi * 0.7 * t) > 0) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def _offline_detections(model, audio, threshold, smooth, refractory_frames):
    """Offline reference: whole-clip log-mel + forward, then smoothing and the trigger scan."""
    from lopkit.kws.features import log_mel
    from lopkit.kws.metrics import trigger_frames
    from lopkit.kws.stream import causal_moving_average

    with torch.no_grad():
        out = model(log_mel(torch.from_numpy(audio))[None])
    scores = torch.sigmoid(out["detect"][0]).double().numpy()
    start = np.arange(scores.size) - model.offset_frames(out["offset"][0]).double().numpy()
    smoothed = causal_moving_average(scores, smooth)
    frames = trigger_frames(smoothed, threshold, refractory_frames)
    return frames, start[frames], smoothed


def test_streaming_detector_equals_offline_for_any_chunking():
    from lopkit.kws.stream import CNNScorer, StreamingDetector

    model, audio = _tiny_cnn(), _audio()
    _, _, smoothed = _offline_detections(model, audio, 0.0, 3, 20)
    threshold = float(np.quantile(smoothed, 0.7))
    frames, starts, _ = _offline_detections(model, audio, threshold, 3, 20)
    assert frames.size >= 2
    for chunk in (1111, 8000, audio.size):
        detector = StreamingDetector(CNNScorer(model), threshold, smooth_frames=3, refractory_s=0.2)
        found = []
        for begin in range(0, audio.size, chunk):
            found += detector.push(audio[begin:begin + chunk])
        assert [round((d.time_s * 16000 - 400) / 160) for d in found] == frames.tolist()
        np.testing.assert_allclose([d.start_s for d in found], starts / 100, atol=1e-5)
        assert detector.real_time_factor > 0


def test_hmm_scorer_streams_like_the_offline_viterbi():
    from lopkit.kws.features import log_mel
    from lopkit.kws.hmm import viterbi_keyword_scores
    from lopkit.kws.model import FramePhoneClassifier
    from lopkit.kws.stream import HMMScorer, score_features

    torch.manual_seed(0)
    model = FramePhoneClassifier(6, channels=(8, 4, 6, 8, 10, 16)).eval()
    feats = log_mel(torch.from_numpy(_audio(2.0)))
    with torch.no_grad():
        log_post = model.log_posteriors(feats[None])[0].double().numpy()
    reference = viterbi_keyword_scores(log_post, [2, 3, 4], states_per_phone=2)
    scorer = HMMScorer(model, [2, 3, 4], 6, states_per_phone=2)
    scores, starts = score_features(scorer, feats, chunk_frames=7)
    finite = np.isfinite(reference.score)
    np.testing.assert_allclose(scores[finite], reference.score[finite], rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(starts[finite], reference.start[finite])
    assert np.all(scores[~finite] == scorer.score_floor)


def test_listen_on_a_wav_file_and_on_raw_pcm(tmp_path):
    from scipy.io import wavfile

    from lopkit.kws.stream import CNNScorer, StreamingDetector, listen

    model, audio = _tiny_cnn(), _audio()
    pcm = np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16)
    path = tmp_path / "speech.wav"
    wavfile.write(path, 16000, pcm)
    quantised = pcm.astype(np.float32) / 32768.0
    _, _, smoothed = _offline_detections(model, quantised, 0.0, 3, 30)
    threshold = float(np.quantile(smoothed, 0.7))
    frames, _, _ = _offline_detections(model, quantised, threshold, 3, 30)
    detector = StreamingDetector(CNNScorer(model), threshold, smooth_frames=3, refractory_s=0.3)
    printed = []
    result = listen(path, detector, chunk_s=0.2, on_detection=printed.append)
    assert [round((d.time_s * 16000 - 400) / 160) for d in result.detections] == frames.tolist()
    assert printed == result.detections
    assert result.audio_seconds == pytest.approx(audio.size / 16000)
    assert result.real_time_factor > 0
    raw = listen(io.BytesIO(pcm.astype("<i2").tobytes()), detector, chunk_s=0.25)
    # same frames and scores; the start estimate comes from a float32 offset head run on other chunk shapes, so it
    # may differ in the 8th digit (far below one 10 ms frame)
    assert [(d.time_s, d.score) for d in raw.detections] == [(d.time_s, d.score) for d in result.detections]
    np.testing.assert_allclose([d.start_s for d in raw.detections], [d.start_s for d in result.detections], atol=1e-6)
    with pytest.raises(FileNotFoundError):
        listen(tmp_path / "missing.wav", detector)
