"""Print the step rate of the cloning benchmark (E2): base-only steps and paired (base + clone) steps per second.

    PYTHONPATH=src python scripts/bench_cloning_rate.py --preset default --variant noisy_sgd --steps 1000

One thread. Logging is pushed past the measured window, so the figures are the training loop alone; the load of
the machine is printed beside them because a shared machine slows every figure down.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from lopkit.benchmarks.cloning import CloningBenchmark


def main() -> None:
    """Time ``--steps`` base-only and paired steps and print both rates."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--variant", default="noisy_sgd")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = {"variant": args.variant, "base_steps": args.steps, "paired_steps": args.steps + 1}
    overrides["log_every"] = 2 * args.steps + 1
    bench = CloningBenchmark(CloningBenchmark.make_config(args.preset, overrides), args.seed)
    bench.run(1)  # the initial log
    start = time.perf_counter()
    bench.run(args.steps - 1)
    base_rate = (args.steps - 1) / (time.perf_counter() - start)
    bench.run(2)  # the cloning step's log and the first paired step
    start = time.perf_counter()
    bench.run(args.steps - 1)
    paired_rate = (args.steps - 1) / (time.perf_counter() - start)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"cloning preset={args.preset} variant={args.variant} threads=1 load(1 min)={load:.1f} on {os.cpu_count()} cpus"
    )
    print(f"base-only: {base_rate:.1f} steps/s ({1e3 / base_rate:.2f} ms/step)")
    print(f"paired:    {paired_rate:.1f} steps/s ({1e3 / paired_rate:.2f} ms/step)")
    print(f"100k paired steps: {1e5 / paired_rate / 60:.1f} min at this rate")


if __name__ == "__main__":
    main()
