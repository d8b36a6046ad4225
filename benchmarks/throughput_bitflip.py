"""Steps per second of the bit-flipping benchmark: engines with the Monitor on and off, and each method in the lean engine.

Part 1 times the ``lean`` engine (hand-written NumPy step) and the ``autograd`` engine (generic loop calling the
mitigation hooks) without a method, with the Monitor measuring every ``--monitor-every`` steps and with it off.
Part 2 times plain SGD and each method (``cbp``, ``cbp_aggressive``, ``redo``, ``l2``, ``l2init``,
``shrink_perturb``, ``noisy_sgd``: their lean kernels, :mod:`lopkit.benchmarks.bitflip_lean`) in the same
process, Monitor off, best of ``--repeats`` interleaved runs, and prints each rate and its ratio to plain SGD
(issue 15 target: ``cbp`` >= 0.5x). When ``cbp`` misses the target its cProfile top entries are printed.
Single-threaded (torch, and NumPy's BLAS via threadpoolctl when installed); the load average is printed.
``--record`` writes the figures (engine rates, per-method rates and ratios, the cbp verdict) into the table of
``benchmarks/README.md`` (:mod:`_record`), one row per figure keyed by the width.

Usage: python benchmarks/throughput_bitflip.py [--steps 50000] [--width 100] [--monitor-every 1000]
       [--method-steps 20000] [--methods cbp,redo] [--skip-engines] [--record]
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
from lopkit.mitigations.registry import build_methods

METHODS = ("cbp", "cbp_aggressive", "redo", "l2", "l2init", "shrink_perturb", "noisy_sgd")
CBP_TARGET = 0.5


def make_bench(width: int, steps: int, monitor_every: int, engine: str, method: str = "sgd") -> BitFlipBenchmark:
    """The ``default`` preset at ``width`` for ``steps`` steps with ``method`` (``sgd``: none)."""
    config = BitFlipBenchmark.make_config(
        "default", {"width": width, "num_steps": steps, "monitor_every": monitor_every, "engine": engine}
    )
    return BitFlipBenchmark(config, 0, None if method == "sgd" else build_methods(method))


def steps_per_second(width: int, steps: int, monitor_every: int, engine: str, method: str = "sgd") -> float:
    """Online SGD steps per second of one run (construction excluded)."""
    bench = make_bench(width, steps, monitor_every, engine, method)
    start = time.perf_counter()
    bench.run(steps)
    return steps / (time.perf_counter() - start)


def profile_top(width: int, steps: int, method: str, entries: int = 15) -> str:
    """cProfile's top entries (internal time) of one lean run of ``method``."""
    bench = make_bench(width, steps, 0, "auto", method)
    profiler = cProfile.Profile()
    profiler.enable()
    bench.run(steps)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(entries)
    return out.getvalue()


def main() -> None:
    """Print the engine table and the per-method table with ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument("--monitor-every", type=int, default=1000)
    parser.add_argument("--autograd-steps", type=int, default=None, help="steps for the slow engine (default steps/5)")
    parser.add_argument("--method-steps", type=int, default=20_000, help="steps per method run")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated method specs")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per method (best is kept)")
    parser.add_argument("--skip-engines", action="store_true", help="only the per-method table")
    add_record_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # dead-layer NaN warnings of the Monitor are expected
    with one_blas_thread():
        results = run(args)
    if args.record:
        for key, figure in recorded_figures(results, args.width, args.monitor_every, args.method_steps, args.repeats):
            record(key, "throughput_bitflip.py", figure, threads=1)


def recorded_figures(results: dict, width: int, monitor_every: int, method_steps: int, repeats: int
                     ) -> list[tuple[str, str]]:
    """The README rows ``(key, figure)`` of one run's ``results`` (see :func:`run`); parts that did not run give none."""
    rows: list[tuple[str, str]] = []
    engines = results.get("engines") or {}
    if engines:
        cells = [f"{engine} {rate:.0f} steps/s (Monitor {'on' if every else 'off'})"
                 for (engine, every), rate in engines.items()]
        rows.append((f"throughput_bitflip/engines/width{width}",
                     f"{'; '.join(cells)}; Monitor every {monitor_every} steps when on; {results['load']}"))
    methods = results.get("methods") or {}
    plain = methods.get("sgd")
    if plain and len(methods) > 1:
        cells = [f"{name} {rate:.0f} ({rate / plain:.2f}x)" for name, rate in methods.items() if name != "sgd"]
        rows.append((f"throughput_bitflip/methods/width{width}",
                     f"learner-steps/s (x plain {plain:.0f}), lean kernels, Monitor off, {method_steps} steps, best "
                     f"of {repeats}: {'; '.join(cells)}; {results['load']}"))
    if plain and "cbp" in methods:
        ratio = methods["cbp"] / plain
        verdict = "met" if ratio >= CBP_TARGET else "MISSED"
        rows.append((f"throughput_bitflip/cbp_ratio/width{width}",
                     f"cbp / plain = {ratio:.2f} (target >= {CBP_TARGET}: {verdict}); {results['load']}"))
    return rows


def run(args: argparse.Namespace) -> dict:
    """The two tables (see the module docstring); returns ``{"engines": {(engine, monitor_every): steps/s},
    "methods": {method: steps/s}, "load": load average at the end}``."""
    results: dict = {"engines": {}, "methods": {}}
    steps_per_second(args.width, 500, 0, "lean")  # warm-up
    print(f"threads 1; width {args.width}; {load()} at start")
    if not args.skip_engines:
        print(f"Monitor every {args.monitor_every} steps when on")
        print(f"{'engine':<9} {'monitor':<8} {'steps':>7} {'steps/s':>9}")
        for engine in ("lean", "autograd"):
            steps = args.steps if engine == "lean" else (args.autograd_steps or max(args.steps // 5, 1000))
            for every in (0, args.monitor_every):
                rate = steps_per_second(args.width, steps, every, engine)
                results["engines"][(engine, every)] = rate
                print(f"{engine:<9} {'on' if every else 'off':<8} {steps:7d} {rate:9.0f}")

    methods = ["sgd"] + [m for m in args.methods.split(",") if m]
    for method in methods:
        steps_per_second(args.width, 300, 0, "auto", method)  # warm-up (imports of the method's code)
    best = {m: 0.0 for m in methods}
    for _ in range(args.repeats):
        for method in methods:
            best[method] = max(best[method], steps_per_second(args.width, args.method_steps, 0, "auto", method))
    print(f"\nlearner-steps/s, Monitor off, {args.method_steps} steps, best of {args.repeats}; {load()}")
    print(f"{'method':<16} {'engine':<9} {'steps/s':>9} {'x plain':>8}")
    for method in methods:
        engine = make_bench(args.width, 10, 0, "auto", method).engine
        print(f"{method:<16} {engine:<9} {best[method]:9.0f} {best[method] / best['sgd']:7.2f}x")
    if "cbp" in best:
        ratio = best["cbp"] / best["sgd"]
        verdict = "met" if ratio >= CBP_TARGET else "MISSED"
        print(f"\ncbp / plain = {ratio:.2f} (target >= {CBP_TARGET}: {verdict})")
        if ratio < CBP_TARGET:
            print(profile_top(args.width, args.method_steps, "cbp"))
    results["methods"] = best
    results["load"] = load()
    return results


if __name__ == "__main__":
    main()
