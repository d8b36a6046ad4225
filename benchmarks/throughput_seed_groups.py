"""Wall time of S seeds of ``toy`` and ``cloning`` trained one after the other versus as one vectorised learner.

For each benchmark: S separate runs (``Benchmark.run`` to the end, one after the other) and one seed group
(:class:`lopkit.benchmarks.toy.ToySeedGroup`, :class:`lopkit.benchmarks.cloning.CloningSeedGroup`: what
``lopkit run BENCHMARK --seeds S`` uses), construction excluded, best of ``--repeats``; prints both times and
the speed-up. Single-threaded (torch, and NumPy's BLAS via threadpoolctl when installed); the load average is
printed. ``--record`` writes one row per benchmark into the table of ``benchmarks/README.md`` (:mod:`_record`).

Usage: python benchmarks/throughput_seed_groups.py [--seeds 8] [--benchmarks toy,cloning] [--toy-preset paper]
       [--cloning-preset smoke] [--dataset digits] [--repeats 1] [--record]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from _record import add_record_argument, load, one_blas_thread, record

from lopkit.benchmarks.cloning import CloningBenchmark, CloningSeedGroup
from lopkit.benchmarks.toy import ToyBenchmark, ToySeedGroup

GROUPS = {"toy": (ToyBenchmark, ToySeedGroup), "cloning": (CloningBenchmark, CloningSeedGroup)}


def time_both(name: str, preset: str, overrides: dict, seeds: list[int], repeats: int) -> tuple[float, float, int]:
    """Best seconds of the separate runs and of the seed group, and the steps of one run."""
    cls, group_cls = GROUPS[name]
    config = cls.make_config(preset, overrides)
    separate = grouped = float("inf")
    for _ in range(repeats):
        benches = [cls(config, seed) for seed in seeds]
        start = time.perf_counter()
        for bench in benches:
            bench.run(bench.total_steps)
        separate = min(separate, time.perf_counter() - start)
        group = group_cls(cls, [(config, seed) for seed in seeds])
        start = time.perf_counter()
        group.run(group.total_steps)
        grouped = min(grouped, time.perf_counter() - start)
    return separate, grouped, benches[0].total_steps


def figure(name: str, preset: str, seeds: int, steps: int, separate: float, grouped: float, load_text: str) -> str:
    """The README figure of one benchmark's timing."""
    return (f"{name} preset {preset}, {seeds} seeds x {steps} steps: separate runs {separate:.2f} s, one seed group "
            f"{grouped:.2f} s = {separate / grouped:.2f}x ({seeds * steps / grouped:.0f} seed-steps/s); {load_text}")


def main() -> None:
    """Time every requested benchmark and print (and with --record write) the speed-ups."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--benchmarks", default="toy,cloning", help="comma-separated: toy, cloning")
    parser.add_argument("--toy-preset", default="paper")
    parser.add_argument("--cloning-preset", default="smoke")
    parser.add_argument("--dataset", default="digits", help="cloning dataset: digits (no download) or fashion_mnist")
    parser.add_argument("--repeats", type=int, default=1)
    add_record_argument(parser)
    args = parser.parse_args()
    names = [n for n in args.benchmarks.split(",") if n]
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # dead-unit NaN warnings of the Monitor are expected
    print(f"threads 1 (torch; BLAS via threadpoolctl when installed); {load()} at start")
    seeds = list(range(args.seeds))
    with one_blas_thread():
        for name in names:
            preset = args.toy_preset if name == "toy" else args.cloning_preset
            overrides = {"dataset": args.dataset} if name == "cloning" else {}
            separate, grouped, steps = time_both(name, preset, overrides, seeds, args.repeats)
            text = figure(name, preset + (f" ({args.dataset})" if name == "cloning" else ""), args.seeds, steps,
                          separate, grouped, load())
            print(text)
            if args.record:
                record(f"throughput_seed_groups/{name}/{args.seeds}seeds", "throughput_seed_groups.py", text,
                       threads=1)


if __name__ == "__main__":
    main()
