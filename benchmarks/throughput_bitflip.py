"""Steps per second of the bit-flipping benchmark with the Monitor on and off, for each training engine.

The ``lean`` engine (hand-written NumPy forward/backward/update, used when no mitigation is attached) and
the ``autograd`` engine (generic loop calling the mitigation hooks) are both timed, with the Monitor
measuring every ``--monitor-every`` steps and with it off. Single-threaded.

Usage: python benchmarks/throughput_bitflip.py [--steps 50000] [--width 100] [--monitor-every 1000]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from lopkit.benchmarks.bitflip import BitFlipBenchmark


def steps_per_second(width: int, steps: int, monitor_every: int, engine: str) -> float:
    """Online SGD steps per second of one run (construction excluded)."""
    config = BitFlipBenchmark.make_config(
        "default", {"width": width, "num_steps": steps, "monitor_every": monitor_every, "engine": engine}
    )
    bench = BitFlipBenchmark(config, 0)
    start = time.perf_counter()
    bench.run(steps)
    return steps / (time.perf_counter() - start)


def main() -> None:
    """Print steps/s for each engine with the Monitor on and off."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument("--monitor-every", type=int, default=1000)
    parser.add_argument("--autograd-steps", type=int, default=None, help="steps for the slow engine (default steps/5)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # dead-layer NaN warnings of the Monitor are expected
    steps_per_second(args.width, 500, 0, "lean")  # warm-up
    print(f"width {args.width}; Monitor every {args.monitor_every} steps when on")
    print(f"{'engine':<9} {'monitor':<8} {'steps':>7} {'steps/s':>9}")
    for engine in ("lean", "autograd"):
        steps = args.steps if engine == "lean" else (args.autograd_steps or max(args.steps // 5, 1000))
        for every in (0, args.monitor_every):
            rate = steps_per_second(args.width, steps, every, engine)
            print(f"{engine:<9} {'on' if every else 'off':<8} {steps:7d} {rate:9.0f}")


if __name__ == "__main__":
    main()
