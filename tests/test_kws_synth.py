"""Tests for lopkit.kws.synth (espeak-ng / flite / festival with timings) and lopkit.kws.augment."""

import numpy as np
import pytest

from lopkit.kws import augment as A
from lopkit.kws import synth as S

SR = S.SAMPLE_RATE


def _frame_rms(audio, start_s, end_s):
    seg = audio[int(start_s * SR) : int(end_s * SR)].astype(np.float64)
    return float(np.sqrt(np.mean(seg**2))) if len(seg) else 0.0


@pytest.mark.parametrize("voice", ["en-us+m3", "en-gb-scotland+f2", "en-029"])
def test_espeak_timings_monotone_and_keyword_voiced(voice):
    utt = S.espeak_synthesize("well, hey computer, turn it on", voice, 160, 50)
    assert utt.audio.dtype == np.float32 and utt.duration_s > 1.0
    names = [w.word for w in utt.words]
    assert names == ["well", "hey", "computer", "turn", "it", "on"]
    starts = [p.start_s for p in utt.phonemes]
    assert all(b >= a for a, b in zip(starts, starts[1:]))
    assert all(p.end_s >= p.start_s for p in utt.phonemes)
    assert all(w.end_s >= w.start_s for w in utt.words)
    assert all(b.start_s >= a.end_s - 1e-9 for a, b in zip(utt.words, utt.words[1:]))
    assert utt.phonemes[-1].end_s == pytest.approx(utt.duration_s, abs=2e-3)
    kw_start, kw_end = utt.words[1].start_s, utt.words[2].end_s
    keyword_rms = _frame_rms(utt.audio, kw_start, kw_end)
    # the comma pause right before "hey" (a '_:' pause phone) must be much quieter than the keyword
    pauses = [p for p in utt.phonemes if S.is_pause(p.phone) and p.end_s <= kw_start and p.end_s - p.start_s > 0.05]
    assert pauses, "expected a comma pause before the keyword"
    pause_rms = _frame_rms(utt.audio, pauses[-1].start_s + 0.02, pauses[-1].end_s)
    assert keyword_rms > 10 * pause_rms
    # the keyword's phones are exactly the words' phones
    kw_phones = [S.normalize_phone(p.phone) for p in utt.phonemes if p.word_index in (1, 2)]
    assert kw_phones[:2] == ["h", "eI"] and kw_phones[2] == "k"


def test_espeak_deterministic_and_rate_changes_duration():
    a = S.espeak_synthesize("hey computer", "en-us+f1", 150, 40)
    b = S.espeak_synthesize("hey computer", "en-us+f1", 150, 40)
    np.testing.assert_array_equal(a.audio, b.audio)
    slow = S.espeak_synthesize("hey computer", "en-us+f1", 110, 40)
    fast = S.espeak_synthesize("hey computer", "en-us+f1", 220, 40)
    assert slow.words[-1].end_s - slow.words[0].start_s > 1.3 * (fast.words[-1].end_s - fast.words[0].start_s)


def test_keyword_phones_and_phone_ids():
    phones = S.keyword_phones("hey computer")
    assert phones == ["h", "eI", "k", "@", "m", "p", "j", "u:", "t", "3"]
    classes = S.phone_set("hey computer")
    assert classes == S.PHONE_SET and classes[:2] == ["sil", "filler"] and len(set(classes)) == len(classes)
    assert S.phone_id("_:") == 0 and S.phone_id("_") == 0
    assert S.phone_id("t#") == classes.index("t")
    assert S.phone_id("z") == 1  # not a keyword phone -> filler
    assert S.phone_id("k", in_keyword=False) == 1


def test_voice_split_disjoint_and_deterministic():
    train, test = S.espeak_voice_split(0.2)
    assert train and test
    assert not {S.voice_variant(v) for v in train} & {S.voice_variant(v) for v in test}
    assert (train, test) == S.espeak_voice_split(0.2)
    n_variants = len(S.espeak_variants())
    assert len(train) + len(test) == n_variants * len(S.ESPEAK_LANGUAGES)
    assert 0.05 < len(test) / (len(train) + len(test)) < 0.4
    for voice in (test[0], test[-1], train[0]):  # voices really load
        assert len(S.espeak_synthesize("hello", voice, 170, 50).audio) > 0


def test_flite_segments_start_exactly_where_inserted():
    texts = ["well", "hey computer", "set a timer"]
    segs = S.synthesize_segments_raw("flite", "kal16", texts, [1.0, 1.1, 0.9])
    for seg in segs:  # trimmed: first and last 10 ms frame reach the threshold
        peak = np.max(np.abs(seg))
        assert np.max(np.abs(seg[:160])) >= 0.01 * peak and np.max(np.abs(seg[-160:])) >= 0.01 * peak
    utt = S.concatenate_segments(segs, texts, [0.2, 0.13], 0.05, 0.1, "flite", "flite:kal16")
    kw = utt.words[1]
    start = int(round(kw.start_s * SR))
    assert start == int(round(0.05 * SR)) + len(segs[0]) + int(round(0.2 * SR))
    np.testing.assert_array_equal(utt.audio[start : start + len(segs[1])], segs[1])
    assert np.all(utt.audio[start - int(0.2 * SR) : start] == 0)
    assert kw.end_s == pytest.approx(kw.start_s + len(segs[1]) / SR)
    kw_phones = [p for p in utt.phonemes if p.word_index == 1]
    assert kw_phones[0].start_s == pytest.approx(kw.start_s) and kw_phones[-1].end_s == pytest.approx(kw.end_s)


def test_festival_voice_synthesizes():
    utt = S.festival_synthesize("hey computer", "kal_diphone")
    assert 0.3 < utt.duration_s < 3.0 and np.max(np.abs(utt.audio)) > 0.05


def test_missing_binary_names_apt_packages(monkeypatch):
    monkeypatch.setattr(S.shutil, "which", lambda name: None)
    with pytest.raises(S.SynthesisUnavailableError, match="apt-get install espeak-ng flite festival"):
        S.flite_synthesize("hello")


def test_trim_silence_matches_threshold():
    audio = np.zeros(16000, np.float32)
    audio[4000:8000] = 0.5
    trimmed = S.trim_silence(audio)
    assert len(trimmed) == 4000 and np.all(trimmed == 0.5)


# --------------------------------------------------------------------------------------------------- augmentation
def _tone_burst(freq, n, start, total):
    t = np.arange(n) / SR
    out = np.zeros(total)
    out[start : start + n] = np.hanning(n) * np.sin(2 * np.pi * freq * t)
    return out


@pytest.mark.parametrize("factor", [0.9, 1.0, 1.07, 1.1])
def test_speed_perturb_scales_times(factor):
    start, n = 9000, 800
    audio = _tone_burst(500.0, n, start, 32000)
    out, scale = A.speed_perturb(audio, factor)
    assert scale == pytest.approx(1.0 / factor, rel=0.01)
    assert len(out) == pytest.approx(len(audio) * scale, abs=2)
    n2 = int(round(n * scale))
    template = np.hanning(n2) * np.sin(2 * np.pi * 500.0 / scale * np.arange(n2) / SR)
    lag = int(np.argmax(np.correlate(out, template, mode="valid")))
    assert abs(lag - start * scale) <= 2


def test_reverb_and_band_limit_keep_onset():
    start, n = 12000, 800
    t = np.arange(n) / SR
    chirp = np.hanning(n) * np.sin(2 * np.pi * (300 * t + 0.5 * (3000 - 300) / t[-1] * t**2))  # broadband: sharp peak
    audio = np.zeros(32000, np.float32)
    audio[start : start + n] = chirp
    rng = np.random.default_rng(0)
    for out in (A.reverberate(audio, A.synthetic_rir(rng, 0.4)), A.band_limit(audio, 200, 3400)):
        lag = int(np.argmax(np.correlate(out, chirp, mode="valid")))
        assert abs(lag - start) <= 2


@pytest.mark.parametrize("color", A.NOISE_COLORS + ("babble",))
@pytest.mark.parametrize("snr", [0.0, 7.5, 20.0])
def test_mix_at_snr_measured(color, snr):
    rng = np.random.default_rng(1)
    speech = S.espeak_synthesize("hey computer, turn on the lights", "en-us", 170, 50).audio
    if color == "babble":
        noise = A.babble_noise(rng, [speech[::-1].copy(), speech * 0.5, np.roll(speech, 999)], len(speech))
    else:
        noise = A.colored_noise(rng, len(speech), color)
    mixed = A.mix_at_snr(speech, noise, snr)
    residual = mixed.astype(np.float64) - speech.astype(np.float64)
    measured = 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / np.mean(residual**2))
    assert abs(measured - snr) < 0.5


@pytest.mark.parametrize("color,slope", [("white", 0.0), ("pink", -1.0), ("brown", -2.0)])
def test_colored_noise_spectral_slope(color, slope):
    noise = A.colored_noise(np.random.default_rng(3), 2**16, color)
    psd = np.abs(np.fft.rfft(noise)) ** 2
    freqs = np.fft.rfftfreq(len(noise))
    band = (freqs > 0.002) & (freqs < 0.4)
    fitted = np.polyfit(np.log(freqs[band]), np.log(psd[band]), 1)[0]
    assert abs(fitted - slope) < 0.15
    assert np.mean(noise.astype(np.float64) ** 2) == pytest.approx(1.0, rel=1e-3)


def test_augment_deterministic_from_seed():
    speech = S.espeak_synthesize("hey computer", "en-us", 170, 50).audio
    cfg = A.AugmentConfig(reverb_prob=1.0, band_limit_prob=1.0, noise_prob=1.0)

    def run(seed):
        rng = np.random.default_rng(seed)
        out, scale, _ = A.augment_speech(speech, rng, cfg)
        return A.add_background(out, rng, cfg, [speech])[0], scale

    (a, sa), (b, sb), (c, _) = run(5), run(5), run(6)
    np.testing.assert_array_equal(a, b)
    assert sa == sb and (len(a) != len(c) or not np.array_equal(a, c))


def test_gain_never_clips():
    audio = np.linspace(-0.9, 0.9, 1000).astype(np.float32)
    assert np.max(np.abs(A.apply_gain_db(audio, 12.0))) <= 0.99 + 1e-6
    np.testing.assert_allclose(A.apply_gain_db(audio, -6.0), audio * 10 ** (-6 / 20), rtol=1e-5)


def test_phone_frame_labels_match_brute_force():
    utt = S.espeak_synthesize("well, hey computer, turn it on", "en-us", 160, 50)
    rows = [[p.phone, p.start_s, p.end_s, p.word_index, int(p.word_index in (1, 2))] for p in utt.phonemes]
    n_frames = int(utt.duration_s * 100) + 5
    classes = S.phone_set()
    for specific in (True, False):
        labels = S.phone_frame_labels(rows, n_frames, keyword_specific=specific)
        for t in range(n_frames):
            centre = t * 0.01 + 0.0125
            hits = [r for r in rows if r[1] <= centre < r[2]]
            expected = 0
            if hits:
                name = S.normalize_phone(hits[-1][0])
                if S.is_pause(hits[-1][0]):
                    expected = 0
                elif name in classes[2:] and (hits[-1][4] or not specific):
                    expected = classes.index(name)
                else:
                    expected = 1
            assert labels[t] == expected, (t, hits)
    kw = S.phone_frame_labels(rows, n_frames)
    seq = [classes[i] for i in kw if i >= 2]
    dedup = [c for i, c in enumerate(seq) if i == 0 or c != seq[i - 1]]
    assert dedup == S.keyword_phones()  # the keyword's phones appear once each, in order
