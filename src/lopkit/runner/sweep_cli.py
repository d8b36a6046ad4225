"""``lopkit sweep SWEEP.yaml --backend sequential|local|ray``: run a grid of benchmarks x methods x seeds."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from lopkit.runner.cli_common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    add_progress_flags,
    add_threads_flag,
    error_exit,
    progress_mode,
)

_error = error_exit


def _dry_run(sweep: Any) -> int:
    """List the runs a sweep expands to (and which are already finished) without running anything."""
    from lopkit.runner.store import STORE_FILENAME, ResultStore, StoreError, run_id_candidates

    finished: set[str] = set()
    if (sweep.experiment / STORE_FILENAME).exists():
        try:
            with ResultStore(sweep.experiment, read_only=True) as store:
                frame = store.runs()
        except StoreError as err:
            return _error(str(err))
        finished = set(frame.loc[frame["status"] == "finished", "run_id"])
    def is_finished(spec: Any) -> bool:
        """Whether the store holds the run finished, under its current id or an older one."""
        ids = run_id_candidates(spec.benchmark, spec.method_label, spec.make_config(), spec.seed)
        return any(run_id in finished for run_id in ids)

    marks = [is_finished(spec) for spec in sweep.runs]
    for spec, done in zip(sweep.runs, marks):
        print(f"{'finished' if done else 'todo':<9} {spec.label}")
    todo = marks.count(False)
    print(f"{len(sweep.runs)} runs ({todo} to do) -> {sweep.experiment}")
    return EXIT_OK


def _sweep(args: argparse.Namespace) -> int:
    """Validate the sweep file, run it on the chosen backend, print the summary; exit 0, 1, 2 or 130."""
    from lopkit.configs import ConfigError
    from lopkit.runner.sweep import SweepError, format_summary, load_sweep, run_sweep

    try:
        sweep = load_sweep(args.sweep_file, experiment=args.experiment)
    except SweepError as err:  # every problem of the file, one per line (as docs/sweeps.md shows)
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as err:
        return _error(str(err))
    if args.threads is not None and args.threads < 1:
        return _error(f"--threads must be >= 1, got {args.threads}")
    if args.vectorize_seeds is not None:
        sweep.vectorize_seeds = args.vectorize_seeds
    if args.dry_run:
        return _dry_run(sweep)
    from lopkit.runner.store import STORE_FILENAME, StoreError, check_store_file

    if (sweep.experiment / STORE_FILENAME).is_file():
        try:  # a damaged store: one line before anything starts (the file is only read)
            check_store_file(sweep.experiment / STORE_FILENAME)
        except StoreError as err:
            return _error(str(err))
    print(f"sweep {args.sweep_file}: {len(sweep.runs)} runs on backend {args.backend!r} -> {sweep.experiment}",
          file=sys.stderr)
    try:
        outcomes = run_sweep(
            sweep, args.backend, max_workers=args.max_workers, address=args.address, num_cpus=args.num_cpus,
            store_mode=args.store_mode,
            threads_per_run=args.threads if args.threads is not None else (args.threads_per_run or None),
            progress=progress_mode(args),
        )
    except (ValueError, RuntimeError) as err:  # bad option combination, Ray missing or unreachable
        return _error(str(err))
    except KeyboardInterrupt:
        print(f"\naborted; rerun to resume: {shlex.join(sys.argv) if sys.argv else 'lopkit sweep ...'}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(format_summary(outcomes))
    statuses = {o.status for o in outcomes}
    if statuses & {"interrupted", "cancelled", "paused"}:
        print("interrupted; rerun the same command to skip finished runs and resume the others", file=sys.stderr)
        return EXIT_INTERRUPTED
    if "failed" in statuses:
        print(f"some runs failed; tracebacks are in {sweep.experiment}/results.sqlite (table runs, column error)",
              file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def register(subparsers: Any) -> None:
    """Add the ``sweep`` sub-command."""
    parser = subparsers.add_parser(
        "sweep", help="run a sweep file (benchmarks x methods x grids x seeds) locally or on Ray (resumable)",
        description="Expand SWEEP.yaml into runs and execute them into EXPERIMENT/results.sqlite (the store of "
                    "'lopkit run'). The whole file is validated before anything runs. Rerunning the same command "
                    "skips finished runs and resumes unfinished ones; a failing run is recorded with its "
                    "traceback and the sweep goes on. See docs/sweeps.md for the file format.",
        epilog="examples:\n"
               "  lopkit sweep examples/sweeps/smoke.yaml --backend local --max-workers 2\n"
               "  lopkit sweep examples/sweeps/smoke.yaml --dry-run\n"
               "  lopkit sweep my_sweep.yaml --backend ray                      # local Ray\n"
               "  lopkit sweep my_sweep.yaml --backend ray --address auto       # running Ray cluster\n"
               "exit codes: 0 ok, 1 a run failed, 2 bad sweep file or options, 130 interrupted",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep_file", metavar="SWEEP.yaml", help="the sweep file")
    parser.add_argument("--backend", choices=("sequential", "local", "ray"), default="local",
                        help="sequential (this process), local (process pool) or ray (default: %(default)s)")
    parser.add_argument("--max-workers", type=int, default=None, metavar="N",
                        help="processes of the local backend (default: number of CPUs)")
    parser.add_argument("--address", default=None, metavar="ADDR",
                        help="ray backend: join an existing cluster (e.g. auto or ray://HEAD:10001) instead of "
                             "starting a local Ray")
    parser.add_argument("--num-cpus", type=int, default=None, metavar="N",
                        help="ray backend without --address: CPUs of the local Ray (default: all)")
    parser.add_argument("--store-mode", choices=("auto", "shared", "driver"), default="auto",
                        help="shared: workers write the store; driver: workers ship rows back to this process "
                             "(for nodes that do not share the experiment folder); auto: driver with --address")
    parser.add_argument("--experiment", default=None, metavar="DIR", help="override the file's 'experiment' folder")
    add_threads_flag(parser)  # the torch threads of each run, like --threads-per-run (which it overrides)
    parser.add_argument("--threads-per-run", type=int, default=1, metavar="N",
                        help="torch threads inside each run; 0 keeps torch's default (default: %(default)s)")
    vectorize = parser.add_mutually_exclusive_group()
    vectorize.add_argument("--vectorize-seeds", dest="vectorize_seeds", action="store_true", default=None,
                           help="train bitflip runs that differ only by seed together in one task (fast path)")
    vectorize.add_argument("--no-vectorize-seeds", dest="vectorize_seeds", action="store_false",
                           help="run every seed separately even if the file says vectorize_seeds: true")
    parser.add_argument("--dry-run", action="store_true", help="list the runs (and which are finished) and exit")
    add_progress_flags(parser)
    parser.set_defaults(func=_sweep)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m lopkit.runner.sweep_cli SWEEP.yaml ...``), same as ``lopkit sweep``."""
    parser = argparse.ArgumentParser(prog="lopkit")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sweep", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
