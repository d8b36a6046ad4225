"""lopkit.kws.train: feature cache, baseline phone targets, equal budgets, resumable identical runs.

The fast tests use a tiny stand-in corpus written in lopkit.kws.corpus's on-disk format (tone bursts as the
"keyword", so no speech synthesis is needed); the end-to-end test on the real synthetic corpus is in
tests/test_kws_pipeline.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

SR = 16000


def _tone(freq: float, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t + rng.uniform(0, 6.28))).astype(np.float32)


def _clip(label: int, rng: np.random.Generator, clip_s: float = 1.0) -> tuple[np.ndarray, float, float, list]:
    """A stand-in clip: positives hold a 700 Hz + 1400 Hz burst pair (the keyword); negatives a single burst."""
    from lopkit.kws.synth import keyword_phones

    audio = (0.01 * rng.standard_normal(int(clip_s * SR))).astype(np.float32)
    if label:
        start = rng.uniform(0.1, 0.3)
        burst = np.concatenate([_tone(700, 0.15, rng), _tone(1400, 0.2, rng)])
        i = int(start * SR)
        audio[i:i + burst.size] += burst
        end = start + burst.size / SR
        phones = keyword_phones("hey computer")
        edges = np.linspace(start, end, len(phones) + 1)
        records = [[p, float(a), float(b), 0 if k < 2 else 1, 1] for k, (p, a, b) in enumerate(zip(phones, edges, edges[1:]))]
        return audio, start, end, records
    start = rng.uniform(0.1, 0.5)
    freq = rng.choice([300.0, 700.0, 2500.0])
    burst = _tone(freq, 0.2, rng)
    i = int(start * SR)
    audio[i:i + burst.size] += burst
    return audio, math.nan, math.nan, [["s", float(start), float(start + 0.2), 0, 0]]


def make_standin_corpus(path: Path, n_train: int = 64, n_other: int = 16, seed: int = 0) -> Path:
    """Write a finished stand-in corpus (clips + streams) in the corpus module's format; returns its folder."""
    from lopkit.configs import config_to_dict
    from lopkit.kws.corpus import CorpusConfig
    from lopkit.kws.synth import keyword_phones, phone_set

    rng = np.random.default_rng(seed)
    path = Path(path)
    (path / "clips").mkdir(parents=True, exist_ok=True)
    (path / "streams").mkdir(parents=True, exist_ok=True)
    config = CorpusConfig(clip_seconds=1.0, seed=seed)
    splits = {}
    for split, n in (("train", n_train), ("val", n_other), ("test_seen", n_other), ("test_cross", n_other)):
        audio, labels, starts, ends, records = [], [], [], [], []
        for i in range(n):
            label = i % 2
            a, s, e, phones = _clip(label, rng)
            audio.append(a)
            labels.append(label)
            starts.append(s)
            ends.append(e)
            voice = f"v{(i // 2) % 4}" if split == "train" else "flite:kal" if split == "test_cross" else "x"
            records.append({"index": i, "label": label, "voice": voice, "engine": voice.split(":")[0],
                            "kw_start_s": s, "kw_end_s": e, "phones": phones})
        rel = f"clips/{split}_0.npz"
        np.savez(path / rel, audio=np.stack(audio).astype(np.float16), label=np.array(labels),
                 kw_start_s=np.array(starts), kw_end_s=np.array(ends), meta=json.dumps({"records": records}))
        splits[split] = {"kind": "clips", "files": [rel], "n_clips": n, "n_pos": sum(labels), "seconds": n * 1.0}
    for name, n_events in (("stream_neg", 0), ("stream_pos", 3)):
        audio = (0.01 * rng.standard_normal(20 * SR)).astype(np.float32)
        events = []
        for k in range(6):
            a, s, e, _ = _clip(1 if k < n_events else 0, rng)
            offset = 3.0 * k
            audio[int(offset * SR):int(offset * SR) + a.size] += a
            if k < n_events:
                events.append({"kw_start_s": offset + s, "kw_end_s": offset + e, "voice": "x", "engine": "espeak"})
        rel = f"streams/{name}_0.npz"
        np.savez(path / rel, audio=audio.astype(np.float16),
                 meta=json.dumps({"segments": [], "events": events, "duration_s": 20.0}))
        splits[name] = {"kind": "streams", "files": [rel], "n_clips": 0, "n_pos": n_events, "seconds": 20.0}
    index = {"version": 1, "sample_rate": SR, "clip_samples": SR, "config": config_to_dict(config), "splits": splits,
             "bytes": 0, "last_build_seconds": 0.0, "phone_set": phone_set(), "keyword_phones": keyword_phones()}
    (path / "index.json").write_text(json.dumps(index))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_standin_corpus(tmp_path_factory.mktemp("kws_standin"))


def _config(corpus: Path, **overrides):
    from lopkit.kws.train import KWSTrainBenchmark

    base = {"corpus_dir": str(corpus), "max_steps": 4, "batch_size": 8, "log_every": 2, "val_max_clips": 8}
    return KWSTrainBenchmark.make_config("smoke", {**base, **overrides})


def test_config_errors_say_what_to_fix(corpus):
    from lopkit.configs import ConfigError
    from lopkit.kws.train import KWSTrainBenchmark

    with pytest.raises(ConfigError, match="corpus_dir"):
        KWSTrainBenchmark.make_config("smoke", {})
    with pytest.raises(ConfigError, match="model_kind"):
        KWSTrainBenchmark.make_config("smoke", {"corpus_dir": "x", "model_kind": "lstm"})
    with pytest.raises(FileNotFoundError, match="lopkit kws build"):
        KWSTrainBenchmark(KWSTrainBenchmark.make_config("smoke", {"corpus_dir": str(corpus / "missing")}), 0)


def test_feature_cache_matches_log_mel_and_is_reused(corpus):
    from lopkit.kws.corpus import load_corpus
    from lopkit.kws.features import log_mel
    from lopkit.kws.train import load_split_features

    data = load_split_features(str(corpus), "val")
    audio = torch.from_numpy(load_corpus(str(corpus)).arrays("val")["audio"])
    expected = log_mel(audio)
    torch.testing.assert_close(data.feats.float(), expected.half().float())
    cache = corpus / "features" / "val.pt"
    stamp = cache.stat().st_mtime_ns
    again = load_split_features(str(corpus), "val")
    assert cache.stat().st_mtime_ns == stamp
    assert torch.equal(again.feats, data.feats)
    assert torch.equal(data.label, torch.tensor([i % 2 for i in range(16)]))


def test_phone_targets_follow_the_phone_timings(corpus):
    from lopkit.kws.synth import keyword_phones
    from lopkit.kws.train import keyword_class_ids, load_split_features, phone_targets_for_split

    data = load_split_features(str(corpus), "train")
    targets = phone_targets_for_split(data, "hey computer")
    classes, keyword_ids = keyword_class_ids("hey computer")
    assert [classes[i] for i in keyword_ids] == keyword_phones("hey computer")
    for i in (0, 1):  # a negative (filler phone) and a positive (keyword phones)
        expected = torch.zeros(data.n_frames, dtype=torch.long)
        last = 0
        for phone, a, b, _w, inside in data.phones[i]:
            lo, hi = max(round(100 * a), last), round(100 * b)
            if hi > lo:
                expected[lo:min(hi, data.n_frames)] = classes.index(phone) if inside else 1
                last = hi
        assert torch.equal(targets[i], expected)


def test_baseline_has_the_cnn_parameter_count(corpus):
    from lopkit.kws.train import KWSTrainBenchmark

    cnn = KWSTrainBenchmark(_config(corpus, model_kind="heimdal"), 0)
    hmm = KWSTrainBenchmark(_config(corpus, model_kind="dnn_hmm"), 0)
    n_cnn = sum(p.numel() for p in cnn.model.parameters())
    n_hmm = sum(p.numel() for p in hmm.model.parameters())
    assert abs(n_cnn - n_hmm) / n_cnn <= 0.03
    assert hmm.meta["n_classes"] == len(hmm.meta["classes"])


@pytest.mark.parametrize("kind", ["heimdal", "dnn_hmm"])
def test_resumed_run_gives_identical_rows_and_weights(corpus, tmp_path, kind):
    from lopkit.kws.train import KWSTrainBenchmark
    from lopkit.runner.execute import execute_run
    from lopkit.runner.store import ResultStore

    config = _config(corpus, model_kind=kind, augment=True)
    with ResultStore(tmp_path / "a") as store:
        whole = execute_run(store, KWSTrainBenchmark, config, 3, progress="never", keep_checkpoint=True)
        rows_a = store.metrics()
        state_a = store.load_checkpoint(whole.run_id)[1]
    with ResultStore(tmp_path / "b") as store:
        first = execute_run(store, KWSTrainBenchmark, config, 3, progress="never", stop_after_steps=2,
                            keep_checkpoint=True)
        assert first.status == "paused"
        second = execute_run(store, KWSTrainBenchmark, config, 3, progress="never", keep_checkpoint=True)
        assert second.resumed_from == 2
        rows_b = store.metrics()
        state_b = store.load_checkpoint(second.run_id)[1]
    cols = ["step", "metric", "value"]
    assert rows_a[cols].reset_index(drop=True).equals(rows_b[cols].reset_index(drop=True))
    assert {"online_loss", "val_loss"} <= set(rows_a["metric"])
    for key, value in state_a["model"].items():
        assert torch.equal(value, state_b["model"][key]), key


def test_training_learns_the_standin_keyword(corpus):
    from lopkit.kws.train import KWSTrainBenchmark

    bench = KWSTrainBenchmark(_config(corpus, max_steps=30, lr=1e-2, log_every=10, augment=False), 0)
    rows = bench.run(30)
    losses = [r["value"] for r in rows if r["metric"] == "online_loss"]
    assert losses[-1] < losses[0]
    assert bench.done


def test_learning_rate_follows_the_warmup_cosine_schedule_across_a_resume(corpus):
    """The torch scheduler sets, at every optimiser step, the rate the hand-written loop set (a resume included)."""
    import math

    from lopkit.kws.train import KWSTrainBenchmark

    config = _config(corpus, max_steps=8, warmup_fraction=0.3, augment=False)
    warmup = max(1, round(0.3 * 8))

    def reference(step: int) -> float:
        if step < warmup:
            return config.lr * ((step + 1) / warmup)
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, 8 - warmup))))

    first = KWSTrainBenchmark(config, 0)
    seen: list[float] = []
    first.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    first.run(3)
    second = KWSTrainBenchmark(config, 0)
    second.load_state_dict(first.state_dict())
    second.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    second.run(5)
    assert seen == [reference(step) for step in range(8)]


def _validate_reference(bench) -> dict[str, float]:
    """The validation as it was computed before issue 19's speed-up: the loss forward, then a second forward."""
    from lopkit.kws.metrics import clip_auc

    config, data = bench.config, bench.val_data
    n = min(len(data), config.val_max_clips)
    bench.model.eval()
    losses, correct, total, clip_scores = [], 0, 0, []
    with torch.no_grad():
        for begin in range(0, n, 256):
            index = torch.arange(begin, min(n, begin + 256))
            feats = data.feats[index].float()
            loss, _, _ = bench._loss(feats, index, train=False)
            losses.append(float(loss) * index.numel())
            output = bench.model(feats)
            if bench.is_hmm:
                targets = bench.val_targets[index]
                keep = targets >= 0
                correct += int((output.argmax(1)[keep] == targets[keep]).sum())
                total += int(keep.sum())
            else:
                score = torch.sigmoid(output["detect"]).max(dim=1).values
                clip_scores.append(score)
                correct += int(((score > 0.5).long() == data.label[index]).sum())
                total += index.numel()
    bench.model.train()
    metric = "val_frame_accuracy" if bench.is_hmm else "val_clip_accuracy"
    out = {"val_loss": sum(losses) / n, metric: correct / max(1, total)}
    if clip_scores:
        scores, labels = torch.cat(clip_scores), data.label[:n].bool()
        out["val_clip_auc"] = clip_auc(scores[labels], scores[~labels])
    return out


@pytest.mark.parametrize("kind", ["heimdal", "dnn_hmm"])
def test_validation_with_one_forward_equals_the_two_forward_reference(corpus, kind):
    """The epoch-end validation (one forward per batch, inference mode) gives exactly the old two-forward figures
    and leaves the weights and the next training steps unchanged."""
    from lopkit.kws.train import KWSTrainBenchmark

    config = _config(corpus, model_kind=kind, max_steps=6, val_max_clips=300, augment=True)
    bench = KWSTrainBenchmark(config, 1)
    other = KWSTrainBenchmark(config, 1)
    bench.run(3)
    other.run(3)
    expected = _validate_reference(other)
    rows = {row["metric"]: row["value"] for row in bench._validate()}
    assert rows == expected
    bench.run(3)
    other.run(3)
    for key, value in bench.model.state_dict().items():
        assert torch.equal(value, other.model.state_dict()[key]), key


_TRAIN_WITH_HEAP_REUSE = """
import sys, torch
from lopkit.kws.train import KWSTrainBenchmark, keep_freed_memory_for_reuse
torch.set_num_threads(1)
if not keep_freed_memory_for_reuse():
    sys.exit(3)  # this libc refused the setting: nothing to compare
config = KWSTrainBenchmark.make_config("smoke", {"corpus_dir": sys.argv[1], "model_kind": sys.argv[2], "max_steps": 3,
                                                 "batch_size": 8, "log_every": 2, "val_max_clips": 8, "augment": True})
bench = KWSTrainBenchmark(config, 5)
bench.run(3)
torch.save(bench.model.state_dict(), sys.argv[3])
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_heap_reuse_leaves_the_trained_weights_unchanged(corpus, tmp_path):
    """A run after keep_freed_memory_for_reuse (another process) ends with exactly the weights of one without it."""
    import os
    import subprocess
    import sys

    from lopkit.kws.train import KWSTrainBenchmark

    torch.set_num_threads(1)
    out = tmp_path / "state.pt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run([sys.executable, "-c", _TRAIN_WITH_HEAP_REUSE, str(corpus), "heimdal", str(out)], env=env)
    if done.returncode == 3:
        pytest.skip("this libc's mallopt refuses the heap-reuse setting")
    assert done.returncode == 0
    config = KWSTrainBenchmark.make_config("smoke", {"corpus_dir": str(corpus), "model_kind": "heimdal", "max_steps": 3,
                                                     "batch_size": 8, "log_every": 2, "val_max_clips": 8,
                                                     "augment": True})
    bench = KWSTrainBenchmark(config, 5)
    bench.run(3)
    reused = torch.load(out)
    for key, value in bench.model.state_dict().items():
        assert torch.equal(value, reused[key]), key


def test_training_pool_repeats_only_the_confusables():
    from lopkit.kws.train import training_pool

    kinds = ["positive", "confusable", "sentence", "confusable"]
    assert training_pool(kinds, 1).tolist() == [0, 1, 2, 3]
    assert training_pool(kinds, 3).tolist() == [0, 1, 1, 1, 2, 3, 3, 3]


def _with_kinds(corpus: Path, tmp_path: Path) -> Path:
    """A copy of the stand-in corpus whose train negatives alternate between confusable and sentence kinds."""
    import shutil

    copy = tmp_path / "kinds"
    shutil.copytree(corpus, copy, ignore=shutil.ignore_patterns("features"))
    rel = json.loads((copy / "index.json").read_text())["splits"]["train"]["files"][0]
    with np.load(copy / rel) as data:
        arrays = {key: data[key] for key in data.files}
    meta = json.loads(str(arrays["meta"]))
    negatives = 0
    for record in meta["records"]:
        if record["label"] == 1:
            record["kind"] = "positive"
        else:
            record["kind"] = "confusable" if negatives % 2 == 0 else "sentence"
            negatives += 1
    arrays["meta"] = json.dumps(meta)
    np.savez(copy / rel, **arrays)
    return copy


def test_confusable_repeats_oversample_confusables_at_the_same_step_budget(corpus, tmp_path):
    from lopkit.configs import ConfigError
    from lopkit.kws.train import KWSTrainBenchmark, clip_kinds

    from lopkit.configs import run_identity
    from lopkit.seeding import seeded_generator

    kinds_corpus = _with_kinds(corpus, tmp_path)
    base = KWSTrainBenchmark(_config(kinds_corpus, epochs=2.0, max_steps=0), 0)
    over = KWSTrainBenchmark(_config(kinds_corpus, epochs=2.0, max_steps=0, confusable_repeats=3), 0)
    assert over.total_steps == base.total_steps  # same compute: the budget counts passes over the original clips
    kinds = clip_kinds(str(kinds_corpus), "train", len(base.train_data))
    n_confusable = kinds.count("confusable")
    assert 0 < n_confusable < len(kinds)

    def confusable_share(bench) -> float:
        drawn = torch.cat([bench._batch_indices(s) for s in range(bench._batches_per_epoch)]).tolist()
        return sum(kinds[i] == "confusable" for i in drawn) / len(drawn)

    expected_base = n_confusable / len(kinds)
    expected_over = 3 * n_confusable / (len(kinds) + 2 * n_confusable)
    assert abs(confusable_share(base) - expected_base) < 0.1
    assert abs(confusable_share(over) - expected_over) < 0.1 and expected_over > expected_base + 0.15
    # without oversampling the batches are the seeded permutation drawn before the field existed
    order = torch.randperm(len(kinds), generator=seeded_generator(0, 11, 0))
    assert torch.equal(base._batch_indices(0), order[:8])
    # the default leaves the run id as it was; a non-default value is part of it
    assert "confusable_repeats" not in run_identity(base.config)
    assert run_identity(over.config)["confusable_repeats"] == 3
    with pytest.raises(ConfigError, match="confusable_repeats"):
        _config(kinds_corpus, confusable_repeats=0)
    with pytest.raises(ValueError, match="feature cache"):
        clip_kinds(str(kinds_corpus), "train", len(kinds) + 1)
