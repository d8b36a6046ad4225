"""Seed-steps/s of the continual MLP/CNN benchmarks: 1 seed, S seeds one after the other, S seeds vectorised.

For each benchmark preset (default: ``random_labels:e1``, ``class_split:e1_5way``, ``permuted:default`` and the
smoke-sized CNN ``class_split:smoke:model=cnn+num_tasks=20``, all with their Monitor and task-end evaluations on;
``NAME:PRESET[:KEY=VALUE+KEY=VALUE...]`` adds overrides to one entry) it times ``--steps`` steps (at most the
run's length) of

- ``1 seed``: one :class:`~lopkit.benchmarks.continual.ContinualBenchmark` run;
- ``S sequential``: S runs one after the other (what ``lopkit run --seeds S --no-vectorise`` does);
- ``S vectorised``: one :class:`~lopkit.benchmarks.vectorised_continual.VectorisedContinual` learner
  (what ``lopkit run --seeds S`` picks), the same rows within float rounding.

Building the benchmarks (loading and standardising Fashion-MNIST) is outside the timed part. Prints wall and
CPU seconds (the latter is what to compare on a shared, loaded machine), seed-steps/s and the ratio of the
vectorised aggregate rate to one seed's (target: >= 3x for 8 seeds), and the load average at the start and the
end. With ``--profile`` it also prints the top of a cProfile of the vectorised run; ``--record`` writes each
benchmark's ratios into the table of benchmarks/README.md (via ``benchmarks/_record.py``).

``--workers W`` measures the command line instead, end to end by wall clock (Python start-up, data loading and
spawning the workers included), each time into a fresh temporary OUT: ``lopkit run NAME --preset PRESET --seeds S
--workers W --threads THREADS`` (S seeds in W processes) against ``lopkit run NAME --preset PRESET --seed-list 0
--threads W*THREADS`` (one seed given the same cores) and ``--threads THREADS`` (on a busy machine extra intra-op
threads can slow one seed down), and prints the aggregate seed-steps/s of each (steps read from the store) and
the ratio against the faster one-seed run, with the 3x target. Its default entries keep the 8-seed command to
about 1-2 minutes on an idle 2-core machine (fewer tasks for the longer presets); ``--startup`` also times each
command cut to one step (Python start-up, data loading, spawning the workers) and prints the ratio without that
fixed cost. ``--steps`` and ``--profile`` do not apply.

Usage: python benchmarks/vectorised_seeds_continual.py [--seeds 8] [--steps 600] [--threads 1]
       [--benchmarks random_labels:e1,class_split:e1_5way,permuted:default,class_split:smoke:model=cnn+num_tasks=20]
       [--set KEY=VALUE ...] [--profile] [--record]
       python benchmarks/vectorised_seeds_continual.py --workers 2 [--seeds 8] [--threads 1] [--benchmarks ...]
       [--startup]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _record import add_record_argument, load, record

from lopkit.benchmarks.base import get_benchmark
from lopkit.benchmarks.vectorised_continual import VectorisedContinual
from lopkit.configs import parse_overrides

DEFAULT_BENCHMARKS = "random_labels:e1,class_split:e1_5way,permuted:default,class_split:smoke:model=cnn+num_tasks=20"
#: ``--workers`` mode: the continual MLPs, cut to a few thousand steps per run (~1-2 minutes per measurement).
WORKERS_BENCHMARKS = ("random_labels:e1,class_split:e1_5way:num_tasks=1+steps_per_task=3600,"
                      "permuted:default:num_tasks=2+steps_per_task=1800")
#: ``--startup``: overrides that cut a command to its fixed costs (one task of one step).
STARTUP_SET = ["num_tasks=1", "steps_per_task=1"]


def _clock() -> tuple[float, float]:
    """(wall, this process's CPU) seconds."""
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    """Wall and CPU seconds since ``start``."""
    now = _clock()
    return now[0] - start[0], now[1] - start[1]


def parse_entry(item: str) -> tuple[str, str, list[str]]:
    """``NAME:PRESET[:KEY=VALUE+KEY=VALUE...]`` -> (name, preset, overrides)."""
    name, _, rest = item.partition(":")
    preset, _, extra = rest.partition(":")
    return name, preset or "default", [part for part in extra.split("+") if part]


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


def _lopkit_run(arguments: list[str]) -> tuple[float, float, int, int]:
    """Run ``lopkit run ARGUMENTS --out TMP`` in a fresh process: (wall s, CPU s of it and its workers, runs, seed-steps).

    The seed-steps are the ``total_steps`` of the finished runs in the store it wrote (a failed run stops the script).
    """
    import lopkit
    from lopkit.runner.store import ResultStore

    env = dict(os.environ, LOPKIT_PROGRESS="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(lopkit.__file__).resolve().parents[1]),
                                                    env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory(prefix="lopkit-workers-") as out:
        command = [sys.executable, "-m", "lopkit.cli", "run", *arguments, "--out", out, "--no-progress"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
        with ResultStore(out) as store:
            runs = store.runs()
        if set(runs["status"]) != {"finished"}:
            raise SystemExit(f"not every run finished: {runs[['seed', 'status']].values.tolist()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, len(runs), int(runs["total_steps"].sum())


def main_workers(args: argparse.Namespace) -> None:
    """``--workers W``: ``lopkit run --seeds S --workers W`` against one seed on the same cores, end to end by wall clock."""
    all_threads = args.workers * args.threads
    print(f"{args.seeds} seeds as {args.workers} workers x {args.threads} thread(s) vs 1 seed at {all_threads} "
          f"thread(s) (and at {args.threads}, which a busy machine may favour), end to end by wall clock; "
          f"{load()} at the start", flush=True)
    lines, figures = [], []
    for item in (args.benchmarks or WORKERS_BENCHMARKS).split(","):
        name, preset, extra = parse_entry(item)
        overrides = [*args.overrides, *extra]
        common = [name, "--preset", preset, *(["--set", *overrides] if overrides else [])]
        variants = [(f"1 seed, --threads {threads}", ["--seed-list", "0", "--threads", str(threads)])
                    for threads in dict.fromkeys((all_threads, args.threads))]
        variants.append((f"{args.seeds} seeds, --workers {args.workers} --threads {args.threads}",
                         ["--seeds", str(args.seeds), "--workers", str(args.workers), "--threads", str(args.threads)]))
        timed, trained = [], []
        lines.append(f"{item}  (lopkit run {' '.join(common)} ...)")
        print(lines[-1], flush=True)
        for what, extra_args in variants:
            wall, cpu, runs, seed_steps = _lopkit_run([*common, *extra_args])
            timed.append((what, wall, seed_steps))
            lines.append(f"  {what:<40} {seed_steps // runs:6d} steps/run {runs:3d} run(s)  wall {wall:7.1f} s  "
                         f"cpu {cpu:7.1f} s  {seed_steps / wall:8.1f} seed-steps/s")
            print(lines[-1], flush=True)
            if args.startup:  # the same command cut to one task of one step: start-up, data loading, spawning
                fixed = _lopkit_run([name, "--preset", preset, "--set", *overrides, *STARTUP_SET, *extra_args])
                left = wall - fixed[0]
                trained.append((what, left, seed_steps - fixed[3]))
                rate = f"{(seed_steps - fixed[3]) / left:8.1f} seed-steps/s" if left > 0 else \
                    "n/a (no longer than its start-up: a longer run is needed)"
                lines.append(f"  {'':<40} start-up (a 1-step run): wall {fixed[0]:7.1f} s  cpu {fixed[1]:7.1f} s; "
                             f"without it {rate}")
                print(lines[-1], flush=True)
        for label, measured in (("ratio", timed), ("without start-up", trained)):
            if not measured or min(wall for _, wall, _ in measured) <= 0:
                continue
            rate = measured[-1][2] / measured[-1][1]
            ratios = [(what, rate / (seed_steps / wall)) for what, wall, seed_steps in measured[:-1]]
            worst = min(ratio for _, ratio in ratios)  # against the faster one-seed run
            lines.append(f"  {label}: " + ", ".join(f"{ratio:.2f}x vs {what}" for what, ratio in ratios)
                         + f"; against the faster one: {worst:.2f}x (target >= 3x: {'met' if worst >= 3 else 'missed'})")
            print(lines[-1], flush=True)
            if label == "ratio":
                rate_many, end_to_end = rate, (ratios, worst)
        ratios, worst = end_to_end
        singles = [(what, seed_steps / wall) for what, wall, seed_steps in timed[:-1]]  # the one-seed rates
        figures.append((item, timed[-1][2] // args.seeds, rate_many, ratios, worst, singles))  # end to end
    print(f"\n{load()} at the end; wall/cpu = seconds of the whole command (Python start-up, data loading and the "
          "workers' start-up included; cpu counts the workers); steps per run read from the store; ratio = "
          f"aggregate seed-steps/s of the {args.seeds} seeds over one seed's steps/s\n")
    print("\n".join(lines))
    if args.record:
        for item, steps, rate_many, ratios, worst, singles in figures:
            record(f"run_workers/{item}/{args.seeds}seeds/{args.workers}x{args.threads}t",
                   "vectorised_seeds_continual.py",
                   f"{worst:.2f}x wall end to end ({', '.join(f'{r:.2f}x vs {w}' for w, r in ratios)}): "
                   f"lopkit run --seeds {args.seeds} --workers {args.workers} --threads {args.threads} "
                   f"{rate_many:.0f} seed-steps/s ({steps} steps per run); "
                   + ", ".join(f"{what} {rate:.1f} steps/s" for what, rate in singles),
                   threads=args.threads)


def main() -> None:
    """Time the three variants for every benchmark and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=600, help="steps timed per run (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--benchmarks", default=None,
                        help=f"NAME:PRESET[:KEY=VALUE+...],... (default: {DEFAULT_BENCHMARKS}; with --workers: "
                             f"{WORKERS_BENCHMARKS})")
    parser.add_argument("--workers", type=int, default=0, metavar="W",
                        help="time 'lopkit run --seeds S --workers W' against one seed end to end instead (0: off)")
    parser.add_argument("--startup", action="store_true",
                        help="with --workers: also time each command cut to one step (its start-up) and print the "
                             "rates and ratio without it")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides applied to every benchmark")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of each vectorised run")
    add_record_argument(parser)
    args = parser.parse_args()
    if args.seeds < 1 or args.steps < 1 or args.threads < 1 or args.workers < 0:
        parser.error("--seeds, --steps and --threads must be >= 1, --workers >= 0")
    if args.workers:
        main_workers(args)
        return
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # the Monitor's NaN-rank warnings on dead layers are expected
    print(f"{args.seeds} seeds, {args.threads} thread(s), {load()} at the start", flush=True)
    seeds = list(range(args.seeds))
    lines, figures = [], []
    for item in (args.benchmarks or DEFAULT_BENCHMARKS).split(","):
        name, preset, extra = parse_entry(item)
        label = item if extra else f"{name}:{preset}"
        cls = get_benchmark(name)
        config = cls.make_config(preset, parse_overrides([*args.overrides, *extra]))
        steps = min(args.steps, cls(config, 99).total_steps)
        cls(config, 99).run(min(20, steps))  # warm-up: imports, data cache, allocator
        one = _time_runs(cls, config, seeds[:1], steps)
        sequential = _time_runs(cls, config, seeds, steps)
        vectorised = _time_vectorised(cls, config, seeds, steps, args.profile)
        ratios = []
        for clock in (0, 1):  # wall, then CPU seconds
            rate_one = steps / one[clock]
            rate_vec = args.seeds * steps / vectorised[clock]
            ratios.append((rate_one, rate_vec, rate_vec / rate_one, sequential[clock] / vectorised[clock]))
            lines.append(
                f"{label:<40} {('wall', 'cpu')[clock]:<4} {steps:5d} {one[clock]:8.2f} {rate_one:9.0f}   "
                f"{sequential[clock]:8.2f} {args.seeds * steps / sequential[clock]:9.0f}   "
                f"{vectorised[clock]:8.2f} {rate_vec:9.0f}   {rate_vec / rate_one:6.2f}x "
                f"{sequential[clock] / vectorised[clock]:6.2f}x"
            )
            print(lines[-1], flush=True)
        figures.append((label, steps, ratios))
    header = (f"{'benchmark':<40} {'time':<4} {'steps':>5} {'1 seed s':>8} {'steps/s':>9}   "
              f"{f'{args.seeds} seq s':>8} {'seed-st/s':>9}   {f'{args.seeds} vec s':>8} {'seed-st/s':>9}   "
              f"{'vec/1':>7} {'vec/seq':>7}")
    print(f"\n{args.seeds} seeds, {args.threads} thread(s), {load()} at the end; vec/1 = aggregate seed-steps/s of "
          "the vectorised learner over one seed's steps/s; wall = elapsed, cpu = this process's CPU time (robust to "
          "a shared machine)")
    print(header)
    print("\n".join(lines))
    if args.record:
        for label, steps, ratios in figures:
            (wall_one, wall_vec, wall_ratio, wall_seq), (rate_one, rate_vec, cpu_ratio, cpu_seq) = ratios
            record(f"vectorised_seeds_continual/{label}/{args.seeds}seeds/{args.threads}t",
                   "vectorised_seeds_continual.py",
                   f"vec/1 {cpu_ratio:.2f}x CPU time ({wall_ratio:.2f}x wall), vec/seq {cpu_seq:.2f}x: "
                   f"{args.seeds} vectorised seeds {wall_vec:.0f} seed-steps/s vs 1 seed {wall_one:.0f} steps/s by "
                   f"wall clock, {rate_vec:.0f} vs {rate_one:.0f} per CPU second (which counts every thread; "
                   f"{steps} steps per run)",
                   threads=args.threads)


if __name__ == "__main__":
    main()
