"""Write docs/results_e3.md and docs/compare_bitflip.md from the E3 (bit-flipping) result stores.

Reads the stores that the commands below wrote (default folder /work/runs/e3, or --runs DIR):

- ``paper_w{5,10,50,100}``: ``lopkit run bitflip --preset paper --seed-list S --set width=W num_steps=N``
- ``t5_w100``: the same with ``switch_step=N/2 switch_method=cbp_aggressive`` (checklist T5)
- ``compare``: ``lopkit compare bitflip ...`` (the command is read back from the store's config)

Every number in the generated markdown is computed here from the stored rows; nothing is typed by hand.
Usage: python scripts/results_e3.py [--runs /work/runs/e3] [--docs docs]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from lopkit.report.aggregate import interval95
from lopkit.runner.store import ResultStore

WIDTHS = (5, 10, 50, 100)
#: Paper, Figure B.2 (Jun-2025 bars, BP): duplicate fraction and effective rank on fc1 (spec lop_paper.md 4.4).
PAPER_BARS = {5: (0.01, 2.9), 10: (0.09, 4.5), 50: (0.38, 7.3), 100: (0.53, 7.6)}
WINDOW = 100_000  # the paper's bars average the last 100k steps of a phase

LAYER_DOC = (
    "`fc1` = the hidden Linear layer's output (pre-activations, the tensor of the paper's bit-flip figures); "
    "`act1` = the ReLU outputs. `duplicate_fraction`: the paper's rule, uncentred cosine > 0.98 with some later "
    "unit. `live_clone_fraction` (lopkit): Pearson (centred) similarity > 0.98 with some later unit, dead ReLU "
    "units excluded, over all units. `dead_duplicate_fraction`: units that are both paper duplicates on fc1 "
    "and dead ReLU units. `effective_rank`: exp of the Shannon entropy of the normalised singular values of "
    "the uncentred probe matrix. Probe: 128 rows drawn at random from the inputs of the whole run (the "
    "paper's code)."
)


def load(store_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(runs, metrics) of a store folder, or None when it does not exist."""
    if not (store_dir / "results.sqlite").exists():
        return None
    with ResultStore(store_dir) as store:
        return store.runs(), store.metrics()


def window_mean(metrics: pd.DataFrame, layer: str, metric: str, start: int, end: int) -> float:
    """Mean of a metric's rows with start < step <= end (NaN when none)."""
    rows = metrics[(metrics.layer == layer) & (metrics.metric == metric) & (metrics.step > start) & (metrics.step <= end)]
    return float(rows.value.mean()) if len(rows) else math.nan


def fmt(value: float, digits: int = 3) -> str:
    """A number for a table cell ("-" for NaN)."""
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}g}"


def command_of(runs: pd.DataFrame) -> str:
    """The ``lopkit run`` command that reproduces a store's runs (preset, non-default fields, seeds)."""
    config = json.loads(runs.config_json.iloc[0])
    from lopkit.benchmarks.base import get_benchmark

    cls = get_benchmark(str(runs.benchmark.iloc[0]))
    preset = str(runs.preset.iloc[0])
    base = json.loads(json.dumps(_as_dict(cls.make_config(preset))))
    sets = " ".join(f"{k}={v}" for k, v in sorted(config.items()) if base.get(k) != v)
    seeds = ",".join(str(s) for s in sorted(runs.seed.unique()))
    methods = ",".join(sorted(runs.method.unique()))
    return (f"lopkit run bitflip --preset {preset} --seed-list {seeds}" + (f" --method {methods}" if methods != "sgd" else "")
            + (f" --set {sets}" if sets else ""))


def _as_dict(config) -> dict:
    import dataclasses

    return {f.name: (list(v) if isinstance(v := getattr(config, f.name), tuple) else v) for f in dataclasses.fields(config)}


def width_section(runs_dir: Path) -> list[str]:
    """Targets of Figure B.2 (SGD) per width, both layers, with commands and seeds."""
    lines = ["## Width sweep under SGD (`paper` preset; Figure B.2 BP bars)", "", LAYER_DOC, ""]
    header = ("| width | seeds | steps | fc1 duplicates (paper) | fc1 effective rank (paper) | fc1 live clones | "
              "fc1 dead duplicates | act1 duplicates | act1 effective rank | act1 live clones | act1 dead | "
              "online MSE first 100k | online MSE last 100k |")
    lines += [header, "|" + "---|" * 13]
    commands = []
    summary: list[tuple[int, pd.Series]] = []
    for width in WIDTHS:
        loaded = load(runs_dir / f"paper_w{width}")
        if loaded is None:
            lines.append(f"| {width} | not run | | | | | | | | | | | |")
            continue
        runs, metrics = loaded
        runs = runs[runs.status == "finished"]
        if runs.empty:
            lines.append(f"| {width} | unfinished | | | | | | | | | | | |")
            continue
        metrics = metrics[metrics.run_id.isin(runs.run_id)]
        total = int(runs.total_steps.iloc[0])
        start = total - WINDOW
        per_seed = []
        for run_id, rows in metrics.groupby("run_id"):
            per_seed.append({
                "fc1_dup": window_mean(rows, "fc1", "duplicate_fraction", start, total),
                "fc1_rank": window_mean(rows, "fc1", "effective_rank", start, total),
                "fc1_live": window_mean(rows, "fc1", "live_clone_fraction", start, total),
                "fc1_dead_dup": window_mean(rows, "fc1", "dead_duplicate_fraction", start, total),
                "act1_dup": window_mean(rows, "act1", "duplicate_fraction", start, total),
                "act1_rank": window_mean(rows, "act1", "effective_rank", start, total),
                "act1_live": window_mean(rows, "act1", "live_clone_fraction", start, total),
                "act1_dead": window_mean(rows, "act1", "dead_fraction", start, total),
                "mse_first": window_mean(rows, "model", "online_mse", 0, WINDOW),
                "mse_last": window_mean(rows, "model", "online_mse", start, total),
            })
        frame = pd.DataFrame(per_seed).mean()
        summary.append((width, frame))
        dup, rank = PAPER_BARS[width]
        seeds = ",".join(str(s) for s in sorted(runs.seed))
        lines.append(
            f"| {width} | {seeds} | {total:,} | {fmt(frame.fc1_dup, 2)} ({dup}) | {fmt(frame.fc1_rank, 2)} ({rank}) | "
            f"{fmt(frame.fc1_live, 2)} | {fmt(frame.fc1_dead_dup, 2)} | {fmt(frame.act1_dup, 2)} | "
            f"{fmt(frame.act1_rank, 2)} | {fmt(frame.act1_live, 2)} | {fmt(frame.act1_dead, 2)} | "
            f"{fmt(frame.mse_first)} | {fmt(frame.mse_last)} |"
        )
        commands.append(command_of(runs) + f" --out {runs_dir / f'paper_w{width}'}")
    lines += ["", *findings(summary)]
    lines += ["", "Values: mean over the seeds of the mean over the last 100k steps (Monitor every 1000 steps); "
              "online MSE: mean of the 1000-step bins of the first and the last 100k steps. Paper values in "
              "brackets (5M-step runs, seeds 40-44).", "", "Commands (1 thread each):", ""]
    lines += [f"    {c}" for c in commands]
    return lines


T5_STORES = (("t5_w100", "the Barriers script's CBP, `cbp_aggressive`"), ("t5cbp_w100", "Dohare's CBP, `cbp`"))


def findings(summary: list[tuple[int, pd.Series]]) -> list[str]:
    """Sentences computed from the width table: are the paper's duplicates dead units, does the error rise."""
    if not summary:
        return []
    dup = sum(f.fc1_dup for _, f in summary)
    dead_dup = sum(f.fc1_dead_dup for _, f in summary)
    live = max(f.fc1_live for _, f in summary)
    rising = [w for w, f in summary if f.mse_last > f.mse_first]
    share = f"{dead_dup / dup:.0%}" if dup > 0 else "- (no duplicates)"
    return [
        f"Findings (computed): of the fc1 units counted as duplicates by the paper's rule, {share} are dead ReLU "
        f"units (summed over widths); the largest live-clone fraction on fc1 is {fmt(live, 2)}."
        + (" So here the paper's bit-flip \"duplicates\" are dead units whose negative pre-activations point the "
           "same way, not live clones." if dup > 0 and dead_dup >= 0.95 * dup and live == 0 else ""),
        f"Online MSE under SGD is higher in the last 100k steps than in the first 100k at widths "
        f"{', '.join(map(str, rising)) or 'none'} (of {', '.join(str(w) for w, _ in summary)}).",
    ]


def t5_section(runs_dir: Path) -> list[str]:
    """Checklist T5: SGD, then CBP from the switch step; the SGD continuation comes from the width-100 run."""
    lines = ["", "## T5: SGD, then CBP from half-way (width 100)", "",
             "Each row: means over the window named of the online MSE (1000-step bins) and of the Monitor rows. "
             "The SGD rows after the switch come from the width-100 SGD run above (same seed and stream, so the "
             "same online errors up to the switch; its probe is drawn from its own, longer run).", ""]
    sgd = load(runs_dir / "paper_w100")
    sgd_metrics = sgd[1] if sgd is not None else None
    header = ["| store | window (steps) | method | online MSE | fc1 duplicates | fc1 dead duplicates | fc1 live clones | "
              "fc1 effective rank | act1 dead | act1 effective rank |", "|" + "---|" * 10]
    lines += header
    commands = []
    notes: list[str] = []
    for store, what in T5_STORES:
        loaded = load(runs_dir / store)
        if loaded is None:
            lines.append(f"| {store} ({what}) | not run | | | | | | | | |")
            continue
        runs, metrics = loaded
        if (runs.status == "finished").any():  # finished seeds only; else the one unfinished run, labelled
            runs = runs[runs.status == "finished"]
            metrics = metrics[metrics.run_id.isin(runs.run_id)]
        config = json.loads(runs.config_json.iloc[0]) if len(runs) else {}
        reached = int(metrics.step.max()) if len(metrics) else 0
        if runs.empty or reached <= int(config["switch_step"]) + 1000:
            lines.append(f"| {store} ({what}) | not run past the switch | | | | | | | | |")
            continue
        total, switch = reached, int(config["switch_step"])
        if (runs.status != "finished").any():
            what += f"; unfinished: stopped at step {reached:,} of {int(config['num_steps']):,}"
        window = min(WINDOW, switch // 3)
        phases = {"before the switch": (switch - window, switch), "after the switch": (max(switch, total - window), total)}
        for name, (start, end) in phases.items():
            own_seeds = ",".join(str(v) for v in sorted(runs.seed))
            sources = [(f"{config['switch_method'] if end > switch else 'sgd'} (seeds {own_seeds})", metrics)]
            if end > switch and sgd_metrics is not None:
                same = sgd_metrics[sgd_metrics.seed.isin(runs.seed)]
                seeds = ",".join(str(v) for v in sorted(same.seed.unique()))
                sources.append((f"sgd, no switch (seeds {seeds})", same))
            for label, rows in sources:
                lines.append(
                    f"| {store} | {start:,}-{end:,} ({name}) | {label} | "
                    f"{fmt(window_mean(rows, 'model', 'online_mse', start, end))} | "
                    f"{fmt(window_mean(rows, 'fc1', 'duplicate_fraction', start, end), 2)} | "
                    f"{fmt(window_mean(rows, 'fc1', 'dead_duplicate_fraction', start, end), 2)} | "
                    f"{fmt(window_mean(rows, 'fc1', 'live_clone_fraction', start, end), 2)} | "
                    f"{fmt(window_mean(rows, 'fc1', 'effective_rank', start, end), 2)} | "
                    f"{fmt(window_mean(rows, 'act1', 'dead_fraction', start, end), 2)} | "
                    f"{fmt(window_mean(rows, 'act1', 'effective_rank', start, end), 2)} |"
                )
        start, end = phases["after the switch"]
        if sgd_metrics is not None:
            same = sgd_metrics[sgd_metrics.seed.isin(runs.seed)]
            ours = {k: window_mean(metrics, layer, k, start, end) for layer, k in
                    (("model", "online_mse"), ("fc1", "duplicate_fraction"), ("act1", "dead_fraction"))}
            base = {k: window_mean(same, layer, k, start, end) for layer, k in
                    (("model", "online_mse"), ("fc1", "duplicate_fraction"), ("act1", "dead_fraction"))}
            notes.append(
                f"{store}: after the switch, {config['switch_method']} has "
                + ", ".join(f"{'lower' if ours[k] < base[k] else 'higher or equal'} {k} ({fmt(ours[k])} vs "
                            f"{fmt(base[k])})" for k in ours)
                + " than SGD without the switch over the same steps."
            )
        commands.append(f"{command_of(runs)} --out {runs_dir / store}    # {what}, seeds "
                        f"{','.join(str(v) for v in sorted(runs.seed))}, windows of {window:,} steps")
    lines += ["", *(f"Findings (computed): {n}" for n in notes)]
    lines += ["", "Commands (1 thread; shorter than the paper's 5M steps with the switch at 2.5M, CPU budget):", ""]
    lines += [f"    {c}" for c in commands]
    return lines


def compare_section(compare_dir: Path) -> list[str]:
    """The ``lopkit compare bitflip`` ranking (95 % intervals) plus fc1 duplicate and live-clone columns."""
    loaded = load(compare_dir)
    lines = ["# Method comparison on bit-flipping (`lopkit compare bitflip`)", ""]
    if loaded is None:
        return lines + ["Not run."]
    runs, metrics = loaded
    unfinished = int((~runs.status.isin(["finished", "failed"])).sum())
    failed = runs[runs.status == "failed"]
    runs = runs[runs.status == "finished"]
    if runs.empty:
        return lines + ["No finished run."]
    from lopkit.report.ranking import partial_grid_note, ranking_table

    lines += partial_grid_note(runs, unfinished, failed)

    runs = runs.assign(label=runs.method)
    ranking = ranking_table(runs, metrics, None, 0.1, benchmark="bitflip")
    config = json.loads(runs.config_json.iloc[0])
    seeds = sorted(runs.seed.unique())
    methods = list(ranking.table.index)
    counts = runs.groupby("method").size()
    total = int(config["num_steps"])
    extra = []
    for method in methods:
        ids = runs[runs.method == method].run_id
        rows = metrics[metrics.run_id.isin(ids)]
        first = [window_mean(r, "model", "online_mse", 0, int(total * 0.1)) for _, r in rows.groupby("run_id")]
        mean, low, high = interval95(first)
        cells = [f"{fmt(mean)} [{fmt(low)}, {fmt(high)}]"]
        for layer, metric in (("fc1", "duplicate_fraction"), ("fc1", "live_clone_fraction"), ("act1", "dead_fraction"),
                              ("fc1", "effective_rank")):
            per_seed = [window_mean(r, layer, metric, int(total * 0.9), total) for _, r in rows.groupby("run_id")]
            mean, low, high = interval95(per_seed)
            cells.append(f"{fmt(mean)} [{fmt(low)}, {fmt(high)}]")
        extra.append(f"| {method} | {int(counts.get(method, 0))} | " + " | ".join(cells) + " |")
    base = BitFlipDefaults.of(str(runs.preset.iloc[0]))
    sets = " ".join(f"{k}={v}" for k, v in sorted(config.items()) if base.get(k) != v)
    command = (f"lopkit compare bitflip --preset {runs.preset.iloc[0]} --methods {','.join(methods)} --seeds "
               f"{','.join(map(str, seeds))}" + (f" --set {sets}" if sets else "") + f" --out {compare_dir}")
    lines += [
        f"Config: preset `{runs.preset.iloc[0]}` with `{sets}` ({total:,} steps per run); seeds "
        f"{', '.join(map(str, seeds))}; 1 thread.", "", "Command:", "", f"    {command}", "",
        ranking.caption(), "", _markdown(ranking.formatted(3)), "",
        "Means [95 % t-interval] over seeds of the first-10 % online MSE and of final-window (last 10 %) "
        "diagnostics on the layer named (definitions in docs/results_e3.md):", "",
        "| method | runs | online MSE, first 10 % | fc1 duplicates (paper rule) | fc1 live clones | act1 dead | "
        "fc1 effective rank |",
        "|---|---|---|---|---|---|---|", *extra, "",
        "Loss of plasticity shows as a final online MSE above the first-10 % one under `sgd`; when the run is too "
        "short for that, the ranking measures early learning speed, not plasticity.",
    ]
    return lines


class BitFlipDefaults:
    """Preset values of the bitflip config, to print only the overridden fields of a command."""

    @staticmethod
    def of(preset: str) -> dict:
        """The preset's config as a JSON-like dict."""
        from lopkit.benchmarks.base import get_benchmark

        return json.loads(json.dumps(_as_dict(get_benchmark("bitflip").make_config(preset))))


def _markdown(frame: pd.DataFrame) -> str:
    """A DataFrame as a markdown table (index as the first column)."""
    columns = [frame.index.name or "method", *map(str, frame.columns)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for index, row in frame.iterrows():
        lines.append("| " + " | ".join([str(index), *(str(v) for v in row.tolist())]) + " |")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments and write both markdown files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="/work/runs/e3", help="folder holding the E3 stores")
    parser.add_argument("--docs", default=str(Path(__file__).resolve().parents[1] / "docs"), help="output folder")
    parser.add_argument("--compare", default=None,
                        help="the `lopkit compare bitflip` store for compare_bitflip.md (default: RUNS/compare)")
    args = parser.parse_args()
    runs_dir, docs = Path(args.runs), Path(args.docs)
    head = ["# E3 bit-flipping: lopkit against the paper (generated by `scripts/results_e3.py`)", "",
            "Setup of the `paper` preset: the paper's code (teacher rule `spec_text`, m + 1 learner inputs with "
            "the constant column, zero biases, Kaiming-uniform fc1/fc2, online SGD lr 0.01, T = 10,000). "
            "Shorter than the paper's 5M steps where the table says so (CPU budget).", ""]
    body = head + width_section(runs_dir) + t5_section(runs_dir)
    (docs / "results_e3.md").write_text("\n".join(body) + "\n")
    (docs / "compare_bitflip.md").write_text("\n".join(compare_section(Path(args.compare) if args.compare else runs_dir / "compare")) + "\n")
    print(f"wrote {docs / 'results_e3.md'} and {docs / 'compare_bitflip.md'}")


if __name__ == "__main__":
    main()
