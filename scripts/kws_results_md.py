"""Print the HEiMDaL (lopkit kws) figures of pipeline output folders as Markdown (for docs/kws.md; nothing by hand).

Usage: python scripts/kws_results_md.py RUN_DIR [RUN_DIR ...] [--write docs/kws.md]

Each RUN_DIR is a ``lopkit kws run`` / ``lopkit kws evaluate`` output folder; the script reads only
``pipeline.json``, ``eval/summary.json``, ``eval/<kind>__stream_neg_top.csv`` (when the evaluation wrote them) and
``corpus/index.json``. Every section is labelled with the folder, seed,
corpus (keyword, negative-stream minutes, whether confusables were checked by phones), training budget and the
UTC date the evaluation was written. ``--write FILE`` replaces the text between the markers
``<!-- kws-results:begin -->`` and ``<!-- kws-results:end -->`` in FILE instead of printing.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import sys
from pathlib import Path

BEGIN, END = "<!-- kws-results:begin -->", "<!-- kws-results:end -->"
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


def main(argv: list[str]) -> int:
    """Print (or write into a marked block) the sections of every folder given."""
    write = None
    if "--write" in argv:
        at = argv.index("--write")
        if at + 1 >= len(argv):
            print("error: --write needs a file, e.g. --write docs/kws.md", file=sys.stderr)
            return 2
        write = Path(argv[at + 1])
        argv = argv[:at] + argv[at + 2:]
    if not argv:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    text = "\n".join(run_section(Path(a)) for a in argv)
    if write is None:
        print(text)
        return 0
    document = write.read_text()
    if BEGIN not in document or END not in document:
        print(f"error: {write} has no '{BEGIN}' ... '{END}' block to replace; add the two markers", file=sys.stderr)
        return 2
    head, rest = document.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    generated = f"{BEGIN}\n<!-- generated by scripts/kws_results_md.py {' '.join(argv)}; do not edit -->\n\n{text}\n{END}"
    write.write_text(head + generated + tail)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
