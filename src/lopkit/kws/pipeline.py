"""The HEiMDaL reproduction pipeline: corpus -> features -> train (4 models) -> evaluate -> continual -> report.

Everything lives in one output folder::

    corpus/                      the synthetic corpus (lopkit.kws.corpus; resumable shard by shard)
    corpus/features/<split>.pt   cached log-mel features
    results.sqlite               training and continual runs (lopkit runner store; resumable, checkpoints kept)
    models/<kind>.pt             exported trained models with their operating threshold (for 'lopkit kws listen')
    eval/<kind>.json             per-model evaluation; eval/summary.json all of them
    eval/<kind>__<split>_det.csv DET points; eval/<kind>__<split>_starts.csv per-positive start estimates
    eval/<kind>__stream_neg_top.csv the 50 highest-scoring negative-stream events with the utterance each falls in
    continual_corpora/<kw>/      small corpora of the new wake words (task_kind=keywords)
    report/index.html            the report (lopkit.kws.report)
    pipeline.json                stage status and timings

Each stage is skipped when its outputs exist and match (a killed pipeline resumes where it stopped: the corpus
per shard, training runs from their last checkpoint). Presets: ``smoke`` (CI, well under a minute), ``mini``
(about 20-25 minutes on 2 cores), ``default`` (spec 2.6 sizes, within about 3 hours on 2 cores).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from lopkit.configs import ConfigError, build_config, config_to_dict, require
from lopkit.kws import metrics as M
from lopkit.kws.stream import (
    FRAMES_PER_SECOND,
    CNNScorer,
    HMMScorer,
    StreamingDetector,
    causal_moving_average,
    check_threshold,
    compute_features,
    score_features,
)

__all__ = [
    "PIPELINE_PRESETS",
    "STAGES",
    "PipelineConfig",
    "evaluate_model",
    "export_model",
    "load_detector",
    "pipeline_config",
    "run_pipeline",
]

STAGES = ("corpus", "features", "train", "evaluate", "continual", "report")
EVAL_SPLITS = ("test_seen", "test_cross", "stream_pos")
MODEL_ORDER = ("heimdal", "dnn_hmm", "heimdal_no_offset", "heimdal_utterance")
#: Measured speed-up of a tau=2, batch-64 training step from 1 to 2 torch threads on an idle 2-core machine
#: (1.05 s -> 0.60 s per step).
TWO_THREAD_SPEEDUP = 1.75
EVAL_VERSION = 3  # bump when the evaluation's outputs change, so cached evaluations are redone


@dataclasses.dataclass
class PipelineConfig:
    """What the pipeline runs: corpus, training and continual presets with overrides, and evaluation settings."""

    preset: str = "smoke"
    corpus_preset: str = "smoke"
    corpus_overrides: dict = dataclasses.field(default_factory=dict)
    train_preset: str = "smoke"
    train_overrides: dict = dataclasses.field(default_factory=dict)
    models: tuple[str, ...] = MODEL_ORDER
    seed: int = 0
    workers: int = 2
    """Processes for corpus synthesis."""
    target_fa_per_hour: float = 1.0
    """Operating point: the lowest threshold with FA/h on the negative stream <= this."""
    extra_fa_levels: tuple[float, ...] = (0.5, 6.0)
    """Further FA/h levels at which FRR is reported (with bootstrap intervals, as for the target)."""
    bootstrap_samples: int = 1000
    """Bootstrap replicates for the FRR intervals (positives and 60 s negative-stream blocks resampled)."""
    smooth_frames: int = 3
    refractory_s: float = 1.0
    accept_after_s: float = 1.0
    """A positive counts as detected if the score crosses between its keyword start and this long after its end."""
    hmm_states_per_phone: int = 2
    hmm_prior_scale: float = 0.0
    hmm_normalize: str = "none"
    rtf_seconds: float = 60.0
    """Audio (s of the negative stream) streamed chunk by chunk to measure the real-time factor."""
    continual_preset: str = "smoke"
    continual_kind: str = "voices"
    continual_keywords: tuple[str, ...] = ()
    continual_corpus_overrides: dict = dataclasses.field(default_factory=dict)
    continual_methods: tuple[str, ...] = ("sgd",)
    continual_overrides: dict = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        """Reject impossible settings."""
        from lopkit.kws.train import MODEL_KINDS

        unknown = [m for m in self.models if m not in MODEL_KINDS]
        require(not unknown, f"unknown models {unknown}; choose from {', '.join(MODEL_KINDS)}")
        require(self.target_fa_per_hour > 0, f"target_fa_per_hour must be > 0, got {self.target_fa_per_hour}")
        require(self.smooth_frames >= 1, "smooth_frames must be >= 1")
        require(self.refractory_s > 0, "refractory_s must be > 0")
        require(self.bootstrap_samples >= 1, f"bootstrap_samples must be >= 1, got {self.bootstrap_samples}")
        require(all(f > 0 for f in self.extra_fa_levels), f"extra_fa_levels must be > 0, got {self.extra_fa_levels}")
        require(self.continual_kind in ("voices", "keywords"), "continual_kind must be voices or keywords")
        require(self.continual_kind != "keywords" or len(self.continual_keywords) >= 1,
                "continual_kind=keywords needs continual_keywords")


_CONTINUAL_KEYWORD_CORPUS = dict(n_test_pos=0, n_test_neg=0, n_cross_pos=0, n_cross_neg=0, stream_neg_minutes=0.0,
                                 n_stream_pos=0, val_fraction=0.2)
PIPELINE_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(corpus_preset="smoke", train_preset="smoke", continual_preset="smoke", continual_kind="voices",
                  corpus_overrides=dict(n_pos=64, n_neg=64, val_fraction=0.25, n_test_pos=8, n_test_neg=8,
                                        n_cross_pos=8, n_cross_neg=8, stream_neg_minutes=0.5, n_stream_pos=4,
                                        stream_chunk_minutes=0.5),
                  target_fa_per_hour=120.0, workers=1, rtf_seconds=2.0, hmm_states_per_phone=1),
    "mini": dict(corpus_preset="mini", train_preset="mini", continual_preset="mini", continual_kind="keywords",
                 continual_keywords=("okay toaster", "hello robot", "hey marvin", "wake up lamp"),
                 continual_corpus_overrides=dict(_CONTINUAL_KEYWORD_CORPUS, n_pos=150, n_neg=150),
                 continual_methods=("sgd", "shrink_perturb"), target_fa_per_hour=1.0, extra_fa_levels=(0.5, 6.0),
                 rtf_seconds=20.0),
    "default": dict(corpus_preset="default", train_preset="default", continual_preset="default",
                    continual_kind="keywords",
                    continual_keywords=("okay toaster", "hello robot", "hey marvin", "wake up lamp"),
                    continual_corpus_overrides=dict(_CONTINUAL_KEYWORD_CORPUS, n_pos=200, n_neg=200),
                    continual_methods=("sgd", "shrink_perturb"), target_fa_per_hour=1.0,
                    extra_fa_levels=(0.5, 2.0, 6.0)),
}


def pipeline_config(preset: str, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """The pipeline config of a preset with overrides (ConfigError for an unknown preset or key)."""
    if preset not in PIPELINE_PRESETS:
        raise ConfigError(f"unknown pipeline preset {preset!r}; choose one of {', '.join(PIPELINE_PRESETS)}")
    return build_config(PipelineConfig, {"preset": preset, **PIPELINE_PRESETS[preset]}, overrides or {})


# ------------------------------------------------------------------------------------------------ helpers


def bars_enabled(progress: bool) -> bool:
    """Whether to draw progress bars: asked for and stderr is a terminal (or ``LOPKIT_PROGRESS=1`` forces them)."""
    from lopkit.runner.execute import progress_enabled

    return progress_enabled(True if progress else "never")


def _log(message: str, progress: bool) -> None:
    if progress:
        print(f"[kws] {message}", file=sys.stderr, flush=True)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=float))
    tmp.replace(path)


def _corpus_config(config: PipelineConfig, overrides: dict | None = None):
    from lopkit.kws.corpus import CORPUS_PRESETS, CorpusConfig

    base = config_to_dict(CORPUS_PRESETS[config.corpus_preset])
    return build_config(CorpusConfig, base, {"seed": config.seed}, overrides or {})


def train_config(config: PipelineConfig, kind: str, corpus_dir: Path):
    """The kws_train config of one model of the pipeline."""
    from lopkit.kws.train import KWSTrainBenchmark

    overrides = {**config.train_overrides, "corpus_dir": str(corpus_dir), "model_kind": kind}
    return KWSTrainBenchmark.make_config(config.train_preset, overrides)


# ----------------------------------------------------------------------------------------------- scoring


def hmm_settings(config: PipelineConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """Keyword Viterbi settings of the baseline (what HMMScorer needs)."""
    return {"keyword_phone_ids": list(meta["keyword_phone_ids"]), "n_classes": int(meta["n_classes"]),
            "states_per_phone": config.hmm_states_per_phone, "normalize": config.hmm_normalize,
            "log_priors": np.asarray(meta["log_priors"]) if config.hmm_prior_scale > 0 else None,
            "prior_scale": config.hmm_prior_scale}


def make_scorer(model: torch.nn.Module, kind: str, hmm: dict[str, Any] | None) -> CNNScorer | HMMScorer:
    """The frame scorer of a model kind."""
    if kind == "dnn_hmm":
        settings = dict(hmm or {})
        return HMMScorer(model, settings.pop("keyword_phone_ids"), settings.pop("n_classes"), **settings)
    return CNNScorer(model)


@torch.no_grad()
def clip_scores(model: torch.nn.Module, kind: str, feats: torch.Tensor, hmm: dict[str, Any] | None,
                batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Raw per-frame scores and start frames ``[N, T]`` of every clip (each clip is its own stream)."""
    model.eval()
    scores, starts = [], []
    if kind == "dnn_hmm":
        scorer = make_scorer(model, kind, hmm)
        for clip in feats:
            s, st = score_features(scorer, clip.float())
            scores.append(s)
            starts.append(st)
        return np.stack(scores), np.stack(starts)
    for begin in range(0, feats.shape[0], batch):
        output = model(feats[begin:begin + batch].float())
        scores.append(torch.sigmoid(output["detect"].double()).numpy())  # float64: no ties at 1.0 below logit ~36
        t = np.arange(feats.shape[-1], dtype=np.float64)[None]
        if "offset" in output:
            starts.append(t - model.offset_frames(output["offset"]).double().numpy())
        else:
            starts.append(np.full(output["detect"].shape, np.nan))
    return np.concatenate(scores), np.concatenate(starts)


def _positive_windows(start_s: np.ndarray, end_s: np.ndarray, accept_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Acceptance windows [keyword start, keyword end + accept] in frames."""
    start = np.round(np.nan_to_num(start_s) * FRAMES_PER_SECOND).astype(int)
    return start, np.round(np.nan_to_num(end_s) * FRAMES_PER_SECOND).astype(int) + accept_frames


def _peak_frame(smoothed: np.ndarray, lo: int, hi: int) -> int | None:
    """Frame of the highest smoothed score inside the window (None for an empty window)."""
    lo, hi = max(0, lo), min(smoothed.size, hi)
    return None if hi <= lo else int(lo + np.argmax(smoothed[lo:hi]))


def _first_crossing(smoothed: np.ndarray, lo: int, hi: int, threshold: float) -> int | None:
    window = smoothed[max(0, lo):min(smoothed.size, hi)]
    above = np.flatnonzero(window > threshold)
    return None if above.size == 0 else int(above[0] + max(0, lo))


def evaluate_model(model: torch.nn.Module, kind: str, corpus_dir: Path, config: PipelineConfig,
                   meta: dict[str, Any], eval_dir: Path, progress: bool = False) -> dict[str, Any]:
    """DET per split, FRR at the operating point, start errors and RTF of one trained model; writes CSVs."""
    from lopkit.kws.corpus import load_corpus
    from lopkit.kws.model import count_parameters
    from lopkit.kws.train import load_split_features

    corpus = load_corpus(str(corpus_dir))
    hmm = hmm_settings(config, meta) if kind == "dnn_hmm" else None
    scorer = make_scorer(model, kind, hmm)
    accept = int(round(config.accept_after_s * FRAMES_PER_SECOND))
    refractory = max(1, int(round(config.refractory_s * FRAMES_PER_SECOND)))
    # negative stream
    neg_scores, neg_segments, neg_samples = [], [], 0
    for chunk in corpus.streams("stream_neg"):
        raw, _ = score_features(scorer, compute_features(chunk.audio))
        neg_scores.append(causal_moving_average(raw, config.smooth_frames))
        neg_segments.append(chunk.meta.get("segments", []))
        neg_samples += chunk.audio.size
    neg_hours = neg_samples / 16000 / 3600  # one division: summed per-chunk hours read 0.9999999999999999 for 60 min
    if neg_hours <= 0:
        raise ValueError("the corpus has no negative stream (stream_neg_minutes=0); FA/h cannot be measured")
    # positives per split: (max score in window, smoothed scores, starts, window, reference start, info)
    positives: dict[str, list[tuple]] = {}
    negative_clip_max: dict[str, np.ndarray] = {}
    for split in ("test_seen", "test_cross"):
        if split not in corpus.info["splits"] or corpus.n_clips(split) == 0:
            continue
        data = load_split_features(str(corpus_dir), split)
        raw, starts = clip_scores(model, kind, data.feats, hmm)
        smoothed = np.stack([causal_moving_average(r, config.smooth_frames) for r in raw])
        label = data.label.numpy()
        lo, hi = _positive_windows(data.start_s.numpy(), data.end_s.numpy(), accept)
        entries = []
        for i in np.flatnonzero(label == 1):
            entries.append((M.window_max(smoothed[i], lo[i], hi[i]), smoothed[i], starts[i], lo[i], hi[i],
                            float(data.start_s[i]), data.engine[i], data.voice[i]))
        positives[split] = entries
        negative_clip_max[split] = smoothed[label == 0].max(axis=1) if (label == 0).any() else np.zeros(0)
    if "stream_pos" in corpus.info["splits"]:
        entries = []
        for chunk in corpus.streams("stream_pos"):
            raw, starts = score_features(scorer, compute_features(chunk.audio))
            smoothed = causal_moving_average(raw, config.smooth_frames)
            for event in chunk.events:
                lo, hi = _positive_windows(np.array([event["kw_start_s"]]), np.array([event["kw_end_s"]]), accept)
                entries.append((M.window_max(smoothed, lo[0], hi[0]), smoothed, starts, lo[0], hi[0],
                                float(event["kw_start_s"]), event.get("engine", ""), event.get("voice", "")))
        if entries:
            positives["stream_pos"] = entries
    all_pos = np.array([e[0] for entries in positives.values() for e in entries])
    thresholds = M.sweep_thresholds(all_pos, np.concatenate(neg_scores), max_points=600)
    result: dict[str, Any] = {"params": count_parameters(model), "stream_hours": neg_hours, "splits": {}}
    neg_blocks = M.negative_block_counts(neg_scores, thresholds, refractory)  # once for every split's bootstrap
    for split, entries in positives.items():
        pos_max = np.array([e[0] for e in entries])
        det = M.det_curve(pos_max, neg_scores, neg_hours, refractory, thresholds)
        det.to_csv(eval_dir / f"{kind}__{split}_det.csv", index=False)
        op = M.frr_at_fa(det, config.target_fa_per_hour)
        rows = []
        for score, smoothed, starts, lo, hi, ref, engine, voice in entries:
            t = _first_crossing(smoothed, lo, hi, op["threshold"]) if math.isfinite(op["threshold"]) else None
            pred = float(starts[t]) / FRAMES_PER_SECOND if t is not None and np.isfinite(starts[t]) else math.nan
            peak = _peak_frame(smoothed, lo, hi)
            pred_peak = float(starts[peak]) / FRAMES_PER_SECOND if peak is not None and np.isfinite(starts[peak]) else math.nan
            rows.append({"detected": t is not None, "trigger_s": (t * 160 + 400) / 16000 if t is not None else math.nan,
                         "predicted_start_s": pred, "reference_start_s": ref, "peak_start_s": pred_peak,
                         "engine": engine, "voice": voice, "max_score": score})
        frame = pd.DataFrame(rows)
        frame.to_csv(eval_dir / f"{kind}__{split}_starts.csv", index=False)
        detected = frame[frame["detected"]]
        levels = sorted({float(config.target_fa_per_hour), *map(float, config.extra_fa_levels)})
        intervals = M.bootstrap_frr_at_fa(pos_max, neg_blocks, levels, thresholds, refractory,
                                          n_boot=config.bootstrap_samples, seed=config.seed)
        info = {**op, "n_pos": len(entries),
                "start": M.start_error_summary(detected["predicted_start_s"], detected["reference_start_s"]),
                "start_peak": M.start_error_summary(frame["peak_start_s"], frame["reference_start_s"]),
                "frr_at": {str(f): M.frr_at_fa(det, f)["frr"] for f in config.extra_fa_levels},
                "frr_ci95": {str(f): list(intervals[f]) for f in levels}}
        if split in negative_clip_max and negative_clip_max[split].size:
            info["neg_clip_fa_pct"] = float(100 * np.mean(negative_clip_max[split] > op["threshold"]))
        result["splits"][split] = info
    result["threshold"] = M.frr_at_fa(M.det_curve(all_pos, neg_scores, neg_hours, refractory, thresholds),
                                      config.target_fa_per_hour)["threshold"]
    if math.isfinite(result["threshold"]):
        result["fa_by_kind"] = M.fa_by_kind(neg_scores, neg_segments, result["threshold"], neg_hours, refractory)
    events = M.top_negative_events(neg_scores, neg_segments, top=50)
    if kind != "dnn_hmm":  # the CNN's score is a probability: its logit says how far from saturation it is
        clipped = events["score"].clip(1e-300, 1 - 1e-16)
        events.insert(4, "logit", np.log(clipped) - np.log1p(-clipped))
    events.to_csv(eval_dir / f"{kind}__stream_neg_top.csv", index=False)
    result["rtf"] = measure_rtf(scorer, corpus, config)
    return result


def measure_rtf(scorer: CNNScorer | HMMScorer, corpus: Any, config: PipelineConfig) -> float:
    """Real-time factor of the full streaming detector (100 ms chunks, one torch thread) on the negative stream's start."""
    chunk = next(iter(corpus.streams("stream_neg")))
    audio = chunk.audio[: int(config.rtf_seconds * 16000)]
    detector = StreamingDetector(scorer, threshold=math.inf, smooth_frames=config.smooth_frames,
                                 refractory_s=config.refractory_s)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for begin in range(0, audio.size, 1600):
            detector.push(audio[begin:begin + 1600])
    finally:
        torch.set_num_threads(threads)
    return detector.real_time_factor


def export_model(path: Path, state: dict[str, Any], threshold: float, config: PipelineConfig) -> Path:
    """Save weights, config, meta and the operating point for ``lopkit kws listen``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    export = {"config": state["config"], "model": state["model"], "meta": state["meta"], "threshold": threshold,
              "smooth_frames": config.smooth_frames, "refractory_s": config.refractory_s,
              "hmm": {"states_per_phone": config.hmm_states_per_phone, "normalize": config.hmm_normalize,
                      "prior_scale": config.hmm_prior_scale}}
    torch.save(export, path)
    return path


def exported_hmm_settings(export: dict[str, Any]) -> dict[str, Any] | None:
    """The keyword Viterbi settings of an exported model (``models/<kind>.pt``); None for a CNN."""
    if export["config"]["model_kind"] != "dnn_hmm":
        return None
    meta, settings = export["meta"], export["hmm"]
    return {"keyword_phone_ids": meta["keyword_phone_ids"], "n_classes": meta["n_classes"],
            "states_per_phone": settings["states_per_phone"], "normalize": settings["normalize"],
            "log_priors": np.asarray(meta["log_priors"]) if settings["prior_scale"] > 0 else None,
            "prior_scale": settings["prior_scale"]}


def load_detector(path: str | Path, threshold: float | None = None) -> StreamingDetector:
    """A StreamingDetector from an exported model file (its stored operating threshold unless one is given).

    A given ``threshold`` outside the valid range of the model's score raises ValueError (see
    :func:`lopkit.kws.stream.check_threshold`).
    """
    from lopkit.kws.continual import load_exported_model

    model, export = load_exported_model(path)
    kind, hmm = export["config"]["model_kind"], exported_hmm_settings(export)
    if threshold is not None:
        threshold = check_threshold(threshold, kind)  # ValueError naming the valid range of this model's score
    chosen = export["threshold"] if threshold is None else threshold
    if chosen is None or not math.isfinite(chosen):
        chosen = 0.5 if kind != "dnn_hmm" else 0.0
    return StreamingDetector(make_scorer(model, kind, hmm), float(chosen), export["smooth_frames"], export["refractory_s"])


# ------------------------------------------------------------------------------------------------ stages


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def stage_corpus(config: PipelineConfig, out: Path, progress: bool) -> dict[str, Any]:
    """Build (or resume/reuse) the main corpus; returns its summary."""
    from lopkit.kws.corpus import build_corpus, corpus_summary

    index = build_corpus(_corpus_config(config, config.corpus_overrides), str(out / "corpus"),
                         progress=bars_enabled(progress),
                         workers=config.workers)
    if index is None:
        raise RuntimeError("corpus build stopped before finishing; run again to resume")
    return corpus_summary(index)


def stage_features(config: PipelineConfig, out: Path, progress: bool) -> dict[str, Any]:
    """Cache log-mel features of every clip split."""
    from lopkit.kws.corpus import load_corpus
    from lopkit.kws.train import load_split_features

    corpus = load_corpus(str(out / "corpus"))
    sizes = {}
    for split in ("train", "val", "test_seen", "test_cross"):
        if split in corpus.info["splits"] and corpus.n_clips(split) > 0:
            sizes[split] = len(load_split_features(str(out / "corpus"), split))
    return sizes


def stage_train(config: PipelineConfig, out: Path, progress: bool) -> dict[str, Any]:
    """Train every model (resumable runs in results.sqlite, final checkpoints kept)."""
    from lopkit.kws.train import KWSTrainBenchmark
    from lopkit.runner.execute import execute_run
    from lopkit.runner.store import ResultStore

    runs = {}
    with ResultStore(out) as store:
        for kind in config.models:
            cfg = train_config(config, kind, out / "corpus")
            _log(f"train {kind}", progress)
            result = execute_run(store, KWSTrainBenchmark, cfg, config.seed, progress=True if progress else "never",
                                 preset=config.train_preset, keep_checkpoint=True, handle_sigint=True)
            if result.status not in ("finished", "skipped"):
                raise RuntimeError(f"training {kind} ended with status {result.status}; run the pipeline again to resume")
            runs[kind] = {"run_id": result.run_id, "seconds": result.seconds, "steps": result.total_steps}
    return runs


def stage_evaluate(config: PipelineConfig, out: Path, progress: bool, runs: dict[str, Any]) -> dict[str, Any]:
    """Evaluate every trained model (skipping those already evaluated for the same run) and write the summary."""
    from lopkit.kws.train import model_from_state
    from lopkit.runner.store import ResultStore

    missing = [kind for kind in config.models if kind not in runs]
    if missing:
        raise ConfigError(f"models {missing} were not trained in {out} (trained: {', '.join(runs) or 'none'}); "
                          f"evaluate those with --set models={','.join(k for k in config.models if k in runs)} "
                          "or run the train stage first")
    eval_dir = out / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"target_fa_per_hour": config.target_fa_per_hour, "models": {}}
    with ResultStore(out) as store:
        for kind in config.models:
            run_id = runs[kind]["run_id"]
            cached = _read_json(eval_dir / f"{kind}.json")
            if cached.get("run_id") == run_id and cached.get("settings") == _eval_settings(config):
                summary["models"][kind] = cached["result"]
                continue
            checkpoint = store.load_checkpoint(run_id)
            if checkpoint is None:
                raise RuntimeError(f"run {run_id} ({kind}) has no kept checkpoint; delete it from the store and retrain")
            _log(f"evaluate {kind}", progress)
            tick = time.monotonic()
            state = checkpoint[1]
            model, meta = model_from_state(state)
            result = evaluate_model(model, kind, out / "corpus", config, meta, eval_dir, progress)
            result["eval_seconds"] = time.monotonic() - tick
            export_model(out / "models" / f"{kind}.pt", state, result["threshold"], config)
            _write_json(eval_dir / f"{kind}.json", {"run_id": run_id, "settings": _eval_settings(config), "result": result})
            summary["models"][kind] = result
    summary["stream_hours"] = next(iter(summary["models"].values()))["stream_hours"] if summary["models"] else 0.0
    _write_json(eval_dir / "summary.json", summary)
    return summary


def _eval_settings(config: PipelineConfig) -> dict[str, Any]:
    keys = ("target_fa_per_hour", "extra_fa_levels", "smooth_frames", "refractory_s", "accept_after_s",
            "hmm_states_per_phone", "hmm_prior_scale", "hmm_normalize")
    return json.loads(json.dumps({"version": EVAL_VERSION, **{k: getattr(config, k) for k in keys}}))


def stage_continual(config: PipelineConfig, out: Path, progress: bool) -> dict[str, Any]:
    """Adapt the exported HEiMDaL model to new voices / wake words, once per mitigation method."""
    from lopkit.kws.continual import KWSContinualBenchmark
    from lopkit.kws.corpus import build_corpus
    from lopkit.runner.execute import execute_run
    from lopkit.runner.store import ResultStore

    overrides: dict[str, Any] = {**config.continual_overrides, "task_kind": config.continual_kind}
    init = out / "models" / "heimdal.pt"
    if init.exists():
        overrides["init_model"] = str(init)
    if config.continual_kind == "voices":
        overrides["corpus_dir"] = str(out / "corpus")
    else:
        dirs = []
        for keyword in config.continual_keywords:
            target = out / "continual_corpora" / _slug(keyword)
            _log(f"continual corpus '{keyword}'", progress)
            built = build_corpus(_corpus_config(config, {**config.continual_corpus_overrides, "keyword": keyword}),
                                 str(target), progress=bars_enabled(progress), workers=config.workers)
            if built is None:
                raise RuntimeError(f"corpus for '{keyword}' unfinished; run again to resume")
            dirs.append(str(target))
        overrides["keyword_corpora"] = tuple(dirs)
    cfg = KWSContinualBenchmark.make_config(config.continual_preset, overrides)
    runs = {}
    with ResultStore(out) as store:
        for method in config.continual_methods:
            _log(f"continual {config.continual_kind} with {method}", progress)
            result = execute_run(store, KWSContinualBenchmark, cfg, config.seed, method,
                                 progress=True if progress else "never", preset=config.continual_preset)
            if result.status not in ("finished", "skipped"):
                raise RuntimeError(f"continual run ({method}) ended with status {result.status}; run again to resume")
            runs[method] = {"run_id": result.run_id, "seconds": result.seconds}
    return runs


def estimate_default_seconds(state: dict[str, Any], config: PipelineConfig) -> float | None:
    """Rough time of the default preset from this run's measured rates (meaningful for mini, not smoke).

    Uses the in-process stages' CPU seconds (one torch thread without competition), with training and continual
    divided by :data:`TWO_THREAD_SPEEDUP` (the default preset runs with 2 threads), and the corpus stage's wall
    time (synthesis runs in worker processes).
    Corpus and evaluation scale with the minutes of audio; training with the number of optimiser steps times
    ``batch_size x tau^2``; continual with its steps times batch size.
    """
    from lopkit.kws.continual import KWSContinualBenchmark
    from lopkit.kws.corpus import CORPUS_PRESETS
    from lopkit.kws.train import KWSTrainBenchmark

    seconds = dict(state.get("stage_seconds", {}))
    seconds.update({k: v for k, v in state.get("stage_cpu_seconds", {}).items() if k != "corpus"})
    runs = state.get("train") or {}
    steps = sum(int(r.get("steps") or 0) for r in runs.values())
    if not {"corpus", "train"} <= set(seconds) or steps == 0:
        return None
    this = _corpus_config(config, config.corpus_overrides)
    default = CORPUS_PRESETS["default"]

    def audio_minutes(c: Any) -> float:
        clips = c.n_pos + c.n_neg + c.n_test_pos + c.n_test_neg + c.n_cross_pos + c.n_cross_neg
        return clips * c.clip_seconds / 60 + c.stream_neg_minutes + c.n_stream_pos * 6 / 60

    audio_ratio = audio_minutes(default) / max(1e-9, audio_minutes(this))
    train_this = KWSTrainBenchmark.make_config(config.train_preset, {**config.train_overrides, "corpus_dir": "x"})
    train_default = KWSTrainBenchmark.make_config("default", {"corpus_dir": "x"})
    per_step = seconds["train"] / steps / (train_this.batch_size * train_this.tau ** 2)
    default_steps = math.ceil(train_default.epochs * (sum(default.split_sizes()["train"]) // train_default.batch_size))
    n_models = len(PIPELINE_PRESETS["default"].get("models", MODEL_ORDER))
    train = per_step * default_steps * n_models * train_default.batch_size * train_default.tau ** 2
    cont_this = KWSContinualBenchmark.make_config(config.continual_preset, {"corpus_dir": "x", "keyword_corpora": ("x",)})
    cont_default = KWSContinualBenchmark.make_config("default", {"corpus_dir": "x", "keyword_corpora": ("x",)})
    cont_ratio = (cont_default.steps_per_task * cont_default.batch_size * len(PIPELINE_PRESETS["default"]["continual_keywords"])
                  * len(PIPELINE_PRESETS["default"]["continual_methods"])) / max(1, cont_this.steps_per_task * cont_this.batch_size
                  * max(1, len(config.continual_keywords) or cont_this.n_tasks) * len(config.continual_methods))
    estimate = (seconds.get("corpus", 0) + seconds.get("features", 0) + seconds.get("evaluate", 0)) * audio_ratio
    estimate += (train + seconds.get("continual", 0) * cont_ratio) / TWO_THREAD_SPEEDUP + seconds.get("report", 0)
    return float(estimate)


def run_pipeline(config: PipelineConfig, out_dir: str | Path, stages: tuple[str, ...] | None = None,
                 progress: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Run (or resume) the pipeline's stages in order; returns the pipeline state written to pipeline.json."""
    config.validate()
    if threads is not None:
        torch.set_num_threads(int(threads))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wanted = tuple(stages or STAGES)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stages {unknown}; stages are {', '.join(STAGES)}")
    state_path = out / "pipeline.json"
    state = _read_json(state_path)
    if state.get("config") not in (None, json.loads(json.dumps(dataclasses.asdict(config)))):
        _log("pipeline config changed since the last run in this folder; stages are re-checked", progress)
    state.update(preset=config.preset, config=json.loads(json.dumps(dataclasses.asdict(config))))
    state.setdefault("stage_seconds", {})

    done = set(state.get("stages_done", []))

    def timed(name: str, body: Callable[[], Any]) -> Any:
        _log(f"stage {name}", progress)
        tick, cpu = time.monotonic(), time.process_time()
        value = body()
        if name not in done or name in ("evaluate", "report"):  # a re-check of a finished stage keeps its time
            previous = 0.0 if name in done else 1.0  # an interrupted attempt's time adds up with the resumed one
            cpu_seconds = state.setdefault("stage_cpu_seconds", {})
            state["stage_seconds"][name] = round(previous * state["stage_seconds"].get(name, 0.0)
                                                 + time.monotonic() - tick, 2)
            cpu_seconds[name] = round(previous * cpu_seconds.get(name, 0.0) + time.process_time() - cpu, 2)
        done.add(name)
        state["stages_done"] = sorted(done)
        state[name] = value
        state["total_seconds"] = round(sum(state["stage_seconds"].values()), 2)
        _write_json(state_path, state)
        return value

    for stage in STAGES:
        if stage not in wanted:
            continue
        if stage == "corpus":
            timed("corpus", lambda: stage_corpus(config, out, progress))
        elif stage == "features":
            timed("features", lambda: stage_features(config, out, progress))
        elif stage == "train":
            timed("train", lambda: stage_train(config, out, progress))
        elif stage == "evaluate":
            runs = state.get("train") or stage_train(config, out, progress)
            timed("evaluate", lambda: stage_evaluate(config, out, progress, runs))
        elif stage == "continual":
            timed("continual", lambda: stage_continual(config, out, progress))
        elif stage == "report":
            from lopkit.kws.report import build_kws_report

            state["default_estimate_seconds"] = estimate_default_seconds(state, config)
            _write_json(state_path, state)
            path = timed("report", lambda: str(build_kws_report(out)))
            _log(f"report: {path}", progress)
    state["default_estimate_seconds"] = estimate_default_seconds(state, config)
    _write_json(state_path, state)
    return state
