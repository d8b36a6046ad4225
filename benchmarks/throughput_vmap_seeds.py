"""Wall time of S bit-flipping seeds trained in one vectorised process versus S separate benchmark runs.

Three ways to train the same S seeds (same rows up to float rounding, see
:mod:`lopkit.benchmarks.vmap_seeds`):

- ``sequential``: S runs of the ``"bitflip"`` benchmark one after the other (its lean NumPy engine);
- ``seq autograd``: the same with the benchmark's generic autograd engine (what any learner would cost);
- ``vmap func``: one process, ``torch.func`` (``stack_module_state`` + ``vmap(grad_and_value(functional_call))``);
- ``vmap lean``: one process, the hand-written step batched over seeds in NumPy.

Prints seconds, seed-steps per second and the speed-up of each variant over ``sequential`` (lean).
Single-threaded (``torch.set_num_threads(1)``) so the numbers do not depend on the number of cores.

Usage: python benchmarks/throughput_vmap_seeds.py [--seeds 8] [--steps 10000] [--width 100] [--monitor-every 1000]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from lopkit.benchmarks.bitflip import BitFlipBenchmark
from lopkit.benchmarks.vmap_seeds import run_bitflip_seeds


def main() -> None:
    """Time the three variants and print a small table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument("--monitor-every", type=int, default=1000, help="0 turns the Monitor off")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # dead-layer NaN warnings of the Monitor are expected
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

    seed_steps = args.seeds * args.steps
    print(f"{args.seeds} seeds x {args.steps} steps, width {args.width}, monitor every {args.monitor_every or 'never'}")
    print(f"{'variant':<12} {'seconds':>9} {'seed-steps/s':>13} {'speed-up':>9}")
    for name, seconds in timings.items():
        print(f"{name:<12} {seconds:9.2f} {seed_steps / seconds:13.0f} {sequential / seconds:8.2f}x")


if __name__ == "__main__":
    main()
