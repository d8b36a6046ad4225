"""``lopkit kws``: build the corpus, train, evaluate, listen, adapt continually, run the whole pipeline, report."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Any

from lopkit.configs import ConfigError, parse_overrides

from lopkit.runner.cli_common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    add_threads_flag,
    apply_threads,
    error_exit,
)

_error = error_exit


def _pipeline_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs for the pipeline config; ``train_overrides.epochs=3`` sets one key of a dict field."""
    flat: dict[str, Any] = {}
    for key, value in parse_overrides(pairs).items():
        if "." in key:
            field, sub = key.split(".", 1)
            flat.setdefault(field, {})[sub] = value
        else:
            flat[key] = value
    return flat


def _build(args: argparse.Namespace) -> int:
    from lopkit.kws.corpus import CORPUS_PRESETS, CorpusConfig, build_corpus, corpus_summary
    from lopkit.configs import build_config, config_to_dict

    try:
        if args.preset not in CORPUS_PRESETS:
            raise ConfigError(f"unknown corpus preset {args.preset!r}; choose one of {', '.join(CORPUS_PRESETS)}")
        config = build_config(CorpusConfig, config_to_dict(CORPUS_PRESETS[args.preset]), parse_overrides(args.overrides))
    except ConfigError as err:
        return _error(str(err))
    try:
        from lopkit.kws.pipeline import bars_enabled

        index = build_corpus(config, args.out, progress=bars_enabled(not args.no_progress), workers=args.workers,
                             force=args.force)
    except ConfigError as err:
        return _error(str(err))
    except KeyboardInterrupt:
        print("interrupted; finished shards are kept, run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if index is None:
        print("corpus unfinished; run the same command again to resume", file=sys.stderr)
        return EXIT_FAILED
    summary = corpus_summary(index)
    for split, info in summary["splits"].items():
        print(f"{split:10s} clips={info['n_clips']:6d} positives={info['n_pos']:6d} hours={info['hours']:.3f}")
    print(f"corpus: {args.out} ({summary['bytes'] / 1e6:.1f} MB)")
    return EXIT_OK


def _train(args: argparse.Namespace) -> int:
    from lopkit.kws.train import KWSTrainBenchmark, keyword_of
    from lopkit.runner.execute import execute_run
    from lopkit.runner.store import ResultStore, StoreError

    try:
        overrides = {**parse_overrides(args.overrides), "corpus_dir": args.corpus, "model_kind": args.model_kind}
        config = KWSTrainBenchmark.make_config(args.preset, overrides)
        keyword_of(args.corpus)  # a missing corpus fails here, before a run is registered
        apply_threads(args)
        _reuse_freed_memory()
    except (ConfigError, FileNotFoundError) as err:
        return _error(str(err))
    out = Path(args.out)
    with ResultStore(out) as store:
        try:
            result = execute_run(store, KWSTrainBenchmark, config, args.seed, progress=not args.no_progress,
                                 preset=args.preset, keep_checkpoint=True, raise_on_error=False)
        except (ConfigError, FileNotFoundError, StoreError) as err:
            return _error(str(err))
    print(f"{args.model_kind}: {result.status} at step {result.step}/{result.total_steps} (run {result.run_id})")
    if result.status == "failed":
        print(f"error: {result.error_line}", file=sys.stderr)
        return EXIT_FAILED
    if result.status == "interrupted":
        return EXIT_INTERRUPTED
    print(f"results: {store.path}")
    return EXIT_OK


def _reuse_freed_memory() -> None:
    """Training commands: keep freed activation buffers for reuse (faster steps, same values; issue 19)."""
    from lopkit.kws.train import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()


def _run_stages(args: argparse.Namespace, stages: tuple[str, ...] | None) -> int:
    from lopkit.kws.pipeline import pipeline_config, run_pipeline
    from lopkit.mitigations.registry import build_methods

    try:
        config = pipeline_config(args.preset, _pipeline_overrides(args.overrides))
        config.validate()
        if stages is None or "continual" in stages:
            for method in config.continual_methods:  # unknown names / bad hyper-parameters fail before any stage
                build_methods(method)
        apply_threads(args)
        _reuse_freed_memory()
    except ConfigError as err:
        return _error(str(err))
    try:
        state = run_pipeline(config, args.out, stages=stages, progress=not args.no_progress, threads=args.threads)
    except ConfigError as err:
        return _error(str(err))
    except FileNotFoundError as err:
        return _error(str(err))
    except RuntimeError as err:  # an interrupted or failed run inside a stage; its progress is saved
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED if "interrupted" in str(err) else EXIT_FAILED
    except KeyboardInterrupt:
        command = " ".join(shlex.quote(a) for a in sys.argv) if sys.argv else "the same command"
        print(f"interrupted; completed work is saved in {args.out}. Resume with: {command}", file=sys.stderr)
        return EXIT_INTERRUPTED
    _print_summary(state)
    return EXIT_OK


def _print_summary(state: dict[str, Any]) -> None:
    """Stage times and the headline figures."""
    for stage, seconds in state.get("stage_seconds", {}).items():
        print(f"stage {stage:10s} {seconds:8.1f} s")
    evaluation = state.get("evaluate") or {}
    target = evaluation.get("target_fa_per_hour")
    for model, info in evaluation.get("models", {}).items():
        for split, values in info.get("splits", {}).items():
            start = values.get("start", {}).get("median_abs_ms", float("nan"))
            print(f"{model:18s} {split:10s} FRR@{target:g}FA/h={100 * values['frr']:6.2f}%  "
                  f"median|start err|={start:6.1f} ms  RTF={info.get('rtf', float('nan')):.4f}  params={info.get('params')}")
    if state.get("report"):
        print(f"report: {state['report']}")


def _run(args: argparse.Namespace) -> int:
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip()) if args.stages else None
    return _run_stages(args, stages)


def _evaluate(args: argparse.Namespace) -> int:
    return _run_stages(args, ("evaluate",))


def _continual(args: argparse.Namespace) -> int:
    if args.methods:
        args.overrides = [*args.overrides, f"continual_methods={','.join(args.methods)}"]
    return _run_stages(args, ("continual",))


def _report(args: argparse.Namespace) -> int:
    from lopkit.kws.report import build_kws_report

    try:
        path = build_kws_report(args.out)
    except FileNotFoundError as err:
        return _error(str(err))
    print(f"report: {path}")
    return EXIT_OK


def format_detection(detection: Any) -> str:
    """One ``listen`` line; a start estimate before the stream start is shown as 0 s and said to be clamped."""
    start = detection.start_s
    if math.isnan(start):
        shown = "start      n/a"
    elif start < 0:
        shown = f"start {0.0:8.3f} s (estimate {start:.3f} s is before the stream start; clamped to 0)"
    else:
        shown = f"start {start:8.3f} s"
    return f"wake word at {detection.time_s:8.3f} s  {shown}  score {detection.score:.4f}"


def _listen(args: argparse.Namespace) -> int:
    import torch

    from lopkit.kws.pipeline import load_detector
    from lopkit.kws.stream import listen

    torch.set_num_threads(max(1, args.threads))  # small chunks: extra threads only add synchronisation cost
    try:
        detector = load_detector(args.model, args.threshold)
    except (FileNotFoundError, ValueError) as err:
        return _error(str(err))

    def show(detection: Any) -> None:
        print(format_detection(detection), flush=True)

    try:
        result = listen(args.audio, detector, chunk_s=args.chunk_ms / 1000.0, on_detection=show)
    except (FileNotFoundError, ValueError) as err:
        return _error(str(err))
    print(f"{len(result.detections)} detection(s) in {result.audio_seconds:.2f} s of audio; "
          f"real-time factor {result.real_time_factor:.4f}")
    latency = result.latency_ms()
    if latency:
        print(f"latency per {args.chunk_ms:g} ms chunk: mean {latency['mean']:.2f} ms, p95 {latency['p95']:.2f} ms, "
              f"max {latency['max']:.2f} ms over {latency['chunks']:.0f} chunks")
    print(describe_model_cost(detector.scorer))
    return EXIT_OK


def describe_model_cost(scorer: Any) -> str:
    """One line: the scorer's model size (parameters, float32 KiB) and its multiply-accumulates per audio second."""
    from lopkit.kws.export import model_macs_per_second
    from lopkit.kws.model import CausalBCResNet, count_parameters

    model = getattr(getattr(scorer, "runner", None), "model", None)
    if not isinstance(model, CausalBCResNet):
        return "model: size unknown"
    params = count_parameters(model)
    return (f"model: {params} parameters ({params * 4 / 1024:.0f} KiB as float32), "
            f"{model_macs_per_second(model) / 1e6:.2f} M multiply-accumulates per second of audio")


def _export(args: argparse.Namespace) -> int:
    """``lopkit kws export MODEL -o spotter.pt|spotter.onnx``: a streaming module that runs without lopkit."""
    from lopkit.kws.continual import load_exported_model
    from lopkit.kws.export import export_onnx, export_torchscript, model_macs_per_second
    from lopkit.kws.model import BCResNetKWS, count_parameters

    output = Path(args.output)
    if output.suffix not in (".pt", ".onnx"):
        return _error(f"-o {output}: use a .pt file (TorchScript) or a .onnx file (ONNX)")
    try:
        model, export = load_exported_model(args.model)
    except FileNotFoundError as err:
        return _error(str(err))
    except Exception as err:  # noqa: BLE001 - any unreadable file gets one line
        return _error(f"{args.model} is not a model exported by the kws pipeline (models/<kind>.pt): {err}")
    if not isinstance(model, BCResNetKWS):
        return _error(f"{args.model} is a {export['config']['model_kind']} model; only the HEiMDaL CNNs stream "
                      "as one module (the dnn_hmm baseline decodes with a Python Viterbi)")
    try:
        if output.suffix == ".onnx":
            export_onnx(model, output, export, chunk_samples=int(round(args.chunk_ms * 16)))
        else:
            export_torchscript(model, output, export)
    except (RuntimeError, ValueError) as err:
        return _error(str(err))
    print(f"wrote {output} ({output.stat().st_size / 1024:.0f} KiB): {count_parameters(model)} parameters, "
          f"{model_macs_per_second(model) / 1e6:.1f} M multiply-accumulates per second of audio")
    if output.suffix == ".pt":
        print("load it without lopkit: spotter = torch.jit.load(path); state = spotter.initial_state(); "
              "logits, start_s, end_s, state = spotter(chunk, state)")
    else:
        print("run it with onnxruntime: inputs chunk (float32 [S], S >= 400 samples) and the state tensors, "
              "outputs logits, start_s, end_s and the new state (see docs/kws.md)")
    return EXIT_OK


def _train_wakeword(args: argparse.Namespace) -> int:
    """``lopkit kws train-wakeword PHRASE``: corpus for a new phrase -> train -> evaluate -> export, resumable."""
    from lopkit.kws.corpus import generate_confusables
    from lopkit.kws.pipeline import pipeline_config, run_pipeline

    phrase = " ".join(args.phrase.split())
    if len(phrase.split()) < 1 or any(not (c.isalpha() or c in " '-") for c in phrase):
        return _error(f"wake phrase {args.phrase!r}: use words of letters (e.g. \"hey lopkit\")")
    out = Path(args.out or f"runs/wakeword_{'_'.join(phrase.lower().split())}")
    try:
        overrides = _pipeline_overrides(args.overrides)
        corpus = dict(overrides.pop("corpus_overrides", {}) or {})
        corpus["keyword"] = phrase
        overrides.update(corpus_overrides=corpus, models=("heimdal",))
        config = pipeline_config(args.preset, overrides)
        config.validate()
        apply_threads(args)
        _reuse_freed_memory()
        confusables = generate_confusables(phrase)
    except (ConfigError, ValueError) as err:
        return _error(str(err))
    print(f"wake phrase {phrase!r}: {len(confusables)} confusables derived from it, e.g. "
          + ", ".join(repr(c) for c in confusables[:5]))
    try:
        state = run_pipeline(config, out, stages=("corpus", "features", "train", "evaluate", "report"),
                             progress=not args.no_progress, threads=args.threads)
    except (ConfigError, FileNotFoundError) as err:
        return _error(str(err))
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED if "interrupted" in str(err) else EXIT_FAILED
    _print_summary(state)
    model_file = out / "models" / "heimdal.pt"
    export_args = argparse.Namespace(model=str(model_file), output=str(out / "spotter.pt"), chunk_ms=100.0)
    return _export(export_args)


def _add_pipeline_options(parser: argparse.ArgumentParser, default_out: str | None = None) -> None:
    parser.add_argument("--preset", default="smoke", help="pipeline preset: smoke, mini or default (default: %(default)s)")
    parser.add_argument("--out", default=default_out, required=default_out is None, metavar="DIR",
                        help="pipeline output folder")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a pipeline setting, e.g. --set target_fa_per_hour=2 train_overrides.epochs=4 "
                             "corpus_overrides.n_pos=2000")
    add_threads_flag(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress output")


def register(subparsers: Any) -> None:
    """Add the ``kws`` command group."""
    kws = subparsers.add_parser(
        "kws", help="streaming wake-word detection: HEiMDaL CNN vs DNN-HMM baseline on synthetic speech",
        description=textwrap.fill(
            "Synthesise a wake-word corpus offline (espeak-ng, flite, festival), train a causal BC-ResNet keyword "
            "spotter with alignment and offset losses and a footprint-matched DNN-HMM baseline, evaluate DET "
            "curves, FRR at a fixed FA/h and start-time errors, listen to audio, and adapt continually.", width=78),
        epilog="examples:\n"
               "  lopkit kws run --preset smoke --out runs/kws_smoke\n"
               "  lopkit kws run --preset mini --out runs/kws_mini --threads 2\n"
               "  lopkit kws listen speech.wav --model runs/kws_mini/models/heimdal.pt\n"
               "  sox speech.wav -t raw -r 16000 -e signed -b 16 -c 1 - | lopkit kws listen - --model M.pt\n"
               "  arecord -f S16_LE -r 16000 -c 1 -t raw | lopkit kws listen - --model M.pt   (live microphone)\n"
               "  lopkit kws export runs/kws_mini/models/heimdal.pt -o spotter.pt\n"
               '  lopkit kws train-wakeword "hey lopkit" --preset mini\n'
               "see docs/kws.md for the definitions of FRR, FA/h, the operating point and the start error",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = kws.add_subparsers(dest="kws_command", metavar="SUBCOMMAND")
    kws.set_defaults(func=lambda args: (kws.print_help(), EXIT_USAGE)[1])

    build = sub.add_parser("build", help="synthesise (or resume) a wake-word corpus")
    build.add_argument("--preset", default="smoke", help="corpus preset: smoke, mini or default (default: %(default)s)")
    build.add_argument("--out", required=True, metavar="DIR", help="corpus folder")
    build.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override a corpus setting, e.g. --set keyword='hey lamp' n_pos=500")
    build.add_argument("--workers", type=int, default=2, metavar="N", help="synthesis processes (default: %(default)s)")
    build.add_argument("--force", action="store_true", help="replace a corpus built with another config")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(func=_build)

    train = sub.add_parser("train", help="train one model (heimdal, ablations or dnn_hmm) on a corpus, resumable")
    train.add_argument("--corpus", required=True, metavar="DIR", help="corpus folder (lopkit kws build)")
    train.add_argument("--model-kind", default="heimdal",
                       choices=["heimdal", "heimdal_no_offset", "heimdal_utterance", "dnn_hmm"])
    train.add_argument("--preset", default="smoke", help="kws_train preset: smoke, mini, default, paper")
    train.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override a kws_train field (see 'lopkit list kws_train')")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", required=True, metavar="DIR", help="experiment folder (results.sqlite)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_flag(train)
    train.set_defaults(func=_train)

    evaluate = sub.add_parser("evaluate", help="evaluate the pipeline's trained models (DET, FRR@FA/h, start errors)")
    _add_pipeline_options(evaluate)
    evaluate.set_defaults(func=_evaluate)

    export = sub.add_parser("export", help="write a trained HEiMDaL CNN as a streaming TorchScript (.pt) or ONNX "
                                           "(.onnx) module that runs without lopkit")
    export.add_argument("model", metavar="MODEL.pt", help="exported model (OUT/models/heimdal.pt)")
    export.add_argument("-o", "--output", required=True, metavar="FILE", help="spotter.pt or spotter.onnx")
    export.add_argument("--chunk-ms", type=float, default=100.0,
                        help="ONNX only: example chunk length for tracing (chunks must be >= 25 ms; default %(default)s)")
    export.set_defaults(func=_export)

    wakeword = sub.add_parser("train-wakeword", help="one command for a new phrase: synthesise its corpus (with "
                                                     "confusables derived from it), train, evaluate and export")
    wakeword.add_argument("phrase", metavar="PHRASE", help='the wake phrase, e.g. "hey lopkit"')
    wakeword.add_argument("--preset", default="smoke", help="pipeline preset: smoke, mini or default (default: %(default)s)")
    wakeword.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/wakeword_<phrase>)")
    wakeword.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                          help="override a pipeline setting, e.g. --set train_overrides.epochs=4")
    add_threads_flag(wakeword)
    wakeword.add_argument("--no-progress", action="store_true", help="no progress output")
    wakeword.set_defaults(func=_train_wakeword)

    listen = sub.add_parser("listen", help="stream a WAV file (or raw 16-bit 16 kHz PCM on stdin) through a detector")
    listen.add_argument("audio", metavar="FILE.wav|-", help="WAV file, or '-' for raw s16le mono 16 kHz PCM on stdin")
    listen.add_argument("--model", required=True, metavar="MODEL.pt", help="exported model (OUT/models/<kind>.pt)")
    listen.add_argument("--threshold", type=float, default=None,
                        help="override the stored operating threshold: a probability strictly between 0 and 1 for "
                             "the HEiMDaL CNNs, any finite log-likelihood ratio for dnn_hmm")
    listen.add_argument("--chunk-ms", type=float, default=100.0, help="audio chunk per step (default: %(default)s ms)")
    listen.add_argument("--threads", type=int, default=1, metavar="N", help="torch threads (default: %(default)s)")
    listen.set_defaults(func=_listen)

    continual = sub.add_parser("continual", help="adapt the trained CNN to new voices / wake words in sequence")
    _add_pipeline_options(continual)
    continual.add_argument("--method", dest="methods", action="append", default=[], metavar="NAME",
                           help="mitigation(s) to compare, e.g. --method sgd --method snp; one --method composes "
                                "methods with '+' (cbp+l2init) and takes hyper-parameters (cbp:replacement_rate=1e-4)")
    continual.set_defaults(func=_continual)

    run = sub.add_parser("run", help="the whole pipeline (corpus, features, train, evaluate, continual, report), resumable")
    _add_pipeline_options(run)
    run.add_argument("--stages", default=None, metavar="S,S",
                     help="only these stages: corpus, features, train, evaluate, continual, report")
    run.set_defaults(func=_run)

    report = sub.add_parser("report", help="write OUT/report/index.html from a pipeline folder")
    report.add_argument("out", metavar="DIR", help="pipeline output folder")
    report.set_defaults(func=_report)
