"""Write docs/results_e1.md (E1 targets T3/T4 beside the paper's figures) and docs/compare_e1.md from run stores.

Usage: ``python scripts/results_e1.py [--runs /work/runs/e1] [--docs docs] [--demo-csv out/demo/demo_metrics.csv]``

It reads, under ``--runs``:

- every ``compare*`` folder: ``lopkit compare random_labels --preset e1 ...`` stores (the E1 analogue; one
  comparison may be split over several folders by seed, they are pooled);
- ``class_split_5way``: ``lopkit run class_split --preset e1_5way ...`` (the harder class split), if present;

and the demo's CSV if present. Every number in the two files comes from those stores; nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

from lopkit.report.aggregate import config_labels, interval95
from lopkit.report.ranking import partial_grid_note, ranking_table
from lopkit.runner.store import ResultStore

#: How the methods are named in the markdown (the store's label -> what it is).
DISPLAY = {"sgd": "plain (no method; Adam)"}

E1_COMMAND = (
    "lopkit compare random_labels --preset e1 --methods none,batchnorm,layernorm,l2init,cbp,shrink_perturb,redo "
    "--seeds 5 --metric task_online_accuracy --out /work/runs/e1/compare --no-report  (1 thread: OMP_NUM_THREADS=1)"
)
SPLIT_COMMAND = "lopkit run class_split --preset e1_5way --set num_tasks=N --seeds 1 --out /work/runs/e1/class_split_5way --checkpoint-every 1000  (OMP_NUM_THREADS=1)"

DEFINITIONS = (
    "Definitions (the paper's code, Barriers `train_continual.py` / `src/utils/metrics.py`): **online accuracy** = "
    "`task_online_accuracy`, the running minibatch training accuracy over all steps of a task, argmax over all "
    "logits (random_labels has no class mask, so this is the paper's metric); **final train accuracy** = "
    "`task_final_train_accuracy`, eval mode on the task's 1000 images at its end; **dead fraction** = Monitor "
    "`dead_fraction` of the ReLU outputs `act1`..`act5` (a unit is dead when |h| < 1e-7 on more than 95 % of "
    "the 500 probe images), averaged over the five layers; **effective rank** = Monitor `effective_rank`, "
    "Shannon erank exp(H(sigma / sum sigma)) of the *uncentred* `act*` outputs on the probe, averaged over the "
    "five layers. Both diagnostics are the task-end measurement (after training on the task)."
)


def load_stores(folders: list[Path], finished_only: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Runs (finished ones only, unless told) and their metric rows from every store in ``folders`` (pooled)."""
    runs, metrics = [], []
    for folder in folders:
        if not (folder / "results.sqlite").exists():
            continue
        with ResultStore(folder) as store:
            found = store.runs()
            if finished_only:
                found = found[found["status"] == "finished"]
            if found.empty:
                continue
            runs.append(found)
            metrics.append(store.metrics(run_id=list(found["run_id"])))
    if not runs:
        return pd.DataFrame(), pd.DataFrame()
    runs_frame = pd.concat(runs, ignore_index=True).drop_duplicates("run_id")
    return runs_frame, pd.concat(metrics, ignore_index=True).drop_duplicates(["run_id", "step", "layer", "metric"])


def with_labels(runs: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Metric rows with a ``label`` column (the method, as the ranking names it)."""
    labels = config_labels(runs.set_index("run_id", drop=False))
    return metrics.assign(label=metrics["run_id"].map(labels))


def per_task_model(metrics: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One value per (label, seed, task) of a whole-model per-task metric."""
    rows = metrics[(metrics["layer"] == "model") & (metrics["metric"] == metric)]
    return rows.groupby(["label", "seed", "task"], as_index=False)["value"].last()


def per_task_layers(metrics: pd.DataFrame, metric: str, prefix: str = "act") -> pd.DataFrame:
    """Task-end value per (label, seed, task) of a Monitor metric, averaged over the ``act*`` layers."""
    rows = metrics[(metrics["metric"] == metric) & metrics["layer"].astype(str).str.startswith(prefix)]
    if rows.empty:
        return rows[["label", "seed", "task", "value"]]
    last = rows.groupby(["run_id", "task"])["step"].transform("max")
    rows = rows[rows["step"] == last]
    return rows.groupby(["label", "seed", "task"], as_index=False)["value"].mean()


def per_task_layer(metrics: pd.DataFrame, metric: str, layer: str) -> pd.DataFrame:
    """Task-end value per (label, seed, task) of a Monitor metric on one layer."""
    rows = metrics[(metrics["metric"] == metric) & (metrics["layer"] == layer)]
    last = rows.groupby(["run_id", "task"])["step"].transform("max")
    return rows[rows["step"] == last].groupby(["label", "seed", "task"], as_index=False)["value"].mean()


def name(label: str) -> str:
    """Display name of a method label."""
    return DISPLAY.get(label, label)


def fmt(value: float, digits: int = 2) -> str:
    """A number for a table cell ('–' for NaN)."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def ci(values: list[float], digits: int = 2) -> str:
    """``mean [low, high]`` over seeds (95 % t-interval)."""
    mean, low, high = interval95(values)
    return f"{fmt(mean, digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def curve_table(frame: pd.DataFrame, labels: list[str], digits: int = 2) -> list[str]:
    """Markdown table: one row per method, one column per task (mean over seeds)."""
    tasks = sorted(frame["task"].unique())
    lines = ["| method | seeds | " + " | ".join(f"t{t}" for t in tasks) + " |",
             "|---|---|" + "---|" * len(tasks)]
    for label in labels:
        part = frame[frame["label"] == label]
        if part.empty:
            continue
        means = part.groupby("task")["value"].mean()
        lines.append(f"| {name(label)} | {part['seed'].nunique()} | "
                     + " | ".join(fmt(means.get(t, math.nan), digits) for t in tasks) + " |")
    return lines


def window_change(frame: pd.DataFrame, label: str, window: int = 3) -> list[float]:
    """Per seed: mean of the first ``window`` tasks minus mean of the last ``window`` tasks."""
    out = []
    for _, part in frame[frame["label"] == label].groupby("seed"):
        values = part.sort_values("task")["value"].tolist()
        if len(values) >= 2 * window:
            out.append(sum(values[:window]) / window - sum(values[-window:]) / window)
    return out


def first_last(frame: pd.DataFrame, label: str, window: int = 3) -> tuple[list[float], list[float]]:
    """Per seed: mean of the first and of the last ``window`` tasks."""
    first, last = [], []
    for _, part in frame[frame["label"] == label].groupby("seed"):
        values = part.sort_values("task")["value"].tolist()
        if len(values) >= 2 * window:
            first.append(sum(values[:window]) / window)
            last.append(sum(values[-window:]) / window)
    return first, last


def e1_section(runs: pd.DataFrame, metrics: pd.DataFrame) -> list[str]:
    """T3 and T4 on the E1 analogue, beside the paper's figures."""
    metrics = with_labels(runs, metrics)
    labels = sorted(metrics["label"].unique(), key=lambda s: (s != "sgd", s))
    seeds = sorted(runs["seed"].unique().tolist())
    online = per_task_model(metrics, "task_online_accuracy")
    final = per_task_model(metrics, "task_final_train_accuracy")
    dead = per_task_layers(metrics, "dead_fraction")
    rank = per_task_layers(metrics, "effective_rank")
    config = json.loads(runs["config_json"].iloc[0])
    lines = [
        "## E1 analogue: `random_labels` preset `e1`",
        "",
        f"The paper's 5 x 128 ReLU MLP (no normalisation, no dropout), Adam lr {config['lr']:g} kept across tasks, "
        f"batch {config['batch_size']}, memorises {config['num_tasks']} random labellings of the same "
        f"{config['num_samples']} Fashion-MNIST images, {config['steps_per_task']} steps each. Paper: Tiny-ImageNet, "
        "40 tasks of 5 classes, ~10k steps each (section 4.2).",
        "",
        f"Command: `{E1_COMMAND}`. Seeds: {', '.join(map(str, seeds))} "
        f"({runs.groupby('method')['seed'].nunique().min()}-{runs.groupby('method')['seed'].nunique().max()} per method "
        "finished when this file was written). Cells are means over seeds; [a, b] are 95 % t-intervals.",
        "",
        DEFINITIONS,
        "",
    ]
    plain = "sgd"
    checks = []
    if plain in set(online["label"]):
        o_first, o_last = first_last(online, plain)
        d_first, d_last = first_last(dead, plain)
        r_first, r_last = first_last(rank, plain)
        f_first, f_last = first_last(final, plain)
        lines += [
            "### T3: symptoms of the plain network",
            "",
            "| quantity (plain network) | paper, MLP (Fig. 3.1/3.2) | lopkit: first 3 tasks | lopkit: last 3 tasks |",
            "|---|---|---|---|",
            f"| online training accuracy | ~0.90 -> ~0.35-0.40 | {ci(o_first)} | {ci(o_last)} |",
            f"| final train accuracy (end of task) | (not reported) | {ci(f_first)} | {ci(f_last)} |",
            f"| dead fraction (mean of act1..act5) | 0.20 -> ~0.53 | {ci(d_first)} | {ci(d_last)} |",
            f"| effective rank (mean of act1..act5) | 55-61 -> ~25 | {ci(r_first, 1)} | {ci(r_last, 1)} |",
            "",
        ]
        drop = window_change(online, plain)
        falls = [sum(1 for a, b in zip(v[:-1], v[1:]) if b < a) for _, g in online[online["label"] == plain].groupby("seed")
                 for v in [g.sort_values("task")["value"].tolist()]]
        checks.append(f"- T3 online accuracy falls: first-3 minus last-3 = {ci(drop)} over seeds "
                      f"({'met' if drop and min(drop) > 0 else 'NOT met on every seed'}); "
                      f"task-to-task decreases per seed: {falls} of {online['task'].nunique() - 1}.")
        d_rise = [b - a for a, b in zip(d_first, d_last)]
        r_fall = [a - b for a, b in zip(r_first, r_last)]
        checks.append(f"- T3 dead fraction rises by {ci(d_rise)} "
                      f"({'met' if d_rise and min(d_rise) > 0 else 'NOT met on every seed'}); effective rank falls by "
                      f"{ci(r_fall, 1)} ({'met' if r_fall and min(r_fall) > 0 else 'NOT met on every seed'}).")
        per_layer = []
        for layer in sorted({l for l in metrics["layer"].unique() if str(l).startswith("act")}):
            pd_first, pd_last = first_last(per_task_layer(metrics, "dead_fraction", layer), plain)
            pr_first, pr_last = first_last(per_task_layer(metrics, "effective_rank", layer), plain)
            per_layer.append(f"| {layer} | {ci(pd_first)} | {ci(pd_last)} | {ci(pr_first, 1)} | {ci(pr_last, 1)} |")
        lines += ["Per layer (plain network): where the trap is.", "",
                  "| layer | dead, first 3 tasks | dead, last 3 tasks | erank, first 3 | erank, last 3 |",
                  "|---|---|---|---|---|", *per_layer, ""]
    norms = [label for label in ("batchnorm", "layernorm") if label in set(online["label"])]
    if norms:
        lines += ["### T4: normalisation keeps rank up and dead units down", "",
                  "| method | paper (Fig. 4.1 / B.3, MLP) | online acc., last 3 tasks | dead, last 3 tasks | "
                  "effective rank, first 3 -> last 3 |", "|---|---|---|---|---|"]
        paper_t4 = {"batchnorm": "rank ~65-72 flat; dead ~0.0; train acc 0.94",
                    "layernorm": "rank ~65-72 flat; dead ~0.02; train acc 0.96"}
        for label in [plain, *norms]:
            o_first, o_last = first_last(online, label)
            d_first, d_last = first_last(dead, label)
            r_first, r_last = first_last(rank, label)
            paper = paper_t4.get(label, "rank -> ~25; dead 0.43 (whole-run mean); train acc 0.72")
            lines.append(f"| {name(label)} | {paper} | {ci(o_last)} | {ci(d_last)} | {ci(r_first, 1)} -> {ci(r_last, 1)} |")
            if label in norms:
                base_first, base_last = first_last(rank, plain)
                ok_rank = bool(r_last) and bool(base_last) and min(r_last) > max(base_last)
                ok_dead = bool(d_last) and max(d_last) < 0.1
                checks.append(f"- T4 {label}: effective rank at the end {ci(r_last, 1)} vs plain {ci(base_last, 1)} "
                              f"({'met' if ok_rank else 'NOT met on every seed'}); dead fraction at the end "
                              f"{ci(d_last)} ({'met (< 0.1 on every seed)' if ok_dead else 'NOT below 0.1 on every seed'}).")
        lines.append("")
    lines += ["### Verdict (computed from the stores)", "", *checks, ""]
    lines += ["### Per task (mean over seeds)", "", "Online training accuracy:", "",
              *curve_table(online, labels), "", "Dead fraction (mean of act1..act5, task end):", "",
              *curve_table(dead, labels), "", "Effective rank (mean of act1..act5, task end):", "",
              *curve_table(rank, labels, 1), ""]
    return lines


def split_section(folder: Path) -> list[str]:
    """What the harder class split (5-way, ~10k steps per task) showed, if it was run."""
    runs, metrics = load_stores([folder], finished_only=False)
    if runs.empty or metrics.empty:
        return ["## Harder class split: `class_split` preset `e1_5way`", "",
                f"Not run yet (no finished run in `{folder}`). Command: `{SPLIT_COMMAND}`.", ""]
    metrics = with_labels(runs, metrics)
    config = json.loads(runs["config_json"].iloc[0])
    names = {"task_online_accuracy_unmasked": "online accuracy, all logits (paper's metric)",
             "task_online_accuracy": "online accuracy, masked (task's classes)",
             "task_test_accuracy": "test accuracy (masked)",
             "task_final_train_accuracy": "final train accuracy (masked)"}
    command = SPLIT_COMMAND.replace("num_tasks=N", f"num_tasks={config['num_tasks']}")
    lines = ["## Harder class split: `class_split` preset `e1_5way`", "",
             f"5-way Fashion-MNIST tasks (two disjoint groups of 5 classes per cycle, reshuffled every cycle), shared "
             f"10-way head zeroed at every task, masked cross-entropy, Adam lr {config['lr']:g}, "
             f"{config['steps_per_task']} steps per task, {config['num_tasks']} tasks asked for (the preset has 40), "
             f"{int(runs['step'].max())} of {int(runs['total_steps'].max())} steps run (status: "
             f"{', '.join(sorted(runs['status'].unique()))}). Command: `{command}`; seeds "
             f"{', '.join(map(str, sorted(runs['seed'].unique())))}.", "",
             "| quantity | " + " | ".join(f"t{t}" for t in sorted(metrics['task'].unique())) + " |",
             "|---|" + "---|" * metrics["task"].nunique()]
    for metric, title in names.items():
        frame = per_task_model(metrics, metric)
        if frame.empty:
            continue
        means = frame.groupby("task")["value"].mean()
        lines.append(f"| {title} | " + " | ".join(fmt(means.get(t, math.nan), 3) for t in sorted(metrics["task"].unique())) + " |")
    for metric, title, digits in (("dead_fraction", "dead fraction (act mean, task end; latest for an unfinished task)", 2),
                                  ("effective_rank", "effective rank (act mean, task end; latest for an unfinished task)", 1)):
        frame = per_task_layers(metrics, metric)
        means = frame.groupby("task")["value"].mean()
        lines.append(f"| {title} | " + " | ".join(fmt(means.get(t, math.nan), digits) for t in sorted(metrics["task"].unique())) + " |")
    unmasked = per_task_model(metrics, "task_online_accuracy_unmasked")
    observed = (f"over the {unmasked['task'].nunique()} finished task(s) the paper's online accuracy ranged "
                f"{fmt(unmasked['value'].min(), 3)}-{fmt(unmasked['value'].max(), 3)}" if not unmasked.empty
                else "no task had finished when this file was written")
    lines += ["", "What it shows and does not: it is the paper's task shape (5 classes, ~10k Adam steps at lr 1e-3, "
              "head zeroed, masked loss, the paper's unmasked online accuracy beside the masked and test "
              "accuracies); " + observed + ". 5-way Fashion-MNIST tasks are much easier than 5-way Tiny-ImageNet "
              "for a 5 x 128 MLP, and the same two class groups recur (cycle of 2), so a few tasks on a CPU test "
              "the protocol, not the paper's 40-task decline; read the diagnostics row by row. The capacity-bound "
              "`random_labels` `e1` stream above is the E1 analogue that shows the decline.", ""]
    return lines


def demo_section(csv_path: Path, plain_folder: Path) -> list[str]:
    """The demo's per-task online accuracy (its CSV), and the plain network at the demo's settings on more seeds."""
    lines = []
    if csv_path.exists():
        frame = pd.read_csv(csv_path)
        online = frame[frame["metric"] == "online_accuracy"]
        lines += ["## The demo (`make demo`, `lopkit demo`)", "",
                  f"From `{csv_path}` (`lopkit demo --out out/demo`: seed 0, 12 tasks x 600 steps). Online training "
                  "accuracy per task:", "",
                  "| method | " + " | ".join(f"t{t}" for t in sorted(online["task"].unique())) + " | first 3 - last 3 |",
                  "|---|" + "---|" * (online["task"].nunique() + 1)]
        for method, part in online.groupby("method", sort=False):
            values = part.sort_values("task")["value"].tolist()
            change = sum(values[:3]) / 3 - sum(values[-3:]) / 3 if len(values) >= 6 else math.nan
            lines.append(f"| {method} | " + " | ".join(fmt(v) for v in values) + f" | {fmt(change)} |")
        lines.append("")
    runs, metrics = load_stores([plain_folder])
    if not runs.empty:
        online = per_task_model(with_labels(runs, metrics), "task_online_accuracy")
        lines += ["The plain network at the demo's settings on other seeds (`lopkit run random_labels --preset e1 "
                  "--set steps_per_task=600 monitor_metrics=dead_fraction,effective_rank --seed-list 1,2 "
                  f"--out {plain_folder}`):", "",
                  "| seed | " + " | ".join(f"t{t}" for t in sorted(online["task"].unique())) + " | first 3 - last 3 |",
                  "|---|" + "---|" * (online["task"].nunique() + 1)]
        for seed, part in online.groupby("seed"):
            values = part.sort_values("task")["value"].tolist()
            change = sum(values[:3]) / 3 - sum(values[-3:]) / 3 if len(values) >= 6 else math.nan
            lines.append(f"| {seed} | " + " | ".join(fmt(v) for v in values) + f" | {fmt(change)} |")
        lines.append("")
    return lines


def markdown_table(table: pd.DataFrame) -> list[str]:
    """A DataFrame (index = method) as markdown table lines."""
    header = ["method", *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in table.iterrows():
        lines.append("| " + " | ".join([str(index), *(str(v) for v in row.tolist())]) + " |")
    return lines


def compare_command(runs: pd.DataFrame, out: Path | None) -> str:
    """The ``lopkit compare`` command that wrote ``runs`` (methods and seeds read back from the store)."""
    if out is None or runs.empty:
        return E1_COMMAND
    methods = ",".join(sorted(runs["method"].unique(), key=lambda m: (m == "sgd", m)))
    seeds = sorted(int(s) for s in runs["seed"].unique())
    return (f"lopkit compare random_labels --preset e1 --methods {methods} --seeds "
            f"{','.join(map(str, seeds))} --metric task_online_accuracy --out {out} --threads 1 --no-report")


def compare_markdown(runs: pd.DataFrame, metrics: pd.DataFrame, out: Path | None = None,
                     unfinished: int = 0, failed: "pd.DataFrame | None" = None) -> list[str]:
    """The method comparison on the E1 analogue: ranking tables with 95 % intervals."""
    lines = ["# Method comparison on the E1 analogue (`random_labels`, preset `e1`)", "",
             "Generated by `scripts/results_e1.py` from the comparison stores; do not edit by hand.", "",
             f"Command: `{compare_command(runs, out)}`. Every method runs the same config, seeds and steps; `sgd` is "
             "the plain network (no method; the optimiser is Adam for every row, except `proper_adam`, which sets "
             "beta1 = beta2). Cells: mean [95 % t-interval] over seeds; the `seeds` column counts finished runs.", ""]
    lines += partial_grid_note(runs, unfinished, failed)
    if runs.empty:
        return lines + ["No finished run yet.", ""]
    for primary, words in (("task_online_accuracy:higher", "online training accuracy of the last task (the paper's "
                            "metric); auc = its mean over all tasks"),
                           ("task_final_train_accuracy:higher", "end-of-task train accuracy of the last task")):
        ranking = ranking_table(runs, metrics, primary, final_fraction=0.1, benchmark="random_labels")
        table = ranking.formatted(3)
        table.index = [name(i) for i in table.index]
        lines += [f"## Ranked by {primary.split(':')[0]} ({words})", "", *markdown_table(table), "", ranking.caption(), ""]
    labelled = with_labels(runs, metrics)
    online = per_task_model(labelled, "task_online_accuracy")
    lines += ["## Does each method keep learning? Online accuracy, first 3 tasks vs last 3 tasks", "",
              "| method | seeds | first 3 tasks | last 3 tasks | drop (first - last) |", "|---|---|---|---|---|"]
    order = sorted(online["label"].unique(), key=lambda s: (s != "sgd", s))
    for label in order:
        first, last = first_last(online, label)
        drop = [a - b for a, b in zip(first, last)]
        lines.append(f"| {name(label)} | {len(first)} | {ci(first)} | {ci(last)} | {ci(drop)} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    """Read the stores and write the two markdown files."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="/work/runs/e1", help="folder holding the compare*/ and class_split_5way/ stores")
    parser.add_argument("--docs", default="docs", help="where results_e1.md and compare_e1.md go")
    parser.add_argument("--demo-csv", default="out/demo/demo_metrics.csv", help="the demo's CSV (optional)")
    parser.add_argument("--compare", default=None,
                        help="the `lopkit compare` store for compare_e1.md (default: the compare*/ stores under --runs)")
    args = parser.parse_args(argv)
    root = Path(args.runs)
    if not root.is_dir():
        print(f"error: {root} is not a folder; pass --runs with the folder of the E1 stores", file=sys.stderr)
        return 2
    runs, metrics = load_stores(sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("compare")))
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    results = ["# E1 (continual learning) results: targets T3 and T4", "",
               "Generated by `scripts/results_e1.py` from the run stores; do not edit by hand. The paper's figures "
               "are from its section 4.2 (Tiny-ImageNet, GPU); lopkit's are CPU-sized analogues on Fashion-MNIST, "
               "so compare trends, not values.", ""]
    results += e1_section(runs, metrics) if not runs.empty else ["No finished E1 run found.", ""]
    results += split_section(root / "class_split_5way")
    results += demo_section(Path(args.demo_csv), root / "demo_plain600")
    (docs / "results_e1.md").write_text("\n".join(results))
    if args.compare:
        compare_dir = Path(args.compare)
        if not (compare_dir / "results.sqlite").exists():
            print(f"error: {compare_dir} holds no results.sqlite; pass --compare with a `lopkit compare --out` folder",
                  file=sys.stderr)
            return 2
        all_runs, _ = load_stores([compare_dir], finished_only=False)
        compare_runs, compare_metrics = load_stores([compare_dir])
        unfinished = int((~all_runs["status"].isin(["finished", "failed"])).sum()) if not all_runs.empty else 0
        failed = all_runs[all_runs["status"] == "failed"] if not all_runs.empty else None
        compare_lines = compare_markdown(compare_runs, compare_metrics, compare_dir, unfinished, failed)
    else:
        compare_lines = compare_markdown(runs, metrics)
    (docs / "compare_e1.md").write_text("\n".join(compare_lines))
    print(f"wrote {docs / 'results_e1.md'} and {docs / 'compare_e1.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
