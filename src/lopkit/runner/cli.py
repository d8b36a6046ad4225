"""``lopkit run BENCHMARK ...`` (seeds one after the other, resumable) and ``lopkit list`` (benchmarks, presets, fields)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import shlex
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any, Sequence

from lopkit.configs import ConfigError, nested_keys

from lopkit.runner.cli_common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    SEEDS_HELP,
    add_progress_flags,
    add_threads_flag,
    apply_threads,
    error_exit,
    parse_seeds,
    progress_mode,
)
from lopkit.runner.seed_runs import describe_result, parse_workers, run_seeds

DEFAULT_SEEDS = 5  # spec section 8, item 12


_error = error_exit


# ------------------------------------------------------------------------------------------------- seeds


def parse_seed_list(text: str) -> list[int]:
    """``--seed-list``: ``"0,1,2"`` -> [0, 1, 2], ``"3"`` -> [3] (:func:`parse_seeds` with a lone integer as one seed)."""
    return parse_seeds(text, "--seed-list", single_is_count=False)


def resolve_seeds(seeds: str | int | None, seed_list: str | None, offset: int) -> list[int]:
    """The seeds to run: ``offset + s`` for each seed of ``--seeds`` (count, list or range) or ``--seed-list``."""
    if offset < 0:
        raise ConfigError(f"--seed-offset must be >= 0, got {offset}")
    if seed_list is not None:
        return [offset + s for s in parse_seed_list(seed_list)]
    return [offset + s for s in parse_seeds(DEFAULT_SEEDS if seeds is None else seeds)]


# --------------------------------------------------------------------------------------------------- run


def resume_command(args: argparse.Namespace, out: Path) -> str:
    """The ``lopkit run`` command line that resumes the same experiment (rebuilt from the parsed arguments)."""
    parts = ["lopkit", "run", args.benchmark, "--preset", args.preset]
    if args.seed_list is not None:
        parts += ["--seed-list", args.seed_list]
    elif args.seeds is not None:
        parts += ["--seeds", str(args.seeds)]
    if args.seed_offset:
        parts += ["--seed-offset", str(args.seed_offset)]
    if args.overrides:
        parts += ["--set", *args.overrides]
    for method in args.methods:
        parts += ["--method", method]
    parts += ["--out", str(out)]
    if args.checkpoint_every is not None:
        parts += ["--checkpoint-every", str(args.checkpoint_every)]
    if getattr(args, "no_vectorise", False):
        parts.append("--no-vectorise")
    workers = getattr(args, "workers", "1")
    if str(workers).strip() != "1":
        parts += ["--workers", str(workers).strip()]
    if getattr(args, "threads", None) is not None:
        parts += ["--threads", str(args.threads)]
    return " ".join(shlex.quote(p) for p in parts)


def _run_in_workers(args: argparse.Namespace, store: Any, cls: Any, config: Any, seeds: list[int],
                    method_names: list[str], out: Path, workers: int) -> int:
    """``--workers N`` (N >= 2): the seeds in N spawned processes (:mod:`lopkit.runner.run_workers`)."""
    from lopkit.configs import parse_overrides
    from lopkit.runner.run_workers import run_with_workers
    from lopkit.runner.store import StoreError

    try:
        code = run_with_workers(store, cls, config, seeds, method_names, out=out, preset=args.preset,
                                overrides=parse_overrides(args.overrides), workers=workers, threads=args.threads,
                                checkpoint_every=args.checkpoint_every, vectorise=not args.no_vectorise,
                                resume=resume_command(args, out))
    except StoreError as err:  # e.g. a read-only store: one line before any worker starts
        return _error(str(err))
    finally:
        store.close()
    if code != EXIT_INTERRUPTED:
        print(f"results: {store.path}")
        print(f"next: lopkit report {shlex.quote(str(out))}")
    return code


def _run(args: argparse.Namespace) -> int:
    """Validate everything first, then run the seeds (vectorised or in turn); exit 0, 1 (a run failed), 2 (bad input) or 130."""
    from lopkit.benchmarks.base import check_accepts_methods, get_benchmark
    from lopkit.configs import config_to_dict, parse_overrides
    from lopkit.runner.execute import method_label, resolve_methods
    from lopkit.runner.store import ResultStore, StoreError

    try:
        cls = get_benchmark(args.benchmark)
        config = cls.make_config(args.preset, parse_overrides(args.overrides))
        seeds = resolve_seeds(args.seeds, args.seed_list, args.seed_offset)
        method_names = args.methods or ["sgd"]
        # unknown methods / bad hyper-parameters / a benchmark that cannot apply methods fail before anything runs
        check_accepts_methods(cls, resolve_methods(method_names))
        if args.checkpoint_every is not None and args.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
        apply_threads(args)
        workers = parse_workers(args.workers)
    except ConfigError as err:
        return _error(str(err))

    out = Path(args.out) if args.out else Path("runs") / cls.name
    label = method_label(method_names)
    progress = progress_mode(args)
    print(f"experiment {out}: {cls.name} preset={args.preset} method={label} seeds={','.join(map(str, seeds))}")
    print(f"config: {json.dumps(config_to_dict(config), sort_keys=True)}")
    if workers > len(seeds):
        print(f"note: --workers {workers} is more than the {len(seeds)} seed{'s' if len(seeds) != 1 else ''}; "
              f"using {len(seeds)} worker{'s' if len(seeds) != 1 else ''} (one per seed)")
        workers = len(seeds)
    try:
        store = ResultStore(out)
    except StoreError as err:  # damaged, not a lopkit store, or read-only: one line, the file untouched
        return _error(str(err))
    except OSError as err:
        return _error(f"cannot open the results store in {out}: {err}")
    if workers > 1:
        return _run_in_workers(args, store, cls, config, seeds, method_names, out, workers)
    failures = 0
    try:
        for seed, result in run_seeds(store, cls, config, seeds, method_names, args.checkpoint_every, progress,
                                      preset=args.preset, vectorise=not args.no_vectorise):
            if isinstance(result, Exception):  # a benchmark's constructor (bad combination of values,
                # missing dataset) or a store that cannot be written
                return _error(str(result))
            if result is None or result.status == "interrupted":
                where = f" at step {result.step}/{result.total_steps}" if result is not None else ""
                print(f"seed {seed}: interrupted{where}; completed chunks are saved in {store.path}", file=sys.stderr)
                print(f"to resume, run the same command again: {resume_command(args, out)}", file=sys.stderr)
                return EXIT_INTERRUPTED
            print(describe_result(seed, result))
            if result.status == "failed":
                failures += 1
                print(f"error: seed {seed} failed: {result.error_line} (full traceback in the store, runs.error)",
                      file=sys.stderr)
    finally:
        store.close()
    print(f"results: {store.path}")
    print(f"next: lopkit report {shlex.quote(str(out))}")
    return EXIT_FAILED if failures else EXIT_OK


# -------------------------------------------------------------------------------------------------- list


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field) of a dataclass and its bases, by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError, IndentationError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _type_name(kind: Any) -> str:
    """Short readable name of a field type (``int``, ``tuple[str, ...]``, ``Literal['a', 'b']``)."""
    return kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")


def describe_benchmark(cls: Any) -> str:
    """The ``lopkit list`` block of one benchmark: description, presets (with their overrides) and fields."""
    lines = [f"{cls.name}: {cls.description or (cls.__doc__ or '').strip().splitlines()[0]}"]
    lines.append("  presets:")
    for preset, values in cls.presets.items():
        shown = ", ".join(f"{k}={v}" for k, v in values.items()) or "(field defaults)"
        lines.append(f"    {preset}: {shown}")
    lines.append("  config fields (--set key=value):")
    hints = typing.get_type_hints(cls.Config)
    docs = field_docs(cls.Config)
    for field in dataclasses.fields(cls.Config):
        if not field.init:
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = field.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        doc = f"  {docs[field.name]}" if field.name in docs else ""
        lines.append(f"    {field.name}: {_type_name(hints.get(field.name, field.type))} = {default!r}{doc}")
    nested = nested_keys(cls.Config)
    if nested:
        lines.append("  nested keys (--set group.key=value, the same as the field):")
        lines += [f"    {key} = {field}" for key, field in sorted(nested.items())]
    return "\n".join(lines)


def _list(args: argparse.Namespace) -> int:
    """Print benchmarks (or one), their presets and config fields, and the known methods."""
    from lopkit.benchmarks.registry import benchmark_names, get_benchmark
    from lopkit.mitigations.registry import METHOD_ALIASES, available_methods
    from lopkit.runner.runs_table import is_experiment_path, list_runs

    if args.benchmark and is_experiment_path(args.benchmark):  # lopkit list EXPERIMENT_DIR: its runs
        return list_runs(args.benchmark)
    try:
        names = [args.benchmark] if args.benchmark else benchmark_names()
        classes = [get_benchmark(name) for name in names]
    except ConfigError as err:
        return _error(str(err))
    print("\n\n".join(describe_benchmark(cls) for cls in classes))
    print(f"\nmethods (--method NAME[:key=value...][,NAME...]): {', '.join(available_methods())}")
    print(f"aliases: {', '.join(f'{alias}={name}' for alias, name in sorted(METHOD_ALIASES.items()))}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------- parsers


def register(subparsers: Any) -> None:
    """Add the ``run`` and ``list`` sub-commands."""
    run = subparsers.add_parser(
        "run", help="run a benchmark for several seeds into EXPERIMENT_DIR/results.sqlite (resumable)",
        description=textwrap.fill(
            "Run BENCHMARK for each seed, storing tidy metric rows and checkpoints in OUT/results.sqlite. Seeds "
            "run one after the other, or as one vectorised learner in this process when the benchmark and methods "
            "allow it (same rows within float rounding; the first line says which). With --workers N the seeds are cut "
            "into N contiguous parts, each run that way in its own process with --threads shared out. Rerunning the "
            "same command skips finished seeds and resumes an interrupted one from its last checkpoint, giving "
            "exactly the rows of an uninterrupted run.", width=78),
        epilog="examples:\n"
               "  lopkit run toy --preset smoke --seeds 2\n"
               "  lopkit run bitflip --set width=50 --method cbp --out runs/e3\n"
               "  lopkit run class_split --seed-list 40,41,42 --set norm=layer\n"
               "  lopkit run random_labels --preset e1 --seeds 8 --workers 2 --threads 1\n"
               "      (on 2 cores: 2 processes, each training 4 seeds as one vectorised learner on 1 thread)\n"
               "exit codes: 0 ok, 1 a run failed (traceback kept in the store), 2 bad input, 130 interrupted\n"
               "see the config fields with 'lopkit list BENCHMARK'; plot with 'lopkit report OUT'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("benchmark", metavar="BENCHMARK", help="registered benchmark name (see 'lopkit list')")
    run.add_argument("--preset", default="default", help="config preset: smoke, default, paper or a benchmark's own (lopkit list BENCHMARK shows them; default: %(default)s)")
    seeds = run.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", default=None, metavar="N",
                       help=f"seeds to run: {SEEDS_HELP}; each plus OFFSET (default: {DEFAULT_SEEDS})")
    seeds.add_argument("--seed-list", default=None, metavar="S,S,...", help="explicit seeds, e.g. 0,1,2")
    run.add_argument("--seed-offset", type=int, default=0, metavar="K", help="added to every seed (default: 0)")
    run.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set width=50 lr=0.01 (repeatable)")
    run.add_argument("--method", dest="methods", action="append", default=[], metavar="NAME[,NAME...]",
                     help="mitigation(s) to apply, composed in order and separated by ',' or '+', e.g. cbp or "
                          "cbp:replacement_rate=1e-4,l2init; aliases such as snp work (default: sgd, i.e. none)")
    run.add_argument("--out", default=None, metavar="DIR", help="experiment folder (default: runs/BENCHMARK)")
    run.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                     help="steps between checkpoints (default: a twentieth of the run; also at least every 30 s)")
    run.add_argument("--no-vectorise", action="store_true",
                     help="run the seeds one after the other even when they could be trained as one vectorised "
                          "learner (by default they are when the benchmark and methods allow it)")
    run.add_argument("--workers", default="1", metavar="N",
                     help="processes to share the seeds: N contiguous parts, each trained in its own process as "
                          "one vectorised learner when allowed (else seed by seed), --threads shared out between "
                          "them (1 each when not given); all write OUT/results.sqlite. On a 2-core machine "
                          "use --workers 2 --threads 1 (default: 1, every seed in this process)")
    add_threads_flag(run)
    add_progress_flags(run)
    run.set_defaults(func=_run)

    listing = subparsers.add_parser(
        "list", help="list benchmarks with their presets and config fields, or the runs of an experiment folder",
        description="Show every registered benchmark (or only BENCHMARK): its description, presets and each "
                    "config field with its type, default and meaning, plus the available methods. Given an "
                    "experiment folder, show its runs instead: status (finished, running, failed, or interrupted "
                    "when the process running it is gone), progress and the last line of any error.")
    listing.add_argument("benchmark", nargs="?", default=None, metavar="BENCHMARK|EXPERIMENT_DIR",
                         help="show only this benchmark, or the runs stored in this experiment folder")
    listing.set_defaults(func=_list)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lopkit`` CLI (for ``python -m lopkit.runner.cli``)."""
    from lopkit.cli import main as lopkit_main

    return lopkit_main(list(argv) if argv is not None else None)


if __name__ == "__main__":
    sys.exit(main())
