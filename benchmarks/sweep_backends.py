"""Wall time of one 16-run smoke sweep on the sequential, local (process pool) and Ray backends, and the
gain of the seed-vectorised bitflip fast path.

The sweep: the ``bitflip`` benchmark, smoke preset, 2 widths x 8 seeds (no mitigation), so every backend and
the fast path run the very same 16 runs. Each variant writes into a fresh experiment folder; every run must
finish. Printed per variant: wall seconds (including worker start-up: process spawn + imports for ``local``,
``ray.init`` for ``ray``, timed apart as well), runs per second and the speed-up over ``sequential``.

``local+vmap`` is the local backend with ``vectorize_seeds: true`` (lean engine), ``local+vmap-func`` the same
with ``vectorize_engine: func`` (``torch.func.vmap``).

Then the fast path inside one worker, without the store: S seeds trained one after the other by the benchmark
(its lean NumPy engine, and its generic autograd engine) versus all S at once by
:func:`lopkit.benchmarks.vmap_seeds.run_bitflip_seeds` (``torch.func.vmap`` engine and the batched ``lean``
engine); seed-steps per second and the gain over separate lean runs. Every run uses one torch thread.

Usage: python benchmarks/sweep_backends.py [--steps 4000] [--seeds 8] [--widths 10,50] [--max-workers 2]
                                           [--backends sequential,local,ray,local+vmap,local+vmap-func]
                                           [--slow-steps 4000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from lopkit.benchmarks.bitflip import BitFlipBenchmark
from lopkit.benchmarks.vmap_seeds import run_bitflip_seeds
from lopkit.runner.sweep import format_summary, parse_sweep, run_sweep


def smoke_sweep(experiment: Path, steps: int, seeds: int, widths: list[int], vectorize: str | None) -> dict:
    """The benchmark's sweep mapping: bitflip smoke, ``len(widths) x seeds`` baseline runs."""
    return {
        "experiment": str(experiment),
        "preset": "smoke",
        "seeds": seeds,
        "vectorize_seeds": vectorize is not None,
        "vectorize_engine": vectorize or "lean",
        "runs": [{"benchmark": "bitflip", "methods": ["sgd"], "grid": {"width": widths}, "set": {"num_steps": steps}}],
    }


def time_backend(variant: str, root: Path, args: argparse.Namespace) -> tuple[float, float | None]:
    """Wall seconds of the sweep on one variant (and of ``ray.init`` alone for ray); all runs must finish."""
    backend, _, fast = variant.partition("+")
    engine = {"": None, "vmap": "lean", "vmap-func": "func"}[fast]
    sweep = parse_sweep(smoke_sweep(root / variant, args.steps, args.seeds, args.widths, vectorize=engine))
    init_seconds = None
    started = time.perf_counter()
    if backend == "ray":
        import logging

        import ray

        ray.init(num_cpus=args.max_workers, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        init_seconds = time.perf_counter() - started
    try:
        outcomes = run_sweep(sweep, backend, max_workers=args.max_workers, progress=False)
    finally:
        if backend == "ray":
            ray.shutdown()
    seconds = time.perf_counter() - started
    if any(o.status != "finished" for o in outcomes):
        raise RuntimeError(f"{variant}: not every run finished\n{format_summary(outcomes)}")
    return seconds, init_seconds


def time_fast_path(args: argparse.Namespace) -> dict[str, tuple[float, int]]:
    """(seconds, seed-steps) for ``seeds`` bitflip seeds: separate benchmark runs vs one vectorised call.

    The slow variants (autograd engine, ``torch.func``) run ``min(steps, --slow-steps)`` steps; throughput
    (seed-steps per second) is comparable across step counts.
    """
    width = args.widths[-1]
    seeds = list(range(args.seeds))
    slow_steps = min(args.steps, args.slow_steps)
    lean = BitFlipBenchmark.make_config("smoke", {"num_steps": args.steps, "width": width})
    slow = BitFlipBenchmark.make_config("smoke", {"num_steps": slow_steps, "width": width})
    autograd = BitFlipBenchmark.make_config("smoke", {"num_steps": slow_steps, "width": width, "engine": "autograd"})
    BitFlipBenchmark(lean, 99).run(200)  # warm-up
    run_bitflip_seeds(lean, [99], n_steps=200, engine="func")

    def timed(function) -> float:
        start = time.perf_counter()
        function()
        return time.perf_counter() - start

    return {
        "separate lean": (timed(lambda: [BitFlipBenchmark(lean, s).run(lean.num_steps) for s in seeds]),
                          len(seeds) * args.steps),
        "separate autograd": (timed(lambda: [BitFlipBenchmark(autograd, s).run(slow_steps) for s in seeds]),
                              len(seeds) * slow_steps),
        "vmap func": (timed(lambda: run_bitflip_seeds(slow, seeds, engine="func")), len(seeds) * slow_steps),
        "vmap lean": (timed(lambda: run_bitflip_seeds(lean, seeds, engine="lean")), len(seeds) * args.steps),
    }


def main() -> None:
    """Time every variant and print two tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000, help="bitflip steps per run (smoke preset: 4000)")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--slow-steps", type=int, default=4000,
                        help="steps of the slow fast-path variants (autograd engine, torch.func)")
    parser.add_argument("--widths", default="10,50", help="comma-separated learner widths")
    parser.add_argument("--max-workers", type=int, default=2, help="local processes and local Ray CPUs")
    parser.add_argument("--backends", default="sequential,local,ray,local+vmap,local+vmap-func",
                        help="variants to time (ray is skipped if not installed)")
    args = parser.parse_args()
    args.widths = [int(w) for w in args.widths.split(",")]
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # NaN ranks of dead layers on some probes are expected
    os.environ.setdefault("LOPKIT_PROGRESS", "0")
    variants = [v.strip() for v in args.backends.split(",") if v.strip()]
    runs = len(args.widths) * args.seeds
    print(f"sweep: bitflip smoke, {args.steps} steps, widths {args.widths} x {args.seeds} seeds = {runs} runs; "
          f"{args.max_workers} workers; {os.cpu_count()} CPUs")
    results: dict[str, tuple[float, float | None]] = {}
    with tempfile.TemporaryDirectory(prefix="lopkit-sweep-bench-") as folder:
        for variant in variants:
            if variant.startswith("ray"):
                try:
                    import ray  # noqa: F401
                except ImportError:
                    print(f"{variant}: skipped (pip install 'lopkit[ray]')")
                    continue
            results[variant] = time_backend(variant, Path(folder), args)
    base = results.get("sequential", (None, None))[0]
    print(f"{'variant':<16} {'seconds':>8} {'runs/s':>7} {'vs sequential':>14}  note")
    for variant, (seconds, init) in results.items():
        ratio = f"{base / seconds:13.2f}x" if base else f"{'-':>14}"
        note = f"incl. ray.init {init:.1f} s" if init is not None else ""
        print(f"{variant:<16} {seconds:8.1f} {runs / seconds:7.2f} {ratio}  {note}")

    timings = time_fast_path(args)
    rate = {name: seed_steps / seconds for name, (seconds, seed_steps) in timings.items()}
    print(f"\nfast path in one worker: {args.seeds} seeds, width {args.widths[-1]}, 1 thread "
          f"(autograd and func: {min(args.steps, args.slow_steps)} steps, lean: {args.steps})")
    print(f"{'variant':<18} {'seconds':>8} {'seed-steps/s':>13} {'gain':>7}")
    for name, (seconds, _) in timings.items():
        print(f"{name:<18} {seconds:8.2f} {rate[name]:13.0f} {rate[name] / rate['separate lean']:6.2f}x")
    print(f"torch.func.vmap vs separate autograd runs: {rate['vmap func'] / rate['separate autograd']:.2f}x; "
          f"vmap lean vs separate lean runs: {rate['vmap lean'] / rate['separate lean']:.2f}x")


if __name__ == "__main__":
    main()
