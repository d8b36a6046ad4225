"""Overhead of lopkit's Monitor on a training loop: ms/step without and with a Monitor, and their ratio.

Trains a 784-1000-1000-10 ReLU MLP with plain SGD on random data (random inputs and labels: the point is
the cost per step, not learning, so no dataset is needed). Each repeat runs the same number of steps twice
from the same initial weights: once without diagnostics and once with a Monitor that measures every default
metric (including the gradient-based ones, so a probe loss is given) on a fixed probe batch every ``--every``
steps. Repeats interleave the two variants to spread machine noise evenly. Target: ratio <= 1.05.

Both wall-clock time and process CPU time are reported. On a machine shared with other jobs the wall clock
mostly measures the neighbours; with ``--threads 1`` the CPU-time ratio is the steadier figure. Three ratio
estimates are printed, all of training time with / without the Monitor:

- ``ratio``: median ms/step of the runs with a Monitor over the median of the runs without (the plain
  definition; on a busy machine it moves with the load between runs),
- ``paired``: median over repeats of (with / without) for the two runs of the same repeat,
- ``in-run``: median over runs with a Monitor of total / (total - time inside the Monitor), which compares
  steps and measurements taken under the same load (it leaves out any slowdown of the training steps
  themselves after a measurement, e.g. from evicted caches).

The Monitor's default schedule computes the four rank metrics on every ``slow_every``-th (5th) periodic
measurement (``MonitorConfig.slow_every``); ``--slow-every 1`` gives the earlier figure with every metric at every
measurement. ``--threads 1,2`` runs the whole comparison at each thread count and prints a summary table;
``--profile`` adds a table of each metric's own cost per measurement; ``--record`` writes the summary into
``benchmarks/README.md``.

Usage: python benchmarks/monitor_overhead.py [--steps 1000] [--every 100] [--probe 512] [--batch 256] [--repeats 3]
       [--threads 1,2] [--slow-every N] [--profile] [--no-weight-layer-outputs] [--rank-max-samples N] [--record]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from _record import add_record_argument, record
from lopkit.diagnostics.errors import LopkitWarning
from lopkit.diagnostics.monitor import Monitor, MonitorConfig
from lopkit.diagnostics.rank import RANK_METRIC_NAMES


@dataclass
class Timing:
    """Wall-clock and process-CPU seconds of one piece of work."""

    wall: float = 0.0
    cpu: float = 0.0

    def __iadd__(self, other: "Timing") -> "Timing":
        self.wall += other.wall
        self.cpu += other.cpu
        return self


class Stopwatch:
    """Context manager measuring wall-clock and process CPU time together."""

    def __enter__(self) -> "Stopwatch":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timing = Timing(time.perf_counter() - self._wall, time.process_time() - self._cpu)


def make_model(seed: int) -> nn.Sequential:
    """The 784-1000-1000-10 ReLU MLP of the benchmark."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10))


def make_batches(count: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A pool of random (input, label) minibatches, made before timing starts."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(count)]


def train(steps: int, batches: list, monitor: Monitor | None, probe: tuple, model: nn.Module) -> tuple[Timing, Timing]:
    """Run ``steps`` SGD steps; return (time of the whole loop, time spent inside the Monitor)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    inside = Timing()
    with Stopwatch() as total:
        for step in range(steps):
            x, y = batches[step % len(batches)]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            if monitor is not None and step % monitor.config.every == 0:
                with Stopwatch() as measuring:
                    monitor.maybe_measure(probe[0], probe[1], loss_fn, step=step)
                inside += measuring.timing
    return total.timing, inside


def _fastest_measure_ms(model: nn.Module, probe: tuple, config: MonitorConfig, metrics: list[str] | None,
                        repeats: int) -> float:
    """Fastest CPU ms over ``repeats`` of one full ``measure`` call computing ``metrics`` (None: all)."""
    monitor = Monitor(model, metrics=metrics, config=config)
    loss_fn = nn.CrossEntropyLoss()
    runs = []
    for _ in range(repeats):
        with Stopwatch() as watch:
            monitor.measure(probe[0], probe[1], loss_fn)
        runs.append(watch.timing.cpu * 1e3)
    return min(runs)


def profile_metrics(model: nn.Module, probe: tuple, config: MonitorConfig, repeats: int = 5) -> dict[str, float]:
    """CPU ms per measurement: the probe pass alone (``probe pass``), each metric's own cost on top of it, the four
    rank metrics together (they share one Gram matrix and spectrum per layer) and every metric (``all``)."""
    names = sorted({m for layer in Monitor(model, config=config).layers for m in layer.metrics})
    base = _fastest_measure_ms(model, probe, config, ["loss"], repeats)
    timings: dict[str, float] = {"probe pass": base}
    for metric in names:
        timings[metric] = _fastest_measure_ms(model, probe, config, [metric], repeats) - base
    timings["rank metrics (4, shared)"] = _fastest_measure_ms(model, probe, config, list(RANK_METRIC_NAMES),
                                                              repeats) - base
    timings["all"] = _fastest_measure_ms(model, probe, config, None, repeats)
    return timings


def print_profile(timings: dict[str, float], config: MonitorConfig, step_ms: float) -> None:
    """Table: metric -> own CPU ms per measurement, and amortised over the slow-metric schedule."""
    print(f"CPU ms per measurement (fastest of 5; own cost = measure(metric) - probe pass; amortised = "
          f"per periodic measurement with slow_every={config.slow_every}):")
    print(f"  {'metric':<26} {'ms':>8} {'amortised':>10} {'steps':>6}")
    slow = set(config.slow_metrics)
    for metric, ms in timings.items():
        amortised = ms / config.slow_every if metric in slow or metric.startswith("rank metrics") else ms
        if metric == "all":
            continue
        print(f"  {metric:<26} {ms:8.1f} {amortised:10.1f} {amortised / step_ms:6.2f}")
    print(f"  {'all (every metric)':<26} {timings['all']:8.1f}")


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="training steps per run")
    parser.add_argument("--every", type=int, default=100, help="Monitor probe interval in steps")
    parser.add_argument("--probe", type=int, default=512, help="probe batch size")
    parser.add_argument("--batch", type=int, default=256, help="training batch size")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of (without, with)")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch.set_num_threads values (default 1,2)")
    parser.add_argument("--slow-every", type=int, default=MonitorConfig().slow_every,
                        help="MonitorConfig.slow_every: rank metrics on every N-th measurement (1: every time, the "
                             "earlier default; default: the config's)")
    parser.add_argument("--profile", action="store_true", help="also time each metric on its own (CPU time)")
    parser.add_argument(
        "--no-weight-layer-outputs",
        action="store_true",
        help="MonitorConfig(weight_layer_output_metrics=False): skip rank/duplicate metrics on Linear outputs",
    )
    parser.add_argument(
        "--rank-max-samples",
        type=int,
        default=MonitorConfig().rank_max_samples,
        help="MonitorConfig.rank_max_samples: rows fed to the rank and duplicate metrics (default: the config's)",
    )
    add_record_argument(parser)
    args = parser.parse_args()
    try:
        args.threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    except ValueError:
        parser.error(f"--threads takes comma-separated positive integers, e.g. 1,2; got {args.threads!r}")
    if not args.threads or min(args.threads) < 1 or args.slow_every < 1:
        parser.error("--threads and --slow-every must be positive integers")
    return args


def compare(args: argparse.Namespace, config: MonitorConfig, batches: list, probe: tuple) -> dict[str, float]:
    """Interleaved repeats without / with the Monitor; print them and return the CPU medians and ratios."""
    warm = make_model(0)  # first calls pay one-off allocation and kernel-selection costs
    train(20, batches, Monitor(warm, config=MonitorConfig(every=10)), probe, warm)

    per_step: dict[str, list[Timing]] = defaultdict(list)
    per_measure: list[Timing] = []
    in_run: list[Timing] = []  # total / (total - inside the Monitor) of each run with a Monitor
    for repeat in range(args.repeats):
        for variant in (["without", "with"] if repeat % 2 == 0 else ["with", "without"]):
            model = make_model(seed=repeat)
            monitor = Monitor(model, config=config) if variant == "with" else None
            total, inside = train(args.steps, batches, monitor, probe, model)
            per_step[variant].append(Timing(total.wall * 1e3 / args.steps, total.cpu * 1e3 / args.steps))
            if monitor is not None:
                n = len({r["step"] for r in monitor.rows})
                per_measure.append(Timing(inside.wall * 1e3 / n, inside.cpu * 1e3 / n))
                in_run.append(Timing(total.wall / (total.wall - inside.wall), total.cpu / (total.cpu - inside.cpu)))
            last = per_step[variant][-1]
            print(f"  repeat {repeat} {variant:>7}: {last.wall:7.2f} ms/step wall, {last.cpu:7.2f} ms/step cpu")

    print(f"medians over {args.repeats} repeats ({-(-args.steps // args.every)} measurements per run):")
    summary: dict[str, float] = {}
    for clock in ("wall", "cpu"):
        without = statistics.median(getattr(t, clock) for t in per_step["without"])
        with_monitor = statistics.median(getattr(t, clock) for t in per_step["with"])
        measure = statistics.median(getattr(t, clock) for t in per_measure)
        paired = statistics.median(
            getattr(w, clock) / getattr(wo, clock) for w, wo in zip(per_step["with"], per_step["without"])
        )
        inside_ratio = statistics.median(getattr(t, clock) for t in in_run)
        print(f"  {clock:>4}: without {without:6.2f} ms/step, with {with_monitor:6.2f} ms/step, "
              f"one measurement {measure:7.1f} ms = {measure / without:4.1f} steps; "
              f"ratio {with_monitor / without:.3f}, paired {paired:.3f}, in-run {inside_ratio:.3f} (target <= 1.05)")
        if clock == "cpu":
            summary = {"step_ms": without, "measure_ms": measure, "ratio": with_monitor / without,
                       "paired": paired, "in_run": inside_ratio}
    return summary


def main() -> None:
    """For each thread count: interleaved repeats, ms/step (wall and CPU), measurement cost, ratios; a summary."""
    args = parse_args()
    warnings.simplefilter("ignore", LopkitWarning)  # e.g. "dropped constant units": informative, not timing
    config = MonitorConfig(
        every=args.every,
        weight_layer_output_metrics=not args.no_weight_layer_outputs,
        rank_max_samples=args.rank_max_samples,
        slow_every=args.slow_every,
    )
    batches = make_batches(min(args.steps, 50), args.batch, seed=1)
    g = torch.Generator().manual_seed(2)
    probe = (torch.randn(args.probe, 784, generator=g), torch.randint(0, 10, (args.probe,), generator=g))
    print(f"torch {torch.__version__}, random data (no dataset needed)")
    print(f"steps={args.steps} every={args.every} probe={args.probe} batch={args.batch} repeats={args.repeats} "
          f"weight_layer_output_metrics={config.weight_layer_output_metrics} rank_max_samples={config.rank_max_samples} "
          f"slow_every={config.slow_every} (slow metrics: {', '.join(config.slow_metrics)})")
    results: dict[int, dict[str, float]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"--- {threads} thread(s), load average {load:.1f}")
        results[threads] = compare(args, config, batches, probe)
        results[threads]["load"] = load
        if args.profile:
            print_profile(profile_metrics(make_model(0), probe, config), config, results[threads]["step_ms"])

    print(f"summary (CPU time, median of {args.repeats}; slow_every={config.slow_every}):")
    print(f"  {'threads':>7} {'load':>5} {'ms/step':>8} {'measure ms':>10} {'steps':>6} {'ratio':>6} {'paired':>7} "
          f"{'in-run':>7}")
    for threads, r in results.items():
        print(f"  {threads:>7} {r['load']:5.1f} {r['step_ms']:8.2f} {r['measure_ms']:10.1f} "
              f"{r['measure_ms'] / r['step_ms']:6.2f} {r['ratio']:6.3f} {r['paired']:7.3f} {r['in_run']:7.3f}")
        if args.record:
            variant = "default" if config.slow_every == MonitorConfig().slow_every else f"slow_every={config.slow_every}"
            if not config.weight_layer_output_metrics or config.rank_max_samples != MonitorConfig().rank_max_samples:
                variant += "-custom"
            record(f"monitor_overhead/{variant}/{threads}t", "monitor_overhead.py",
                   f"overhead ratio {r['ratio']:.3f} (paired {r['paired']:.3f}, in-run {r['in_run']:.3f}; CPU time, "
                   f"median of {args.repeats}); one measurement {r['measure_ms']:.0f} ms = "
                   f"{r['measure_ms'] / r['step_ms']:.1f} steps of {r['step_ms']:.1f} ms",
                   threads=threads)


if __name__ == "__main__":
    main()
