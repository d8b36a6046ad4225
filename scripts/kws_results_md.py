"""Print the HEiMDaL (lopkit kws) figures of pipeline output folders as Markdown (for docs/kws.md; nothing by hand).

Usage: python scripts/kws_results_md.py RUN_DIR [RUN_DIR ...] [--write docs/kws.md] [--marker NAME]

Each RUN_DIR is a ``lopkit kws run`` / ``lopkit kws evaluate`` output folder; the script reads only
``pipeline.json``, ``eval/summary.json``, ``eval/<kind>__stream_neg_top.csv`` (when the evaluation wrote them) and
``corpus/index.json``. Every section is labelled with the folder, seed,
corpus (keyword, negative-stream minutes, whether confusables were checked by phones), training budget and the
UTC date the evaluation was written. ``--write FILE`` replaces the text between the markers
``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in FILE instead of printing (``--marker NAME``, default
``kws-results``). With several folders (one per seed) a table over the seeds and the target verdicts come first.
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime
import json
import math
import sys
from pathlib import Path

from _blocks import check_target, replace_block

SPLITS = (("test_seen", "held-out espeak voices"), ("test_cross", "flite + festival voices"),
          ("stream_pos", "positives inside continuous speech"))
KINDS = ("confusable", "sentence", "noise")
TOP_EVENTS = 10


def _read(path: Path) -> dict:
    if not path.exists():
        raise SystemExit(f"error: {path} not found; give a folder written by 'lopkit kws run' (evaluate stage done)")
    return json.loads(path.read_text())


def _pct(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f} %"


def _ms(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f} ms"


def _frr_at(split: dict, level: float, target: float) -> float:
    return split["frr"] if level == target else split["frr_at"].get(str(level), math.nan)


def _window_max(folder: Path, kind: str, split: str) -> str:
    """Median of the positives' smoothed window maxima (``max_score`` of the starts CSV; as a logit for the CNNs)."""
    path = folder / "eval" / f"{kind}__{split}_starts.csv"
    if not path.exists():
        return "n/a"
    values = sorted(float(r["max_score"]) for r in csv.DictReader(path.open()))
    median = values[len(values) // 2] if len(values) % 2 else 0.5 * (values[len(values) // 2 - 1] + values[len(values) // 2])
    if kind == "dnn_hmm":
        return f"{median:.1f}"
    return f"p {median:.4f} (logit {math.log(median) - math.log1p(-median):.2f})"


def homophone_lines(folder: Path) -> list[str]:
    """Counts of stored negatives that sound like the keyword, per split (needs the corpus shards; [] without them)."""
    from lopkit.kws.corpus import load_corpus, sounds_like_keyword

    corpus_dir = folder / "corpus"
    if not (corpus_dir / "clips").is_dir() or not (corpus_dir / "streams").is_dir():
        return []
    corpus = load_corpus(str(corpus_dir))
    keyword, counts = corpus.config.keyword, {}
    for split, entry in corpus.info["splits"].items():
        found, confusables = 0, 0
        for path in corpus.files(split):
            import numpy as np

            with np.load(path) as data:
                meta = json.loads(str(data["meta"]))
            for row in meta.get("records", meta.get("segments", [])):
                if int(row.get("label", 0)) == 0 and row.get("kind") == "confusable":
                    confusables += 1
                    found += sounds_like_keyword(str(row.get("text", "")), keyword)
        counts[split] = (found, confusables)
    return ["- negatives that sound like the keyword (espeak phones contain the keyword's), of all confusables: "
            + ", ".join(f"{split} {found} of {total}" for split, (found, total) in counts.items())]


def run_section(folder: Path) -> str:
    """One run's figures: header, FRR at each FA/h level with intervals, FA by kind, start errors, cost."""
    state = _read(folder / "pipeline.json")
    summary_path = folder / "eval" / "summary.json"
    summary = _read(summary_path)
    index = _read(folder / "corpus" / "index.json")
    config, corpus = state["config"], index["config"]
    target = float(summary.get("target_fa_per_hour", config["target_fa_per_hour"]))
    levels = sorted({target, *map(float, config.get("extra_fa_levels", ()))})
    written = datetime.datetime.fromtimestamp(summary_path.stat().st_mtime, datetime.timezone.utc)
    steps = {k: v.get("steps") for k, v in (state.get("train") or {}).items()}
    checked = "yes" if index.get("homophone_check") else "no (built before the phone check: may hold homophones)"
    lines = [f"**Run `{folder}`** (seed {config['seed']}, preset `{config['preset']}`; evaluation written "
             f"{written:%Y-%m-%d %H:%M} UTC)", "",
             f"- corpus: keyword \"{corpus['keyword']}\", negative stream {corpus['stream_neg_minutes']:g} min "
             f"({summary['stream_hours']:.3f} h scored), {corpus['n_pos']} + {corpus['n_neg']} train/val clips, "
             f"confusables checked by phones: {checked}",
             f"- training: preset `{config['train_preset']}` with overrides {config.get('train_overrides') or '{}'}; "
             + ", ".join(f"{k} {v} steps" for k, v in steps.items())
             + (f"; train stage {state['stage_seconds']['train']:.0f} s wall" if "train" in state.get("stage_seconds", {})
                else ""),
             *homophone_lines(folder),
             "- FRR at each FA/h level on the negative stream, with the 95 % bootstrap interval (positives and 60 s "
             "stream blocks resampled; the training-seed spread is not included)", ""]
    models = summary["models"]
    header = "| model | split | " + " | ".join(f"FRR @ {f:g} FA/h [95 % CI]" for f in levels) + \
             " | positives' window max, median | median start error at the trigger (n) | median start error at the peak |"
    lines += [header, "|" + "---|" * (5 + len(levels))]
    for kind, result in models.items():
        for split, label in SPLITS:
            info = result["splits"].get(split)
            if info is None:
                continue
            cells = []
            for level in levels:
                low, high = info.get("frr_ci95", {}).get(str(level), [math.nan, math.nan])
                cells.append(f"{_pct(_frr_at(info, level, target))} [{_pct(low)}, {_pct(high)}]")
            start, peak = info["start"], info["start_peak"]
            lines.append(f"| {kind} ({result['params']:,} params) | {split} ({label}) | " + " | ".join(cells)
                         + f" | {_window_max(folder, kind, split)} | {_ms(start['median_abs_ms'])} ({start['n']}) | "
                         f"{_ms(peak['median_abs_ms'])} |")
    lines += ["", f"False accepts per hour by negative kind at the {target:g} FA/h operating threshold, and cost:", "",
              "| model | threshold | " + " | ".join(KINDS) + " | streaming RTF (1 thread) |", "|" + "---|" * (3 + len(KINDS))]
    for kind, result in models.items():
        by_kind = result.get("fa_by_kind", {})
        lines.append(f"| {kind} | {result['threshold']:.6g} | " + " | ".join(f"{by_kind.get(k, math.nan):.2f}" for k in KINDS)
                     + f" | {result['rtf']:.3f} |")
    seconds = state.get("stage_seconds", {})
    if seconds:
        lines += ["", "Stage wall seconds of this folder (a machine shared with other jobs): "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
                  + (f"; default-preset estimate from these rates {state['default_estimate_seconds'] / 3600:.1f} h"
                     if state.get("default_estimate_seconds") else "") + "."]
    for kind in models:
        path = folder / "eval" / f"{kind}__stream_neg_top.csv"
        if not path.exists():
            continue
        rows = list(csv.DictReader(path.open()))[:TOP_EVENTS]
        score = "logit" if rows and "logit" in rows[0] else "score"
        lines += ["", f"The {TOP_EVENTS} highest-scoring negative-stream events of {kind} (smoothed {score}; "
                  "`eval/" + path.name + "`):", "",
                  f"| time in the stream | {score} | kind | text spoken | voice |", "|---|---|---|---|---|"]
        for row in rows:
            at = float(row["time_s"])
            lines.append(f"| chunk {row['stream']}, {at:.2f} s | {float(row[score]):.3f} | {row['kind']} | "
                         f"{row['text'] or '-'} | {row['engine']}:{row['voice']} |" if row["engine"] else
                         f"| chunk {row['stream']}, {at:.2f} s | {float(row[score]):.3f} | {row['kind']} | - | - |")
    return "\n".join(lines) + "\n"


START_TARGET_MS = 20.0  # issue 19: start error within 20 ms


def _seed_figures(folder: Path) -> tuple[int, float, list[float], dict]:
    """(seed, target FA/h, FA/h levels, models of eval/summary.json) of one run folder."""
    state = _read(folder / "pipeline.json")
    summary = _read(folder / "eval" / "summary.json")
    config = state["config"]
    target = float(summary.get("target_fa_per_hour", config["target_fa_per_hour"]))
    levels = sorted({target, *map(float, config.get("extra_fa_levels", ()))})
    return int(config["seed"]), target, levels, summary["models"]


def seeds_section(folders: list[Path]) -> str:
    """The targets over seeds: each seed's FRR per model, split and FA/h level, their mean, and the verdicts.

    Verdicts are counts over seeds (how many seeds have the CNN's FRR below the DNN-HMM's at equal footprint; how
    many have the CNN's median start error within 20 ms), computed from the figures in the table.
    """
    runs = [_seed_figures(folder) for folder in folders]
    levels = sorted({level for _, _, found, _ in runs for level in found})
    seeds = [seed for seed, _, _, _ in runs]
    models = list(runs[0][3])
    lines = [f"### Over seeds {', '.join(map(str, seeds))} (one folder per seed, listed below)", "",
             "FRR at each FA/h level on each seed's own negative stream; cells: the seeds' values in seed order, then "
             "their mean. Each seed has its own corpus (voices, texts, noise and stream drawn from its seed) and its "
             "own training.", "",
             "| model | split | " + " | ".join(f"FRR @ {level:g} FA/h" for level in levels)
             + " | median start error at the trigger |", "|" + "---|" * (3 + len(levels))]

    def values(model: str, split: str, level: float) -> list[float]:
        out = []
        for _, target, _, found in runs:
            info = found.get(model, {}).get("splits", {}).get(split)
            out.append(_frr_at(info, level, target) if info is not None else math.nan)
        return out

    def starts(model: str, split: str) -> list[float]:
        return [found.get(model, {}).get("splits", {}).get(split, {}).get("start", {}).get("median_abs_ms", math.nan)
                for _, _, _, found in runs]

    def cell(found: list[float], fmt) -> str:
        finite = [v for v in found if v is not None and not (isinstance(v, float) and math.isnan(v))]
        mean = sum(finite) / len(finite) if finite else math.nan
        return " / ".join(fmt(v) for v in found) + f"; mean {fmt(mean)}"

    for model in models:
        params = runs[0][3][model].get("params")
        for split, label in SPLITS:
            lines.append(f"| {model} ({params:,} params) | {split} ({label}) | "
                         + " | ".join(cell(values(model, split, level), _pct) for level in levels)
                         + f" | {cell(starts(model, split), _ms)} |")
    lines.append("")
    cnn, baseline = "heimdal", "dnn_hmm"
    if cnn in models and baseline in models:
        for split, label in SPLITS:
            parts = []
            for level in levels:
                ours, theirs = values(cnn, split, level), values(baseline, split, level)
                wins = sum(1 for a, b in zip(ours, theirs) if a < b)
                parts.append(f"{wins} of {len(seeds)} seeds at {level:g} FA/h")
            lines.append(f"- CNN FRR below the DNN-HMM's, {split} ({label}): " + ", ".join(parts) + ".")
        for split, label in SPLITS:
            found = starts(cnn, split)
            within = sum(1 for v in found if not math.isnan(v) and v <= START_TARGET_MS)
            lines.append(f"- CNN median start error within {START_TARGET_MS:g} ms, {split}: {within} of "
                         f"{len(seeds)} seeds.")
        lines.append("")
    return "\n".join(lines) + "\n"


def peak_phrases_section(folders: list[Path], top: int = TOP_EVENTS) -> str:
    """Which negatives the models confuse: the phrases behind each seed's ``top`` highest negative-stream events,
    counted over seeds per model (read from ``eval/<model>__stream_neg_top.csv``)."""
    counts: dict[str, collections.Counter] = {}
    for folder in folders:
        for path in sorted((folder / "eval").glob("*__stream_neg_top.csv")):
            model = path.name.split("__")[0]
            rows = list(csv.DictReader(path.open()))[:top]
            counts.setdefault(model, collections.Counter()).update(
                f"{row['kind']}: {row['text']}" if row["text"] else row["kind"] for row in rows)
    if not counts:
        return ""
    lines = [f"Phrases behind each seed's {top} highest-scoring negative-stream events, counted over the "
             f"{len(folders)} seeds ({top * len(folders)} events per model):", "",
             "| model | phrase (events) |", "|---|---|"]
    for model, counter in counts.items():
        lines.append(f"| {model} | " + ", ".join(f"{phrase} ({n})" for phrase, n in counter.most_common()) + " |")
    return "\n".join(lines) + "\n"


OCCLUSION_PARTS = (("intact", "intact"), ("first_word", "first word occluded"), ("first_phone", "first phone occluded"),
                   ("last_phone", "last phone occluded"), ("control", "control span occluded"))


def occlusion_section(folders: list[Path]) -> str:
    """Which part of the keyword each model uses: the occlusion tests of ``scripts/kws_occlusion.py`` (read from
    each folder's ``eval/occlusion.json``), per model and seed."""
    found = [(folder, _read(folder / "eval" / "occlusion.json")) for folder in folders]
    found = [(folder, data) for folder, data in found if data]
    if not found:
        return ""
    lines = ["Occlusion test (`scripts/kws_occlusion.py`; `lopkit.kws.analysis.occlusion_test`): held-out espeak "
             "positives scored intact and with one part of the keyword replaced by the clip's noise floor (per mel "
             "bin, the 10th percentile over time); the control span has the first word's length and ends 5 frames "
             "before the keyword. Cells: detected at the model's 1 FA/h threshold / above the intact clips' median "
             "window peak (0.50 intact by construction), per seed.", "",
             "| model | seed | positives | " + " | ".join(label for _, label in OCCLUSION_PARTS) + " |",
             "|" + "---|" * (3 + len(OCCLUSION_PARTS))]
    for folder, data in found:
        seed = _read(folder / "pipeline.json").get("config", {}).get("seed", "?")
        for key, result in sorted(data.items()):
            if not all(part in result for part, _ in OCCLUSION_PARTS):
                continue
            lines.append(f"| {key.split(':')[0]} | {seed} | {result['n']} | " + " | ".join(
                f"{100 * result[part]['rate']:.0f} % / {100 * result[part]['rate_at_median']:.0f} %"
                for part, _ in OCCLUSION_PARTS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """Print (or write into a marked block) the sections of every folder given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", metavar="RUN_DIR", help="lopkit kws run/evaluate output folders")
    parser.add_argument("--write", type=Path, default=None, metavar="FILE",
                        help="replace the marked block in FILE (e.g. docs/kws.md) instead of printing")
    parser.add_argument("--marker", default="kws-results", metavar="NAME",
                        help="block markers <!-- NAME:begin --> ... <!-- NAME:end --> (default: %(default)s)")
    args = parser.parse_args(argv)
    write, marker, argv = args.write, args.marker, args.folders
    missing = [a for a in argv if not (Path(a) / "pipeline.json").is_file()]
    if missing:
        print(f"error: {missing[0]} is not a lopkit kws output folder (no pipeline.json); pass the --out folder of "
              "'lopkit kws run'", file=sys.stderr)
        return 2
    problem = None if write is None else check_target(write, marker)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    text = "\n".join(run_section(Path(a)) for a in argv)
    if len(argv) > 1:
        folders = [Path(a) for a in argv]
        text = "\n".join(part for part in (seeds_section(folders), peak_phrases_section(folders),
                                            occlusion_section(folders)) if part) + "\n" + text
    if write is None:
        print(text)
        return 0
    flags = f" --marker {marker}" if marker != "kws-results" else ""
    replace_block(write, marker, text, f"scripts/kws_results_md.py {' '.join(argv)}{flags}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
