"""``lopkit compare BENCHMARK --methods a,b,c --seeds 5 --preset default``: run the grid, print and save a ranking."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from lopkit.configs import ConfigError

from lopkit.runner.cli_common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    SEEDS_HELP,
    add_progress_flags,
    add_threads_flag,
    apply_threads,
    error_exit,
    progress_mode,
)

DEFAULT_SEEDS = "5"


_error = error_exit


def resume_command(args: argparse.Namespace, out: Path) -> str:
    """The command line that resumes (or re-ranks) the same comparison."""
    parts = ["lopkit", "compare", args.benchmark, "--methods", args.methods, "--seeds", str(args.seeds),
             "--preset", args.preset]
    if args.overrides:
        parts += ["--set", *args.overrides]
    parts += ["--out", str(out)]
    return " ".join(shlex.quote(p) for p in parts)


def _describe_cell(cell: Any) -> str:
    """One line about a finished, skipped or failed cell."""
    result = cell.result
    head = f"{cell.method.label} seed {cell.seed}:"
    if result.status == "skipped":
        return f"{head} already finished (run {result.run_id}), skipped"
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    return f"{head} {result.status} at step {result.step}/{result.total_steps} in {result.seconds:.1f}s{resumed}"


def _compare(args: argparse.Namespace) -> int:
    """Validate everything, run the grid, then print the ranking and write CSV + HTML; exit 0, 1, 2 or 130."""
    from lopkit.configs import parse_overrides
    from lopkit.runner.compare import build_plan, describe_plan, rank_plan, run_plan, write_outputs
    from lopkit.runner.execute import SETUP_ERRORS
    from lopkit.runner.store import ResultStore, StoreError

    try:
        plan = build_plan(args.benchmark, args.methods, args.seeds, args.preset, parse_overrides(args.overrides))
        if args.metric is not None:
            from lopkit.report.ranking import parse_primary_metric

            parse_primary_metric(args.metric)
        if not 0.0 <= args.final_fraction <= 1.0:
            raise ConfigError(f"--final-fraction must be in [0, 1], got {args.final_fraction}")
        if args.checkpoint_every is not None and args.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
        apply_threads(args)
    except (ConfigError, ValueError) as err:
        return _error(str(err))

    out = Path(args.out) if args.out else Path("runs") / f"compare_{plan.benchmark}"
    progress = progress_mode(args)
    print(f"compare {describe_plan(plan)}")
    print(f"experiment folder: {out}")
    try:
        store = ResultStore(out, read_only=args.rank_only)  # ranking only reads: works on read-only storage
    except (StoreError, FileNotFoundError) as err:
        return _error(str(err))
    except OSError as err:
        return _error(f"cannot open the results store in {out}: {err}")
    failures = 0
    try:
        if not args.rank_only:
            try:
                refused: list[str] = []

                def skip(method: Any, err: Exception) -> None:
                    refused.append(method.label)
                    print(f"error: {method.label} cannot run here, skipped (its seeds are not tried): {err}",
                          file=sys.stderr, flush=True)

                cells = run_plan(plan, store, progress=progress, checkpoint_every=args.checkpoint_every,
                                 on_result=lambda cell: print(_describe_cell(cell), flush=True), on_skip=skip)
            except (*SETUP_ERRORS, StoreError) as err:  # a benchmark refusing a config/method combination, a
                # missing dataset, a store that cannot be written
                return _error(str(err))
            failures = sum(c.result.status == "failed" for c in cells) + len(refused)
            for cell in cells:
                if cell.result.status == "failed":
                    print(f"error: {cell.method.label} seed {cell.seed} failed: {cell.result.error_line} "
                          "(full traceback in the store, runs.error)", file=sys.stderr)
            if cells and cells[-1].result.status in ("interrupted", "paused"):
                print(f"interrupted; finished runs are saved in {store.path}. To resume: {resume_command(args, out)}",
                      file=sys.stderr)
                return EXIT_INTERRUPTED
        try:
            ranking = rank_plan(plan, store, args.metric, args.final_fraction)
        except StoreError as err:
            return _error(str(err))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_FAILED
        # a read-only experiment folder (only possible with --rank-only): the files go next to -o, or nowhere
        files_dir = None if os.access(out, os.W_OK) else (Path(args.output).parent if args.output else None)
        skipped_files = files_dir is None and not os.access(out, os.W_OK)
        try:
            outputs = None if skipped_files else write_outputs(plan, out, ranking, args.output,
                                                               report=not args.no_report, files_dir=files_dir)
        except StoreError as err:
            return _error(str(err))
    finally:
        store.close()
    print()
    print(ranking.caption())
    print(ranking.to_text())
    print()
    if outputs is None:
        print(f"note: {out} is read-only, so ranking.csv, ranking_runs.csv and report.html were not written; "
              "pass -o DIR/report.html to write them into a writable DIR", file=sys.stderr)
        return EXIT_FAILED if failures else EXIT_OK
    print(f"ranking: {outputs.csv} (per run: {outputs.runs_csv})")
    if outputs.html is not None:
        print(f"report: {outputs.html}")
    return EXIT_FAILED if failures else EXIT_OK


def register(subparsers: Any) -> None:
    """Add the ``compare`` sub-command."""
    parser = subparsers.add_parser(
        "compare", help="run a benchmark x methods x seeds grid and rank the methods",
        description="Run every method on the same benchmark config, seeds and step budget (resumable: finished runs "
                    "are skipped), then print a ranking (final-window primary metric, normalised area under the "
                    "curve, dead/duplicate fraction, effective rank; mean [95%% CI] over seeds) and write it as CSV "
                    "and in an HTML report.")
    parser.add_argument("benchmark", help="registered benchmark name (see 'lopkit list')")
    parser.add_argument("--methods", required=True,
                        help="comma-separated methods, e.g. sgd,cbp,l2init,snp (aliases as in 'lopkit run --method'); "
                             "hyper-parameters as cbp:replacement_rate=1e-4; '+' combines methods (cbp+l2init)")
    parser.add_argument("--seeds", default=DEFAULT_SEEDS,
                        help=f"seeds: {SEEDS_HELP} (default: {DEFAULT_SEEDS})")
    parser.add_argument("--preset", default="default", help="benchmark preset: smoke, default, paper or a benchmark's own (lopkit list BENCHMARK shows them)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides applied to every run, e.g. --set num_steps=200000 width=50")
    parser.add_argument("--out", default=None, help="experiment folder (default: runs/compare_BENCHMARK)")
    parser.add_argument("-o", "--output", default=None, help="HTML report (default: OUT/report.html)")
    parser.add_argument("--metric", default=None, metavar="NAME[:higher|lower]",
                        help="rank by this metric instead of the benchmark's primary one")
    parser.add_argument("--final-fraction", type=float, default=0.1,
                        help="final window as a fraction of each run's steps (default 0.1)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    parser.add_argument("--rank-only", action="store_true", help="do not run anything; rank the finished runs")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report (CSV and table only)")
    add_threads_flag(parser)
    add_progress_flags(parser)
    parser.set_defaults(func=_compare)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``compare`` as a standalone program (for tests before the CLI dispatcher lists it)."""
    parser = argparse.ArgumentParser(prog="lopkit")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", *(argv or [])])
    return int(args.func(args))
