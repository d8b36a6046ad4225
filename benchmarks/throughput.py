"""Training throughput (steps per second) of lopkit's benchmarks, with the Monitor on and off.

Continual Fashion-MNIST section: builds ``class_split`` and ``permuted`` at their ``default`` preset sizes, runs a
short warm-up, then times ``--steps`` optimiser steps with the Monitor off (``monitor=false``) and on (the
preset's monitoring plus a measurement every ``--monitor-every`` steps, so the probe cost shows up within a
short timing window). Task ends inside the window (evaluations) are included, as in a real run.

Other sections (e.g. bit-flipping) register a function in ``SECTIONS`` returning rows of the same shape.

Usage: python benchmarks/throughput.py [--steps 300] [--monitor-every 100] [--threads 2] [--sections continual]
       [--record]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from _record import add_record_argument, record

Row = dict[str, Any]


def time_benchmark(name: str, overrides: dict[str, Any], steps: int, warmup: int = 20, seed: int = 0) -> float:
    """Steps per second of ``steps`` steps of a registered benchmark built from its default preset."""
    from lopkit.benchmarks.registry import get_benchmark

    cls = get_benchmark(name)
    bench = cls(cls.make_config("default", overrides), seed)
    bench.run(warmup)
    start = time.perf_counter()
    bench.run(steps)
    return steps / (time.perf_counter() - start)


def continual_section(steps: int, monitor_every: int) -> list[Row]:
    """Throughput rows for the continual Fashion-MNIST benchmarks (MLP and CNN, Monitor off/on)."""
    rows: list[Row] = []
    for name in ("class_split", "permuted"):
        for model in ("mlp", "cnn"):
            off = time_benchmark(name, {"model": model, "monitor": False}, steps)
            on = time_benchmark(name, {"model": model, "monitor": True, "monitor_every": monitor_every}, steps)
            rows.append({"benchmark": name, "model": model, "monitor_off": off, "monitor_on": on})
    return rows


#: name -> function(steps, monitor_every) -> rows with keys benchmark, model, monitor_off, monitor_on.
SECTIONS: dict[str, Callable[[int, int], list[Row]]] = {"continual": continual_section}


def format_table(rows: list[Row]) -> str:
    """Fixed-width table: steps/s with the Monitor off and on, and the on/off ratio."""
    header = f"{'benchmark':<14}{'model':<7}{'steps/s off':>13}{'steps/s on':>13}{'on/off':>9}"
    lines = [header, "-" * len(header)]
    for row in rows:
        ratio = row["monitor_on"] / row["monitor_off"]
        lines.append(
            f"{row['benchmark']:<14}{row['model']:<7}{row['monitor_off']:>13.1f}{row['monitor_on']:>13.1f}{ratio:>9.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run the chosen sections and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per configuration")
    parser.add_argument("--monitor-every", type=int, default=100, help="Monitor interval in steps when on")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    add_record_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[Row] = []
    for section in args.sections:
        rows += SECTIONS[section](args.steps, args.monitor_every)
    print(format_table(rows))
    if args.record:
        for row in rows:
            record(f"throughput/{row['benchmark']}/{row['model']}", "throughput.py",
                   f"{row['monitor_off']:.1f} steps/s Monitor off, {row['monitor_on']:.1f} on "
                   f"(every {args.monitor_every} steps)", threads=args.threads)


if __name__ == "__main__":
    main()
