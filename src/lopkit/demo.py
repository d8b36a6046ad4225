"""``lopkit demo``: watch a network lose the ability to learn, and cures keep it learning (about 2 minutes).

The demo runs lopkit's E1 analogue, the ``random_labels`` benchmark's ``e1`` preset: the paper's 5 x 128 ReLU
MLP, trained with the paper's optimiser (Adam, lr 1e-3, state kept across tasks), memorises a new random
labelling of the same 1000 Fashion-MNIST images at every task. The demo runs 12 tasks of 600 steps, twice the
preset's 300: the online accuracy averages a whole task, including its first steps from chance, so longer
tasks let the first tasks reach high online accuracy and make the decline plain (seed 0: 0.73 on the first
task, 0.21 on the last). A plain network learns each new labelling worse than the last; BatchNorm and
LayerNorm (lopkit's ``batchnorm``/``layernorm`` methods, the paper's cure) keep learning. Per method it
records, per task:

- ``online_accuracy``: the paper's metric, the running minibatch training accuracy over the task (argmax over
  all logits), and ``final_train_accuracy`` (eval mode, end of the task);
- the Monitor's ``dead_fraction`` and ``effective_rank`` (Shannon erank of the uncentred activations) of every
  hidden layer's ReLU output ``act1`` .. ``act5``, on a fixed probe of the task's images at the task end,
  per layer (``dead_fraction:act3``) and as the mean over the hidden layers (``dead_fraction``).

It prints the online accuracy per task, a per-layer diagnosis naming where the plain network is trapped, and
writes ``OUT/demo_metrics.csv`` (columns ``method, task, metric, value``) and ``OUT/demo.png``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Methods the demo runs by default: the plain network first, then the cures (lopkit method specs).
DEFAULT_METHODS = ("none", "batchnorm", "layernorm")

#: Readable legend labels of the method specs the demo knows; others are shown as written.
METHOD_LABELS = {
    "none": "plain MLP", "sgd": "plain MLP", "adam": "plain MLP", "baseline": "plain MLP",
    "layernorm": "+ LayerNorm", "batchnorm": "+ BatchNorm", "l2init": "+ L2-init", "cbp": "+ CBP",
    "shrink_perturb": "+ shrink & perturb", "redo": "+ ReDo",
}  # fmt: skip

#: Monitor metrics the demo records (kept few so the demo stays fast).
DEMO_MONITOR_METRICS = ("dead_fraction", "effective_rank")

#: The CSV's columns, in order.
CSV_COLUMNS = ("method", "task", "metric", "value")

#: Per-task model-level metrics: benchmark row name -> demo metric name.
_TASK_METRICS = {"task_online_accuracy": "online_accuracy", "task_final_train_accuracy": "final_train_accuracy"}


def method_label(spec: str) -> str:
    """Legend label of a method spec (e.g. ``layernorm`` -> ``+ LayerNorm``)."""
    return METHOD_LABELS.get(spec.strip().lower(), spec)


def demo_overrides(tasks: int, steps: int, samples: int) -> dict[str, Any]:
    """Overrides of the ``random_labels`` ``e1`` preset for the demo's task count, length and memorisation set."""
    return {
        "num_tasks": tasks, "steps_per_task": steps, "num_samples": samples,
        "probe_size": min(500, samples), "monitor_metrics": DEMO_MONITOR_METRICS, "monitor_layers": "activations",
    }  # fmt: skip


def run_method(spec: str, overrides: dict[str, Any], seed: int, threads: int = 1) -> list[dict[str, Any]]:
    """Run the E1 analogue with one method on ``threads`` torch threads; return the benchmark's tidy rows."""
    import torch

    from lopkit.benchmarks.base import get_benchmark
    from lopkit.mitigations.registry import build_methods

    torch.set_num_threads(threads)
    benchmark = get_benchmark("random_labels")
    config = benchmark.make_config("e1", overrides)
    run = benchmark(config, seed, build_methods(spec))
    return run.run(run.total_steps)


def tidy_rows(method: str, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Benchmark rows -> demo rows ``(method, task, metric, value)``: per-task accuracies and task-end diagnostics.

    Monitor metrics are taken at each task's last measurement (its end) for every ``act*`` layer, and also
    averaged over those layers under the bare metric name.
    """
    out: list[dict[str, Any]] = []
    ends: dict[tuple[int, str, str], tuple[int, float]] = {}
    for row in rows:
        if row["layer"] == "model" and row["metric"] in _TASK_METRICS:
            out.append({"method": method, "task": row["task"], "metric": _TASK_METRICS[row["metric"]],
                        "value": row["value"]})
        elif row["metric"] in DEMO_MONITOR_METRICS and str(row["layer"]).startswith("act"):
            key = (row["task"], row["layer"], row["metric"])
            if key not in ends or row["step"] >= ends[key][0]:
                ends[key] = (row["step"], row["value"])
    layer_values: dict[tuple[int, str], list[float]] = {}
    for (task, layer, metric), (_, value) in sorted(ends.items(), key=lambda kv: (kv[0][0], _layer_order(kv[0][1]))):
        out.append({"method": method, "task": task, "metric": f"{metric}:{layer}", "value": value})
        layer_values.setdefault((task, metric), []).append(value)
    for (task, metric), values in sorted(layer_values.items()):
        out.append({"method": method, "task": task, "metric": metric, "value": sum(values) / len(values)})
    return sorted(out, key=lambda r: (r["task"], r["metric"]))


def _layer_order(layer: str) -> tuple[int, str]:
    """Sort key putting act2 before act10."""
    digits = "".join(ch for ch in layer if ch.isdigit())
    return (int(digits) if digits else 0, layer)


def series(rows: Sequence[dict[str, Any]], method: str, metric: str) -> list[float]:
    """Values of one metric of one method, ordered by task."""
    picked = sorted((r["task"], r["value"]) for r in rows if r["method"] == method and r["metric"] == metric)
    return [value for _, value in picked]


def window_drop(values: Sequence[float], window: int = 3) -> float:
    """Mean of the first ``window`` values minus the mean of the last ``window`` (positive: it fell)."""
    if not values:
        return math.nan
    k = max(1, min(window, len(values) // 2 or 1))
    return sum(values[:k]) / k - sum(values[-k:]) / k


def diagnose(rows: Sequence[dict[str, Any]], method: str) -> list[str]:
    """Per-layer diagnosis lines of one method: dead fraction and effective rank, first task -> last task."""
    layers = sorted({r["metric"].split(":", 1)[1] for r in rows if r["method"] == method and ":" in r["metric"]},
                    key=_layer_order)
    lines = []
    for layer in layers:
        dead = series(rows, method, f"dead_fraction:{layer}")
        rank = series(rows, method, f"effective_rank:{layer}")
        if not dead or not rank:
            continue
        index = layer[3:] if layer.startswith("act") else ""
        name = f"fc{index}/{layer}" if index else layer
        lines.append(f"{name}: {100 * dead[-1]:.0f} % dead units (task 0: {100 * dead[0]:.0f} %), "
                     f"effective rank {rank[0]:.0f} -> {rank[-1]:.0f}")
    return lines


def trap_summary(rows: Sequence[dict[str, Any]], method: str) -> str:
    """One sentence naming the layer where the method's dead fraction rose most (the trap)."""
    best = None
    layers = {r["metric"].split(":", 1)[1] for r in rows if r["method"] == method and r["metric"].startswith("dead_fraction:")}
    for layer in layers:
        dead = series(rows, method, f"dead_fraction:{layer}")
        rank = series(rows, method, f"effective_rank:{layer}")
        rise = dead[-1] - dead[0]
        if best is None or rise > best[0]:
            best = (rise, layer, dead, rank)
    if best is None:
        return f"{method}: no layer diagnostics recorded"
    _, layer, dead, rank = best
    index = layer[3:] if layer.startswith("act") else ""
    name = f"fc{index}" if index else layer
    return (f"the trap: {name} ({layer}) ends with {100 * dead[-1]:.0f} % dead units "
            f"(task 0: {100 * dead[0]:.0f} %), effective rank {rank[0]:.0f} -> {rank[-1]:.0f}")


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write the demo rows as a tidy CSV with columns exactly ``method, task, metric, value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row[key] for key in CSV_COLUMNS})


def plot_demo(rows: Sequence[dict[str, Any]], methods: Sequence[str], path: Path, subtitle: str) -> None:
    """Three panels over tasks, one line per method: online accuracy, dead fraction, effective rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("online_accuracy", "Can it still learn?\nonline training accuracy on each new task"),
        ("dead_fraction", "Dead units (mean over hidden layers)\nfraction of ReLUs that output 0 on >95 % of probe images"),
        ("effective_rank", "Effective rank (mean over hidden layers)\nhow many directions the features use"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), dpi=110)
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for number, method in enumerate(methods):
        style = {"color": colors[number % len(colors)], "marker": "o", "markersize": 4,
                 "linewidth": 2.6 if number == 0 else 1.8, "label": method}
        for ax, (metric, _) in zip(axes, panels):
            values = series(rows, method, metric)
            ax.plot(range(len(values)), values, **style)
    for ax, (metric, title) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("task (a new random labelling of the same images)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if metric in ("online_accuracy", "dead_fraction"):
            ax.set_ylim(-0.02, 1)
        if metric == "effective_rank":
            ax.set_ylim(bottom=0)
    axes[0].axhline(0.1, color="grey", linestyle=":", linewidth=1)
    axes[0].text(len(series(rows, methods[0], "online_accuracy")) - 1, 0.12, "chance (10 classes)", color="grey",
                 fontsize=8, ha="right")
    axes[1].legend(fontsize=10, loc="upper left")  # the empty corner of the dead-unit panel
    fig.suptitle("Loss of plasticity: the plain network learns each new task worse; the cures keep learning\n"
                 + subtitle, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run_all(
    methods: Sequence[str], overrides: dict[str, Any], seed: int, jobs: int, threads: int = 1
) -> dict[str, list[dict[str, Any]]]:
    """Benchmark rows of every method, run in ``jobs`` spawned processes (in this process when jobs == 1)."""
    if jobs <= 1 or len(methods) == 1:
        return {spec: run_method(spec, overrides, seed, threads) for spec in methods}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # forking a process that already ran torch can deadlock
    with ProcessPoolExecutor(max_workers=min(jobs, len(methods)), mp_context=context) as pool:
        futures = {spec: pool.submit(run_method, spec, overrides, seed, threads) for spec in methods}
        return {spec: future.result() for spec, future in futures.items()}


def _check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the demo's arguments, as an error message (None when they are fine)."""
    for name in ("tasks", "steps", "samples", "jobs", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return f"--{name} must be >= 1, got {getattr(args, name)}"
    if args.tasks < 2:
        return f"--tasks must be >= 2 to show a trend, got {args.tasks}"
    if args.samples < 128:
        return f"--samples must be >= 128 (one batch of 128), got {args.samples}"
    if args.seed < 0:
        return f"--seed must be >= 0, got {args.seed}"
    if not [m for m in args.methods.split(",") if m.strip()]:
        return "--methods must name at least one method, e.g. none,layernorm"
    return None


def run_demo(args: argparse.Namespace) -> int:
    """Run every method, print accuracies and the per-layer diagnosis, write the CSV and the PNG."""
    from lopkit.configs import ConfigError
    from lopkit.data.errors import DatasetNotFoundError
    from lopkit.mitigations.registry import build_methods

    problem = _check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    jobs = args.jobs if args.jobs is not None else len(methods)
    overrides = demo_overrides(args.tasks, args.steps, args.samples)
    try:
        for spec in methods:
            build_methods(spec)
        from lopkit.benchmarks.base import get_benchmark

        get_benchmark("random_labels").make_config("e1", overrides)
        from lopkit.data.fashion_mnist import fashion_mnist_dir

        fashion_mnist_dir()
    except (ConfigError, DatasetNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    print(f"[demo] {len(methods)} methods x {args.tasks} tasks x {args.steps} Adam steps (lr 1e-3) on random labels "
          f"of {args.samples} Fashion-MNIST images, {jobs} process(es) ...", flush=True)
    threads = args.threads if args.threads is not None else 1  # each method's process: one thread by default
    raw = run_all(methods, overrides, args.seed, jobs, threads)
    labels = {spec: method_label(spec) for spec in methods}
    if len(set(labels.values())) < len(labels):
        labels = {spec: spec for spec in methods}
    rows = [row for spec in methods for row in tidy_rows(labels[spec], raw[spec])]
    names = [labels[spec] for spec in methods]
    print("\nonline training accuracy per task (the paper's metric):")
    for name in names:
        accuracy = series(rows, name, "online_accuracy")
        print(f"  {name:>20}: " + " ".join(f"{a:.2f}" for a in accuracy)
              + f"   (first 3 tasks - last 3: {window_drop(accuracy):+.2f})")
    for name in names:
        print(f"\n{name}: per-layer diagnosis (task-end probe of {overrides['probe_size']} images, ReLU outputs)")
        for line in diagnose(rows, name):
            print(f"  {line}")
    print(f"\n{names[0]}: {trap_summary(rows, names[0])}")
    out = Path(args.out)
    csv_path, png_path = out / "demo_metrics.csv", out / "demo.png"
    write_csv(rows, csv_path)
    subtitle = (f"5x128 ReLU MLP, Adam lr 1e-3, {args.tasks} tasks x {args.steps} steps, random labels of "
                f"{args.samples} Fashion-MNIST images, seed {args.seed}")
    plot_demo(rows, names, png_path, subtitle)
    elapsed = time.perf_counter() - start
    print(f"\n[demo] wrote {png_path} and {csv_path} in {elapsed:.0f} s")
    return 0


def register(subparsers) -> None:
    """Add the ``demo`` sub-command."""
    from lopkit.runner.cli_common import add_threads_flag

    parser = subparsers.add_parser(
        "demo", help="two-minute demo: a plain MLP loses the ability to learn, cures keep it; diagnosis + PNG",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated method specs, the plain one first (default {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--tasks", type=int, default=12, help="number of random labellings (default 12)")
    parser.add_argument("--steps", type=int, default=600, help="Adam steps per task (default 600)")
    parser.add_argument("--samples", type=int, default=1000, help="images to memorise (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes running methods in parallel (default: one per method, which balances 3 "
                             "methods over 2 cores better than 2 processes; 1 runs everything in this process)")
    parser.add_argument("--out", default="out/demo", help="folder for demo.png and demo_metrics.csv")
    add_threads_flag(parser)
    parser.set_defaults(func=run_demo)
