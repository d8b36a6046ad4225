"""Wall time of S bit-flipping seeds trained in one vectorised process versus separate benchmark runs.

Part 1 (plain SGD; same rows up to float rounding, see :mod:`lopkit.benchmarks.vmap_seeds`):

- ``sequential``: S runs of the ``"bitflip"`` benchmark one after the other (its lean NumPy engine);
- ``seq autograd``: the same with the benchmark's generic autograd engine (what any learner would cost);
- ``vmap func``: one process, ``torch.func`` (``stack_module_state`` + ``vmap(grad_and_value(functional_call))``);
- ``vmap lean``: one process, the hand-written step batched over seeds in NumPy (``run_bitflip_seeds``);
- ``seed group``: :class:`~lopkit.benchmarks.vmap_seeds.BitFlipSeedGroup` (what ``lopkit run --seeds`` uses).

Part 2 (``--method``, default ``cbp``): learner-steps/s of ONE seed with the method (lean engine) and the
aggregate seed-steps/s of S seeds with it as one :class:`BitFlipSeedGroup`, best of ``--repeats`` interleaved
runs, and their ratio (issue 15 target: >= 3x for 8 seeds with CBP); below the target, the seed group's cProfile
top entries.

Single-threaded: ``torch.set_num_threads(1)`` and, when ``threadpoolctl`` is installed, one BLAS thread for
NumPy (a multi-threaded BLAS on a shared machine distorts the small products). The load average is printed.
``--record`` writes the figures (part 1: each variant's speed-up over sequential runs; part 2: the aggregate
ratio and its verdict) into the table of ``benchmarks/README.md`` (:mod:`_record`), keyed by seeds and width.

Usage: python benchmarks/throughput_vmap_seeds.py [--seeds 8] [--steps 10000] [--width 100] [--monitor-every 1000]
       [--method cbp] [--method-steps 5000] [--repeats 3] [--skip-plain] [--record]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
import warnings

import torch

from _record import add_record_argument, load, one_blas_thread, record

from lopkit.benchmarks.bitflip import BitFlipBenchmark
from lopkit.benchmarks.vmap_seeds import BitFlipSeedGroup, run_bitflip_seeds
from lopkit.mitigations.registry import build_methods

TARGET = 3.0


def plain_table(args: argparse.Namespace) -> dict[str, float]:
    """Part 1: the plain learner, sequential runs versus the vectorised engines; returns seconds per variant."""
    config = BitFlipBenchmark.make_config(
        "default", {"width": args.width, "num_steps": args.steps, "monitor_every": args.monitor_every}
    )
    seeds = list(range(args.seeds))
    BitFlipBenchmark(config, 99).run(200)  # warm-up (imports, allocator)
    start = time.perf_counter()
    for seed in seeds:
        BitFlipBenchmark(config, seed).run(config.num_steps)
    sequential = time.perf_counter() - start
    timings = {"sequential": sequential}
    autograd_config = BitFlipBenchmark.make_config(
        "default",
        {"width": args.width, "num_steps": args.steps, "monitor_every": args.monitor_every, "engine": "autograd"},
    )
    start = time.perf_counter()
    for seed in seeds:
        BitFlipBenchmark(autograd_config, seed).run(autograd_config.num_steps)
    timings["seq autograd"] = time.perf_counter() - start
    for engine in ("func", "lean"):
        start = time.perf_counter()
        run_bitflip_seeds(config, seeds, engine=engine)
        timings[f"vmap {engine}"] = time.perf_counter() - start
    group = BitFlipSeedGroup([BitFlipBenchmark(config, seed) for seed in seeds])
    start = time.perf_counter()
    group.run(config.num_steps)
    timings["seed group"] = time.perf_counter() - start

    seed_steps = args.seeds * args.steps
    print(f"{args.seeds} seeds x {args.steps} steps, width {args.width}, monitor every {args.monitor_every or 'never'}"
          f"; {load()}")
    print(f"{'variant':<12} {'seconds':>9} {'seed-steps/s':>13} {'speed-up':>9}")
    for name, seconds in timings.items():
        print(f"{name:<12} {seconds:9.2f} {seed_steps / seconds:13.0f} {sequential / seconds:8.2f}x")
    return timings


def method_table(args: argparse.Namespace) -> tuple[float, float]:
    """Part 2: one seed with the method versus S seeds with it as one seed group (Monitor off); returns both rates."""
    config = BitFlipBenchmark.make_config(
        "default", {"width": args.width, "num_steps": args.method_steps, "monitor_every": 0}
    )

    def bench(seed: int) -> BitFlipBenchmark:
        return BitFlipBenchmark(config, seed, build_methods(args.method))

    BitFlipSeedGroup([bench(90), bench(91)]).run(300)  # warm-up
    one = group = 0.0
    for _ in range(args.repeats):
        single = bench(0)
        start = time.perf_counter()
        single.run(config.num_steps)
        one = max(one, config.num_steps / (time.perf_counter() - start))
        together = BitFlipSeedGroup([bench(seed) for seed in range(args.seeds)])
        start = time.perf_counter()
        together.run(config.num_steps)
        group = max(group, args.seeds * config.num_steps / (time.perf_counter() - start))
    ratio = group / one
    print(f"\nmethod {args.method}, width {args.width}, {args.method_steps} steps, Monitor off, best of "
          f"{args.repeats}; {load()}")
    print(f"one seed (lean engine)      {one:9.0f} learner-steps/s")
    print(f"{args.seeds} seeds (seed group)      {group:9.0f} seed-steps/s (aggregate)")
    verdict = "met" if ratio >= TARGET else "MISSED"
    print(f"aggregate / one seed = {ratio:.2f}x (target >= {TARGET}x for 8 seeds: {verdict})")
    if ratio < TARGET:  # where the seed group's time goes
        together = BitFlipSeedGroup([bench(seed) for seed in range(args.seeds)])
        profiler = cProfile.Profile()
        profiler.enable()
        together.run(config.num_steps)
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
        print(out.getvalue())
    return one, group


def recorded_figures(args: argparse.Namespace, timings: dict[str, float] | None, rates: tuple[float, float] | None,
                     load_text: str) -> list[tuple[str, str]]:
    """The README rows ``(key, figure)`` of one run (``timings`` of part 1 and ``rates`` of part 2 when they ran)."""
    rows: list[tuple[str, str]] = []
    where = f"{args.seeds}seeds/width{args.width}"
    if timings:
        sequential = timings["sequential"]
        seed_steps = args.seeds * args.steps
        cells = [f"{name} {seed_steps / seconds:.0f} seed-steps/s ({sequential / seconds:.2f}x)"
                 for name, seconds in timings.items()]
        rows.append((f"throughput_vmap_seeds/plain/{where}",
                     f"{args.seeds} seeds x {args.steps} steps, Monitor every {args.monitor_every or 'never'}, x = "
                     f"speed-up over sequential lean runs: {'; '.join(cells)}; {load_text}"))
    if rates:
        one, group = rates
        ratio = group / one
        verdict = "met" if ratio >= TARGET else "MISSED"
        rows.append((f"throughput_vmap_seeds/{args.method}/{where}",
                     f"{args.seeds} seeds as one seed group {group:.0f} seed-steps/s vs one seed {one:.0f} "
                     f"learner-steps/s = {ratio:.2f}x (target >= {TARGET}x for 8 seeds: {verdict}); Monitor off, "
                     f"{args.method_steps} steps, best of {args.repeats}; {load_text}"))
    return rows


def main() -> None:
    """Print the plain table and the method table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument("--monitor-every", type=int, default=1000, help="0 turns the Monitor off")
    parser.add_argument("--method", default="cbp", help="method spec of part 2 (cbp, cbp_aggressive, ...)")
    parser.add_argument("--method-steps", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-plain", action="store_true", help="only part 2")
    add_record_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # dead-layer NaN warnings of the Monitor are expected
    print(f"threads 1 (torch; BLAS via threadpoolctl when installed); {load()} at start")
    with one_blas_thread():
        timings = None if args.skip_plain else plain_table(args)
        rates = method_table(args)
    if args.record:
        for key, figure in recorded_figures(args, timings, rates, load()):
            record(key, "throughput_vmap_seeds.py", figure, threads=1)


if __name__ == "__main__":
    main()
