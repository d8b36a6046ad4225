"""lopkit.kws pipeline, continual benchmark, CLI and report.

Fast tests run on the stand-in corpus of tests/test_kws_train.py (tone bursts, no synthesis); the end-to-end smoke
pipeline on the real synthetic corpus (espeak-ng, flite, festival) is marked slow.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from test_kws_train import make_standin_corpus


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    """A pipeline folder whose corpus is the stand-in; features, two models, evaluation and report run on it."""
    from lopkit.kws.pipeline import pipeline_config, run_pipeline

    out = tmp_path_factory.mktemp("kws_pipeline")
    make_standin_corpus(out / "corpus")
    config = pipeline_config("smoke", {"models": ("heimdal", "dnn_hmm"), "rtf_seconds": 1.0, "target_fa_per_hour": 200.0})
    config.train_overrides = {"max_steps": 4, "val_max_clips": 8}
    run_pipeline(config, out, stages=("features", "train", "evaluate", "report"), progress=False)
    return out


def _parser() -> argparse.ArgumentParser:
    from lopkit.kws.cli import register

    parser = argparse.ArgumentParser(prog="lopkit")
    register(parser.add_subparsers(dest="command"))
    return parser


def _cli(*argv: str) -> int:
    args = _parser().parse_args(list(argv))
    return int(args.func(args))


def test_evaluation_matches_an_independent_recount(pipeline_dir):
    from lopkit.kws.corpus import load_corpus
    from lopkit.kws.features import log_mel
    from lopkit.kws.metrics import count_triggers
    from lopkit.kws.stream import causal_moving_average
    from lopkit.kws.train import model_from_state
    from lopkit.runner.store import ResultStore

    summary = json.loads((pipeline_dir / "eval" / "summary.json").read_text())
    cnn = summary["models"]["heimdal"]
    assert abs(cnn["params"] - summary["models"]["dnn_hmm"]["params"]) / cnn["params"] <= 0.03
    op = cnn["splits"]["test_seen"]
    starts = pd.read_csv(pipeline_dir / "eval" / "heimdal__test_seen_starts.csv")
    # FRR: positives whose max smoothed score in the window does not exceed the threshold
    assert op["frr"] == pytest.approx(float(np.mean(~(starts["max_score"] > op["threshold"]))))
    assert op["n_pos"] == 8
    # FA/h: recount triggers of the exported model on the negative stream, computed offline here
    run_id = json.loads((pipeline_dir / "pipeline.json").read_text())["train"]["heimdal"]["run_id"]
    with ResultStore(pipeline_dir) as store:
        model, _ = model_from_state(store.load_checkpoint(run_id)[1])
    chunk = next(iter(load_corpus(str(pipeline_dir / "corpus")).streams("stream_neg")))
    with torch.no_grad():
        raw = torch.sigmoid(model(log_mel(torch.from_numpy(chunk.audio))[None])["detect"][0]).double().numpy()
    smoothed = causal_moving_average(raw, 3)
    if math.isfinite(op["threshold"]):
        hours = chunk.audio.size / 16000 / 3600
        assert op["fa_per_hour"] == pytest.approx(count_triggers(smoothed, op["threshold"], 100) / hours)
    det = pd.read_csv(pipeline_dir / "eval" / "heimdal__test_seen_det.csv")
    assert np.all(np.diff(det["frr"].to_numpy()) >= 0)
    assert np.all(np.diff(det["fa_per_hour"].to_numpy()) <= 0)
    html = (pipeline_dir / "report" / "index.html").read_text()
    assert "Targets" in html and "data:image/png;base64" in html


def test_pipeline_skips_finished_stages(pipeline_dir):
    from lopkit.kws.pipeline import pipeline_config, run_pipeline

    stamp = (pipeline_dir / "eval" / "heimdal.json").stat().st_mtime_ns
    config = pipeline_config("smoke", {"models": ("heimdal", "dnn_hmm"), "rtf_seconds": 1.0, "target_fa_per_hour": 200.0})
    config.train_overrides = {"max_steps": 4, "val_max_clips": 8}
    tick = time.monotonic()
    state = run_pipeline(config, pipeline_dir, stages=("train", "evaluate"), progress=False)
    assert time.monotonic() - tick < 10
    assert (pipeline_dir / "eval" / "heimdal.json").stat().st_mtime_ns == stamp
    assert set(state["train"]) == {"heimdal", "dnn_hmm"}


def test_listen_cli_on_the_exported_models(pipeline_dir, tmp_path, capsys):
    from scipy.io import wavfile

    from lopkit.kws.corpus import load_corpus

    chunk = next(iter(load_corpus(str(pipeline_dir / "corpus")).streams("stream_pos")))
    wav = tmp_path / "stream.wav"
    wavfile.write(wav, 16000, np.round(np.clip(chunk.audio[: 16000 * 8], -1, 1) * 32767).astype(np.int16))
    # thresholds below every score: a probability just above 0 for the CNN, a very negative log-likelihood ratio
    # for the DNN-HMM (each inside its model's valid range)
    for kind, threshold in (("heimdal", "1e-9"), ("dnn_hmm", "-1e9")):
        assert _cli("kws", "listen", str(wav), "--model", str(pipeline_dir / "models" / f"{kind}.pt"),
                    f"--threshold={threshold}") == 0
        out = capsys.readouterr().out
        lines = [line for line in out.splitlines() if line.startswith("wake word at")]
        # a threshold below every score fires at the first frame, then once per refractory second
        assert len(lines) == 8
        assert "real-time factor" in out
    assert _cli("kws", "listen", str(wav), "--model", str(tmp_path / "none.pt")) == 2


def test_listen_rejects_a_threshold_outside_the_score_range(pipeline_dir, tmp_path, capsys):
    from scipy.io import wavfile

    wav = tmp_path / "quiet.wav"
    wavfile.write(wav, 16000, np.zeros(16000, dtype=np.int16))
    cases = [("heimdal", "1.5", "(0, 1)"), ("heimdal", "0", "(0, 1)"), ("heimdal", "-1e9", "(0, 1)"),
             ("heimdal", "nan", "(0, 1)"), ("dnn_hmm", "nan", "finite"), ("dnn_hmm", "inf", "finite")]
    for kind, threshold, expected in cases:
        code = _cli("kws", "listen", str(wav), "--model", str(pipeline_dir / "models" / f"{kind}.pt"),
                    f"--threshold={threshold}")
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2, (kind, threshold)
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], (kind, threshold, lines)
        assert "wake word at" not in captured.out and "Traceback" not in captured.err
    for kind, threshold in (("heimdal", "0.5"), ("dnn_hmm", "-3.5")):
        assert _cli("kws", "listen", str(wav), "--model", str(pipeline_dir / "models" / f"{kind}.pt"),
                    f"--threshold={threshold}") == 0
        assert capsys.readouterr().err == ""


class _EarlyStartScorer:
    """A frame scorer that scores every frame 0.9 and puts the keyword start 80 frames (0.8 s) before the frame."""

    def reset(self) -> None:
        self.frame = 0

    def push(self, frames):
        n = frames.shape[-1]
        t = np.arange(self.frame, self.frame + n, dtype=np.float64)
        self.frame += n
        return np.full(n, 0.9), t - 80


def test_listen_never_prints_a_start_before_zero(tmp_path, capsys, monkeypatch):
    from scipy.io import wavfile

    import lopkit.kws.pipeline as pipeline
    from lopkit.kws.stream import StreamingDetector, listen

    def detector():
        scorer = _EarlyStartScorer()
        scorer.reset()
        return StreamingDetector(scorer, 0.5, smooth_frames=1, refractory_s=0.5)

    wav = tmp_path / "speech.wav"
    wavfile.write(wav, 16000, np.zeros(32000, dtype=np.int16))
    raw = [d.start_s for d in listen(wav, detector()).detections]
    assert min(raw) < 0 and max(raw) > 0  # the raw estimates cross the stream start
    monkeypatch.setattr(pipeline, "load_detector", lambda path, threshold=None: detector())
    assert _cli("kws", "listen", str(wav), "--model", str(tmp_path / "fake.pt")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wake word at")]
    assert len(lines) == len(raw)
    for line, start in zip(lines, raw):
        printed = float(line.split("start")[1].split()[0])
        assert printed >= 0
        assert printed == pytest.approx(max(0.0, start), abs=1e-3)
        assert ("clamped to 0" in line) == (start < 0)


def test_kws_progress_bars_only_on_a_terminal_and_named_after_the_model(tmp_path, capsys, monkeypatch):
    import io
    import sys

    from lopkit.kws.pipeline import pipeline_config, run_pipeline
    from lopkit.kws.train import KWSTrainBenchmark
    from lopkit.runner.execute import execute_run
    from lopkit.runner.store import ResultStore

    monkeypatch.delenv("LOPKIT_PROGRESS", raising=False)
    out = tmp_path / "pipe"
    make_standin_corpus(out / "corpus", n_train=16, n_other=8)
    config = pipeline_config("smoke", {"models": ("dnn_hmm",)})
    config.train_overrides = {"max_steps": 2, "val_max_clips": 4}
    run_pipeline(config, out, stages=("features", "train"), progress=True)
    err = capsys.readouterr().err
    assert "[kws] train dnn_hmm" in err  # the stage log is printed ...
    assert "%|" not in err and "step/s" not in err  # ... but no bar: stderr is not a terminal here

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    train = KWSTrainBenchmark.make_config("smoke", {"corpus_dir": str(out / "corpus"), "model_kind": "dnn_hmm",
                                                    "max_steps": 2, "val_max_clips": 4})
    with ResultStore(tmp_path / "store") as store:
        execute_run(store, KWSTrainBenchmark, train, 1, progress=True)
    assert "train dnn_hmm seed=1" in terminal.getvalue() and "%|" in terminal.getvalue()


def test_cli_rejects_bad_input(tmp_path, capsys):
    assert _cli("kws", "run", "--preset", "huge", "--out", str(tmp_path / "x")) == 2
    assert "unknown pipeline preset" in capsys.readouterr().err
    assert _cli("kws", "report", str(tmp_path)) == 2
    assert _cli("kws", "train", "--corpus", str(tmp_path / "missing"), "--out", str(tmp_path / "e")) == 2
    assert _cli("kws", "build", "--preset", "smoke", "--set", "n_pos=-3", "--out", str(tmp_path / "c")) == 2
    args = _parser().parse_args(["kws", "run", "--preset", "mini", "--out", "d", "--stages", "train,evaluate"])
    assert args.stages == "train,evaluate" and callable(args.func)
    from lopkit.kws.cli import _pipeline_overrides
    from lopkit.kws.pipeline import pipeline_config

    config = pipeline_config("mini", _pipeline_overrides(["train_overrides.epochs=4", "smooth_frames=5"]))
    assert config.train_overrides == {"epochs": "4"} and config.smooth_frames == 5


def test_continual_benchmark_rows_monitor_and_resume(tmp_path):
    from lopkit.kws.continual import KWSContinualBenchmark
    from lopkit.runner.execute import execute_run
    from lopkit.runner.store import ResultStore

    corpus = make_standin_corpus(tmp_path / "corpus", n_train=48, n_other=8)
    config = KWSContinualBenchmark.make_config("smoke", {"corpus_dir": str(corpus), "n_tasks": 2, "steps_per_task": 4})
    with ResultStore(tmp_path / "a") as store:
        execute_run(store, KWSContinualBenchmark, config, 0, "shrink_perturb", progress="never")
        rows_a = store.metrics()
    with ResultStore(tmp_path / "b") as store:
        execute_run(store, KWSContinualBenchmark, config, 0, "shrink_perturb", progress="never", stop_after_steps=5)
        execute_run(store, KWSContinualBenchmark, config, 0, "shrink_perturb", progress="never")
        rows_b = store.metrics()
    cols = ["step", "task", "layer", "metric", "value"]
    pd.testing.assert_frame_equal(rows_a[cols].reset_index(drop=True), rows_b[cols].reset_index(drop=True))
    per_task = rows_a[rows_a["metric"] == "task_test_accuracy"]
    assert per_task["task"].tolist() == [0, 1]
    monitored = rows_a[rows_a["metric"] == "effective_rank"]
    assert set(monitored["task"]) == {0, 1} and monitored["layer"].nunique() > 3
    assert {"online_loss", "task_final_loss", "task_test_frr", "task_test_auc", "weight_norm"} <= set(rows_a["metric"])


def test_clip_auc_against_pair_counting():
    from lopkit.kws.continual import clip_auc

    pos, neg = torch.tensor([0.9, 0.4, 0.6]), torch.tensor([0.5, 0.4, 0.1, 0.7])
    pairs = [(p > n) + 0.5 * (p == n) for p in pos.tolist() for n in neg.tolist()]
    assert clip_auc(pos, neg) == pytest.approx(sum(pairs) / len(pairs))
    assert math.isnan(clip_auc(pos, neg[:0]))


def test_voice_groups_are_disjoint_and_cover_all():
    from lopkit.configs import ConfigError
    from lopkit.kws.continual import voice_groups

    voices = [f"v{i % 7}" for i in range(40)]
    groups = voice_groups(voices, 3, seed=4)
    flat = [v for g in groups for v in g]
    assert sorted(flat) == sorted(set(voices)) and len(flat) == len(set(flat))
    with pytest.raises(ConfigError):
        voice_groups(voices, 8, seed=0)


def test_targets_table_pass_and_miss(tmp_path):
    from lopkit.kws.report import det_below_fraction, targets_table

    eval_dir = tmp_path
    low = pd.DataFrame({"threshold": [0.1, 0.5, 0.9], "frr": [0.0, 0.1, 1.0], "fa_per_hour": [10.0, 1.0, 0.0]})
    high = pd.DataFrame({"threshold": [0.1, 0.5, 0.9], "frr": [0.1, 0.4, 1.0], "fa_per_hour": [10.0, 1.0, 0.0]})
    low.to_csv(eval_dir / "heimdal__test_seen_det.csv", index=False)
    high.to_csv(eval_dir / "dnn_hmm__test_seen_det.csv", index=False)
    assert det_below_fraction(low, high) == 1.0
    assert det_below_fraction(high, low) == 0.0
    summary = {"target_fa_per_hour": 1.0, "models": {
        "heimdal": {"params": 100, "splits": {"test_seen": {"frr": 0.1, "start": {"median_abs_ms": 30.0}}}},
        "dnn_hmm": {"params": 102, "splits": {"test_seen": {"frr": 0.4, "start": {"median_abs_ms": 5.0}}}}}}
    table = targets_table(summary, {"preset": "smoke", "total_seconds": 42.0}, eval_dir).set_index("target")
    status = table["status"].to_dict()
    assert status["equal parameter count (within 3 %)"] == "PASS"
    assert status["CNN DET below DNN-HMM (test_seen)"] == "PASS"
    assert status["relative FRR reduction at 1 FA/h (test_seen); paper 73 %"] == "PASS"  # (0.4-0.1)/0.4 = 75 %
    assert status["median start error within 20 ms of DNN-HMM (test_seen)"] == "MISS"  # 30 > 5 + 20
    assert status["smoke pipeline under 60 s"] == "PASS"


def test_smoke_pipeline_end_to_end_on_synthetic_speech(tmp_path):
    """The whole smoke pipeline (real espeak-ng/flite/festival corpus, 1 thread); a rerun redoes no finished work."""
    from lopkit.kws.pipeline import pipeline_config, run_pipeline
    from lopkit.runner.store import ResultStore

    torch.set_num_threads(1)
    run_pipeline(pipeline_config("smoke"), tmp_path, progress=False)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert set(summary["models"]) == {"heimdal", "dnn_hmm", "heimdal_no_offset", "heimdal_utterance"}
    assert {"test_seen", "test_cross"} <= set(summary["models"]["heimdal"]["splits"])
    assert (tmp_path / "report" / "index.html").exists()

    def snapshot():
        with ResultStore(tmp_path) as store:
            runs = store.runs()[["run_id", "status", "step", "updated_at"]].sort_values("run_id")
            n_rows = len(store.metrics())
        files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".npz", ".pt")}
        return runs.to_dict("records"), n_rows, files

    before = snapshot()
    assert before[1] > 0 and all(r["status"] == "finished" for r in before[0])
    run_pipeline(pipeline_config("smoke"), tmp_path, progress=False, stages=("corpus", "features", "train", "evaluate"))
    assert snapshot() == before  # every stage was found done: no run touched, no row added, no file rewritten


def test_evaluation_lists_the_top_negative_events_and_names_untrained_models(pipeline_dir, capsys):
    from lopkit.kws.corpus import load_corpus

    top = pd.read_csv(pipeline_dir / "eval" / "heimdal__stream_neg_top.csv")
    assert len(top) > 0 and top["score"].is_monotonic_decreasing
    assert np.allclose(top["logit"], np.log(top["score"] / (1 - top["score"])))
    segments = [s for c in load_corpus(str(pipeline_dir / "corpus")).streams("stream_neg") for s in c.meta["segments"]]
    texts = {s["text"] for s in segments}
    assert set(top.loc[top["kind"] != "noise", "text"]) <= texts
    code = _cli("kws", "evaluate", "--preset", "smoke", "--out", str(pipeline_dir), "--no-progress",
                "--set", "models=heimdal,heimdal_utterance")
    err = capsys.readouterr().err
    assert code != 0 and "error: models ['heimdal_utterance'] were not trained" in err and "Traceback" not in err
