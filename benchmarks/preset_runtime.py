"""End-to-end runtime of one benchmark preset run (issue 16: "a default continual ViT and ResNet run each within
30 minutes on 2 cores"): wall time and this process's CPU time, with the machine's load.

Runs ``lopkit run BENCH --preset PRESET --seed-list SEED`` in-process through the runner (a resumable store in
``--out``; a finished run there is not timed again: use a fresh folder) and prints the wall and CPU seconds, steps
and steps/s. On a shared machine the CPU time is the figure to read: at one thread it is close to what the run
takes on an idle core. With ``--record`` the figure goes into the table of ``benchmarks/README.md``.

With ``--time-file F`` nothing runs: the figure is read from a finished CLI run timed by GNU time
(``/usr/bin/time -v lopkit run ... 2> F``) and its store in ``--out``.

Usage: python benchmarks/preset_runtime.py class_split vit_default --out /tmp/rt/vit [--threads 1] [--seed 0]
       [--set key=value ...] [--time-file F] [--record]
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import torch

from _record import add_record_argument, load, record

from lopkit.benchmarks.registry import get_benchmark
from lopkit.configs import ConfigError, parse_overrides
from lopkit.runner.execute import execute_run
from lopkit.runner.store import ResultStore


def gnu_time_seconds(text: str) -> tuple[float, float]:
    """(wall, user + system CPU) seconds from the report of ``/usr/bin/time -v``; ValueError if it is not one."""
    def field(label: str) -> str:
        found = re.search(rf"^\s*{re.escape(label)}:\s*(.+)$", text, re.MULTILINE)
        if found is None:
            raise ValueError(f"no '{label}' line: not the output of /usr/bin/time -v")
        return found.group(1).strip()

    cpu = float(field("User time (seconds)")) + float(field("System time (seconds)"))
    parts = [float(p) for p in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")]
    wall = sum(value * 60 ** power for power, value in enumerate(reversed(parts)))
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    """Time one preset run and print (and optionally record) the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark")
    parser.add_argument("preset")
    parser.add_argument("--out", required=True, help="experiment folder for the run (use a fresh one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--time-file", default=None, help="read a finished run's GNU time -v report instead of running")
    add_record_argument(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        bench = get_benchmark(args.benchmark)
        config = bench.make_config(args.preset, parse_overrides(args.set))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.time_file:
        with ResultStore(args.out, read_only=True) as store:
            run = store.get_run(store.resolve_run_id(bench.name, "sgd", config, args.seed))
        if run is None or run["status"] != "finished":
            print(f"error: {args.out} holds no finished run of this preset and seed", file=sys.stderr)
            return 1
        try:
            wall, cpu = gnu_time_seconds(open(args.time_file).read())
        except (OSError, ValueError) as err:
            print(f"error: {args.time_file}: {err}", file=sys.stderr)
            return 2
        return report(args, int(run["total_steps"]), wall, cpu, "timed by GNU time; load when recorded")
    wall, cpu = time.perf_counter(), time.process_time()
    with ResultStore(args.out) as store:
        result = execute_run(store, bench, config, args.seed, preset=args.preset, progress="never")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if result.status == "skipped":
        print(f"error: {args.out} already holds this run finished; pass a fresh --out to time it", file=sys.stderr)
        return 1
    if result.status != "finished":
        print(f"error: the run ended {result.status}: {result.error_line}; nothing timed", file=sys.stderr)
        return 1
    return report(args, int(result.total_steps or result.step), wall, cpu, "load at the end")


def report(args: argparse.Namespace, steps: int, wall: float, cpu: float, note: str) -> int:
    """Print (and with --record, record) the runtime figure."""
    figure = (f"{args.benchmark} {args.preset}: {steps:,} steps in {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU "
              f"({steps / cpu:.1f} steps per CPU-second); {note}: {load()}")
    print(figure)
    if args.record:
        command = None  # this script's own command line
        if args.time_file:  # the run was the CLI's: name that command
            sets = f" --set {' '.join(args.set)}" if args.set else ""
            command = (f"/usr/bin/time -v lopkit run {args.benchmark} --preset {args.preset} --seed-list {args.seed} "
                       f"--threads {args.threads}{sets} --out {args.out} 2> {args.time_file}")
        record(f"preset_runtime/{args.benchmark}/{args.preset}/{args.threads}t", "preset_runtime.py", figure,
               threads=args.threads, command=command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
