"""Tests for lopkit.kws.corpus: tiny corpora built in tmp dirs (resume equality, splits, timings, streams)."""

import json
import math
import os

import numpy as np
import pytest

from lopkit.configs import ConfigError, build_config
from lopkit.kws import corpus as C
from lopkit.kws import synth as S

SR = S.SAMPLE_RATE
TINY = dict(
    n_pos=4, n_neg=4, val_fraction=0.25, n_test_pos=2, n_test_neg=2, n_cross_pos=2, n_cross_neg=2,
    stream_neg_minutes=0.25, n_stream_pos=2, stream_chunk_minutes=0.25, shard_size=3, seed=11,
    cross_voices=("flite:kal16", "festival:kal_diphone"),
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = build_config(C.CorpusConfig, TINY)
    out = str(tmp_path_factory.mktemp("kws") / "full")
    return config, C.build_corpus(config, out, progress=False, workers=1)


def _npz_equal(a, b):
    with np.load(a) as x, np.load(b) as y:
        assert sorted(x.files) == sorted(y.files)
        for key in x.files:
            np.testing.assert_array_equal(x[key], y[key])


def test_resume_in_two_halves_gives_identical_files(tiny, tmp_path):
    config, index = tiny
    out = str(tmp_path / "halves")
    assert C.build_corpus(config, out, progress=False, workers=1, max_tasks=4) is None
    with pytest.raises(FileNotFoundError, match="unfinished"):
        C.load_corpus(out)
    done_first = sorted(os.listdir(os.path.join(out, "clips")))
    assert len(done_first) == 4
    resumed = C.build_corpus(config, out, progress=False, workers=2)
    assert resumed is not None
    for split in C.CLIP_SPLITS + C.STREAM_SPLITS:
        files_a, files_b = index.files(split), resumed.files(split)
        assert [os.path.basename(f) for f in files_a] == [os.path.basename(f) for f in files_b]
        for a, b in zip(files_a, files_b):
            _npz_equal(a, b)


def test_finished_corpus_is_reused_and_mismatch_is_an_error(tiny):
    config, index = tiny
    mtimes = {f: os.path.getmtime(f) for s in C.CLIP_SPLITS for f in index.files(s)}
    again = C.build_corpus(config, index.out_dir, progress=False)
    assert again.info == index.info
    assert all(os.path.getmtime(f) == t for f, t in mtimes.items())
    other = build_config(C.CorpusConfig, {**TINY, "seed": 12})
    with pytest.raises(C.CorpusMismatchError, match="seed"):
        C.build_corpus(other, index.out_dir, progress=False)


def test_split_sizes_labels_and_negative_texts(tiny):
    config, index = tiny
    for split, (n_pos, n_neg) in config.split_sizes().items():
        data = index.arrays(split)
        assert data["audio"].shape == (n_pos + n_neg, config.clip_samples)
        assert int(data["label"].sum()) == n_pos
        neg = data["label"] == 0
        assert np.all(np.isnan(data["kw_start_s"][neg])) and np.all(np.isfinite(data["kw_start_s"][~neg]))
        for record in data["meta"]:
            if record["label"] == 0:
                assert config.keyword not in C._normalize_text(record["text"].replace("|", " "))
        assert np.all(np.isfinite(data["audio"])) and np.max(np.abs(data["audio"])) <= 1.0


def test_voices_disjoint_between_train_and_test_seen(tiny):
    config, index = tiny
    variants = {split: {S.voice_variant(c.meta["voice"]) for c in index.clips(split)} for split in C.CLIP_SPLITS}
    assert not (variants["train"] | variants["val"]) & variants["test_seen"]
    train_pool, test_pool = S.espeak_voice_split(config.test_variant_fraction, tuple(config.languages))
    assert {S.voice_variant(v) for v in test_pool} >= variants["test_seen"]
    engines = {c.meta["engine"] for c in index.clips("test_cross")}
    assert engines <= {"flite", "festival"} and engines


def test_positive_keyword_inside_clip_with_margins_and_phones(tiny):
    config, index = tiny
    for split in C.CLIP_SPLITS:
        for clip in index.clips(split):
            if clip.label == 0:
                continue
            assert clip.kw_start_s >= config.keyword_margin_s[0] - 1e-6
            assert clip.kw_end_s <= config.clip_seconds - config.keyword_margin_s[1] + 1e-6
            kw_phones = [p for p in clip.meta["phones"] if p[4] == 1]
            assert kw_phones, "positive clip without keyword phones"
            assert kw_phones[0][1] == pytest.approx(clip.kw_start_s, abs=1e-4)
            assert kw_phones[-1][2] == pytest.approx(clip.kw_end_s, abs=1e-4)
            assert all(clip.kw_start_s - 1e-4 <= p[1] <= p[2] <= clip.kw_end_s + 1e-4 for p in kw_phones)


@pytest.mark.parametrize("split", ["train", "test_cross"])
def test_unaugmented_keyword_region_is_speech(split):
    config = build_config(C.CorpusConfig, {**TINY, "augment": False, "n_pos": 3, "n_neg": 0, "val_fraction": 0.0,
                                           "n_cross_pos": 3, "n_cross_neg": 0})
    audio, meta = C.build_clip_shard(config, split, 0, 3)
    for clip, record in zip(audio, meta["records"]):
        if record["label"] == 0:
            continue
        start, end = int(round(record["kw_start_s"] * SR)), int(round(record["kw_end_s"] * SR))
        region = clip[start:end]
        frames = np.abs(region[: len(region) // 160 * 160]).reshape(-1, 160).max(axis=1)
        assert np.mean(frames > 0.02 * np.max(np.abs(clip))) > 0.7  # the keyword span is mostly voiced
        if record["engine"] != "espeak":  # segment concatenation: exact boundaries, silent gap before
            assert np.all(clip[max(0, start - 800) : start] == 0)
            assert np.max(np.abs(clip[start : start + 160])) >= 0.01 * np.max(np.abs(region)) - 1e-7
            assert np.all(clip[end : end + 800] == 0)


def test_streams_duration_and_events(tiny):
    config, index = tiny
    neg = list(index.streams("stream_neg"))
    total = sum(len(s.audio) for s in neg) / SR
    assert total == pytest.approx(config.stream_neg_minutes * 60, abs=1 / SR)
    assert all(seg["label"] == 0 for s in neg for seg in s.meta["segments"])
    pos = list(index.streams("stream_pos"))
    events = [e for s in pos for e in s.events]
    assert len(events) == config.n_stream_pos
    for stream in pos:
        duration = len(stream.audio) / SR
        positives = [seg for seg in stream.meta["segments"] if seg["label"] == 1]
        for event, seg in zip(stream.events, positives):
            assert 0 <= seg["start_s"] <= event["kw_start_s"] < event["kw_end_s"] <= seg["end_s"] <= duration
            inside = stream.audio[int(event["kw_start_s"] * SR) : int(event["kw_end_s"] * SR)]
            before = stream.audio[int((seg["start_s"] - 0.3) * SR) : int(seg["start_s"] * SR)]  # gap: noise only
            assert np.mean(inside.astype(np.float64) ** 2) > 1.5 * np.mean(before.astype(np.float64) ** 2)


def test_config_validation_and_presets():
    with pytest.raises(ConfigError, match="n_pos"):
        build_config(C.CorpusConfig, {"n_pos": -1})
    with pytest.raises(ConfigError, match="pitch_range"):
        build_config(C.CorpusConfig, {"pitch_range": (10, 120)})
    assert set(C.CORPUS_PRESETS) == {"smoke", "mini", "default"}
    default = C.CORPUS_PRESETS["default"]
    assert default.n_pos == 8000 and default.n_neg == 16000 and default.stream_neg_minutes == 300
    smoke = C.CORPUS_PRESETS["smoke"]
    n_smoke = sum(p + n for p, n in smoke.split_sizes().values())
    assert 150 <= n_smoke <= 250


def test_clip_labels_interleave_exactly():
    config = build_config(C.CorpusConfig, {**TINY, "n_pos": 7, "n_neg": 13, "val_fraction": 0.0})
    labels = [C.clip_label(config, "train", i) for i in range(20)]
    assert sum(labels) == 7
    assert all(abs(sum(labels[:k]) - k * 7 / 20) < 1 for k in range(21))


def test_index_json_written_last_and_consistent(tiny):
    config, index = tiny
    with open(os.path.join(index.out_dir, "index.json")) as handle:
        info = json.load(handle)
    assert info["keyword_phones"] == S.keyword_phones(config.keyword)
    assert info["splits"]["train"]["n_clips"] == sum(config.split_sizes()["train"])
    assert math.isclose(index.stream_hours("stream_neg"), config.stream_neg_minutes / 60, rel_tol=1e-3)


def test_confusables_never_sound_like_the_keyword():
    """Issue 19: 'hay computer' passed the written-text test but is the keyword to the ear (same espeak phones)."""
    vocabulary = ("hay", "hex", "fey", "commuter", "compute", "zebra")
    candidates = C.confusable_candidates("hey computer", vocabulary)
    assert "hay computer" in candidates  # the one-word swap the generator proposes
    kept = C.generate_confusables("hey computer", vocabulary)
    assert "hay computer" not in kept and "fey computer" in kept and "hey commuter" in kept
    target = C.phone_sequence("hey computer")
    assert target == tuple(S.keyword_phones("hey computer"))
    for phrase in kept:
        phones = C.phone_sequence(phrase)
        assert all(phones[i:i + len(target)] != target for i in range(len(phones)))
    assert C.sounds_like_keyword("well, hay computer, stop", "hey computer")
    assert not C.sounds_like_keyword("hey commuter", "hey computer")
    with pytest.raises(ConfigError, match="sound like the keyword"):
        C.confusables_for(build_config(C.CorpusConfig, {"confusables": ("hey you", "hay computer")}))


HOMOPHONE_TINY = dict(TINY, confusable_fraction=1.0, seed=5)
FAKE_CANDIDATES = ("hay computer", "hey commuter", "computer hey")


@pytest.mark.slow
def test_old_corpus_with_homophone_negatives_is_repaired_to_equal_a_fresh_build(tmp_path, monkeypatch):
    """A corpus built before the phone check is repaired on the next build: only the affected clips and stream
    chunks are re-synthesised, every other clip stays byte-identical, and the result equals a fresh build."""
    monkeypatch.setattr(C, "confusable_candidates", lambda keyword, vocabulary=None: FAKE_CANDIDATES)
    C.generate_confusables.cache_clear()
    config = build_config(C.CorpusConfig, HOMOPHONE_TINY)
    old_dir, fresh_dir = str(tmp_path / "old"), str(tmp_path / "fresh")
    with monkeypatch.context() as old_rules:  # the corpus as the written-text check built it
        old_rules.setattr(C, "sounds_like_keyword", lambda phrase, keyword: False)
        C.build_corpus(config, old_dir, progress=False, workers=1)
    C.generate_confusables.cache_clear()
    index_path = os.path.join(old_dir, "index.json")
    info = json.load(open(index_path))
    del info["homophone_check"]  # corpora of that time have no record of the check
    json.dump(info, open(index_path, "w"))
    stale = C.homophone_negatives(config, old_dir)
    clip_paths = [p for p, rows in stale.items() if rows]
    assert clip_paths and any("stream" in p for p in stale)  # the seed puts homophones in clips and streams
    before = {p: np.load(p)["audio"].copy() for p in clip_paths}
    repaired = C.build_corpus(config, old_dir, progress=False, workers=1)
    assert C.homophone_negatives(config, old_dir) == {}
    assert repaired.info["homophone_check"] == C.HOMOPHONE_CHECK
    fresh = C.build_corpus(config, fresh_dir, progress=False, workers=1)
    for split in C.CLIP_SPLITS + C.STREAM_SPLITS:
        for a, b in zip(repaired.files(split), fresh.files(split)):
            _npz_equal(a, b)
    for path, rows in stale.items():
        if not rows:
            continue
        first = int(json.loads(str(np.load(path)["meta"]))["records"][0]["index"])
        after = np.load(path)["audio"]
        untouched = [r for r in range(after.shape[0]) if r + first not in rows]
        np.testing.assert_array_equal(after[untouched], before[path][untouched])
        assert all(not np.array_equal(after[i - first], before[path][i - first]) for i in rows)
    C.generate_confusables.cache_clear()


def test_build_refuses_a_given_confusable_that_sounds_like_the_keyword(tmp_path):
    config = build_config(C.CorpusConfig, {**TINY, "confusables": ("hey you", "hay computer")})
    with pytest.raises(ConfigError, match="hay computer"):
        C.build_corpus(config, str(tmp_path / "c"), progress=False, workers=1)
    assert not os.path.exists(tmp_path / "c" / "config.json")
