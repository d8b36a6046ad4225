"""Seed-steps/s of the continual MLP benchmarks: 1 seed, S seeds one after the other, S seeds vectorised.

For each benchmark preset (default: ``random_labels:e1``, ``class_split:e1_5way``, ``permuted:default``, all
with their Monitor and task-end evaluations on) it times ``--steps`` steps of

- ``1 seed``: one :class:`~lopkit.benchmarks.continual.ContinualBenchmark` run;
- ``S sequential``: S runs one after the other (what ``lopkit run --seeds S --no-vectorise`` does);
- ``S vectorised``: one :class:`~lopkit.benchmarks.vectorised_continual.VectorisedContinual` learner
  (what ``lopkit run --seeds S`` picks), the same rows within float rounding.

Building the benchmarks (loading and standardising Fashion-MNIST) is outside the timed part. Prints wall and
CPU seconds (the latter is what to compare on a shared, loaded machine), seed-steps/s and the ratio of the vectorised aggregate rate to one seed's (target: >= 3x for 8 seeds). With
``--profile`` it also prints the top of a cProfile of the vectorised run.

Usage: python benchmarks/vectorised_seeds_continual.py [--seeds 8] [--steps 600] [--threads 1]
       [--benchmarks random_labels:e1,class_split:e1_5way,permuted:default] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
import warnings

import torch

from lopkit.benchmarks.base import get_benchmark
from lopkit.benchmarks.vectorised_continual import VectorisedContinual

DEFAULT_BENCHMARKS = "random_labels:e1,class_split:e1_5way,permuted:default"


def _clock() -> tuple[float, float]:
    """(wall, this process's CPU) seconds."""
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    """Wall and CPU seconds since ``start``."""
    now = _clock()
    return now[0] - start[0], now[1] - start[1]


def _time_runs(cls, config, seeds: list[int], steps: int) -> tuple[float, float]:
    """Wall and CPU seconds to advance each seed's separate run by ``steps`` steps in turn (building untimed)."""
    wall = cpu = 0.0
    for seed in seeds:
        bench = cls(config, seed)
        start = _clock()
        bench.run(steps)
        took = _since(start)
        wall, cpu = wall + took[0], cpu + took[1]
        del bench
    return wall, cpu


def _time_vectorised(cls, config, seeds: list[int], steps: int, profile: bool) -> tuple[float, float]:
    """Wall and CPU seconds to advance one vectorised learner of ``seeds`` by ``steps`` steps (building untimed)."""
    group = VectorisedContinual(cls, [(config, seed) for seed in seeds])
    profiler = cProfile.Profile(time.process_time) if profile else None  # CPU time: robust to load
    start = _clock()
    if profiler is not None:
        profiler.enable()
    group.run(steps)
    if profiler is not None:
        profiler.disable()
    seconds = _since(start)
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
        print(text.getvalue())
    return seconds


def main() -> None:
    """Time the three variants for every benchmark and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=600, help="steps timed per run (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--benchmarks", default=DEFAULT_BENCHMARKS, help="NAME:PRESET,... (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides applied to every benchmark")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of each vectorised run")
    args = parser.parse_args()
    if args.seeds < 1 or args.steps < 1 or args.threads < 1:
        parser.error("--seeds, --steps and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # the Monitor's NaN-rank warnings on dead layers are expected
    from lopkit.configs import parse_overrides

    seeds = list(range(args.seeds))
    lines = []
    for item in args.benchmarks.split(","):
        name, _, preset = item.partition(":")
        cls = get_benchmark(name)
        config = cls.make_config(preset or "default", parse_overrides(args.overrides))
        cls(config, 99).run(20)  # warm-up: imports, data cache, allocator
        one = _time_runs(cls, config, seeds[:1], args.steps)
        sequential = _time_runs(cls, config, seeds, args.steps)
        vectorised = _time_vectorised(cls, config, seeds, args.steps, args.profile)
        for clock in (0, 1):  # wall, then CPU seconds
            rate_one = args.steps / one[clock]
            rate_vec = args.seeds * args.steps / vectorised[clock]
            lines.append(
                f"{name + ':' + (preset or 'default'):<22} {('wall', 'cpu')[clock]:<4} {one[clock]:8.2f} "
                f"{rate_one:9.0f}   {sequential[clock]:8.2f} {args.seeds * args.steps / sequential[clock]:9.0f}   "
                f"{vectorised[clock]:8.2f} {rate_vec:9.0f}   {rate_vec / rate_one:6.2f}x "
                f"{sequential[clock] / vectorised[clock]:6.2f}x"
            )
            print(lines[-1], flush=True)
    header = (f"{'benchmark':<22} {'time':<4} {'1 seed s':>8} {'steps/s':>9}   {f'{args.seeds} seq s':>8} "
              f"{'seed-st/s':>9}   {f'{args.seeds} vec s':>8} {'seed-st/s':>9}   {'vec/1':>7} {'vec/seq':>7}")
    print(f"\n{args.steps} steps per run, {args.seeds} seeds, {args.threads} thread(s), load average "
          f"{os.getloadavg()[0]:.2f} at the end; vec/1 = aggregate seed-steps/s of the vectorised learner over one "
          "seed's steps/s; wall = elapsed, cpu = this process's CPU time (robust to a shared machine)")
    print(header)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
