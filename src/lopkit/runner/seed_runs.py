"""The seeds of one ``lopkit run`` in one process (one vectorised learner when it can, else in turn), and how
``--workers N`` splits them between processes.

:func:`run_seeds` is the one seed loop: ``lopkit run`` calls it in its own process, and each worker of
``lopkit run --workers N`` calls it for its part of the seeds (:data:`lopkit.runner.sweep.tasks.SEEDS_ENGINE`),
so a worker trains its part exactly as ``lopkit run --seed-list PART`` would.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from lopkit.configs import ConfigError

__all__ = ["describe_result", "parse_workers", "run_seeds", "seed_parts", "seeds_refusal", "threads_per_worker"]


def describe_result(seed: int, result: Any) -> str:
    """One line about a finished, skipped or failed run."""
    if result.status == "skipped":
        return f"seed {seed}: already finished (run {result.run_id}), skipped"
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    return (f"seed {seed}: {result.status} at step {result.step}/{result.total_steps} in {result.seconds:.1f}s"
            f"{resumed} (run {result.run_id})")


def parse_workers(value: Any) -> int:
    """``--workers``: a whole number >= 1 (ConfigError naming the option otherwise)."""
    try:
        if isinstance(value, bool):
            raise ValueError
        workers = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"--workers expects a whole number of worker processes >= 1, e.g. --workers 2; "
                          f"got {value!r}") from None
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1 (1 = every seed in this process), got {workers}")
    return workers


def seed_parts(seeds: Sequence[int], parts: int) -> list[list[int]]:
    """``seeds`` cut into ``min(parts, len(seeds))`` contiguous parts whose sizes differ by at most one (larger first)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    seeds = list(seeds)
    count = min(parts, len(seeds))
    if count == 0:
        return []
    size, extra = divmod(len(seeds), count)
    cut, start = [], 0
    for index in range(count):
        stop = start + size + (1 if index < extra else 0)
        cut.append(seeds[start:stop])
        start = stop
    return cut


def threads_per_worker(threads: int | None, workers: int) -> int:
    """Torch threads of each of ``workers`` processes: ``--threads`` shared out (at least 1), or 1 when not given."""
    return 1 if threads is None else max(1, int(threads) // max(1, int(workers)))


def seeds_refusal(cls: Any, config: Any, count: int, methods: Sequence[Any], vectorise: bool = True) -> str | None:
    """Why ``count`` seeds of ``config`` run one after the other rather than as one vectorised learner (None: vectorised)."""
    from lopkit.runner.vectorised import vectorisation_refusal

    if not vectorise:
        return "--no-vectorise"
    return vectorisation_refusal(cls, [config] * count, list(methods))


def run_seeds(
    store: Any,
    cls: Any,
    config: Any,
    seeds: Sequence[int],
    method_names: Sequence[str],
    checkpoint_every: int | None,
    progress: Any,
    *,
    preset: str | None,
    vectorise: bool = True,
    log: Callable[[str], None] = print,
    announce: bool = True,
) -> Iterator[tuple[int, Any]]:
    """Yield ``(seed, RunResult | None (interrupted) | set-up error)``: one vectorised learner when it can, else each seed.

    ``log`` gets the seed group's own lines and, with ``announce``, the line saying which path the seeds take.
    """
    from lopkit.runner.execute import SETUP_ERRORS, execute_run, resolve_methods
    from lopkit.runner.store import StoreError
    from lopkit.runner.vectorised import execute_group

    seeds = list(seeds)
    runner_name = getattr(cls, "seed_group_runner", None)  # bitflip: its own seed group (lean engine, CBP)
    if runner_name is not None and len(seeds) > 1 and vectorise:
        module_name, _, function_name = runner_name.partition(":")
        run_seed_group = getattr(importlib.import_module(module_name), function_name)
        try:
            grouped = run_seed_group(store, config, seeds, method_names, checkpoint_every, preset=preset,
                                     log=log) or {}
        except (*SETUP_ERRORS, StoreError) as err:
            yield seeds[0], err
            return
        for seed in seeds:
            try:
                yield seed, grouped.get(seed) or execute_run(store, cls, config, seed, method_names, checkpoint_every,
                                                             progress, preset=preset, raise_on_error=False)
            except (*SETUP_ERRORS, StoreError) as err:
                yield seed, err
                return
            except KeyboardInterrupt:
                yield seed, None
        return
    reason = seeds_refusal(cls, config, len(seeds), resolve_methods(method_names), vectorise)
    if len(seeds) > 1 and announce:
        log(f"vectorised: {len(seeds)} seeds trained as one learner in this process" if reason is None
            else f"separate runs: {reason}")
    if reason is None:
        try:
            results = execute_group(store, cls, [(config, seed) for seed in seeds], method_names, checkpoint_every,
                                    progress, preset=preset, log=log)
        except (*SETUP_ERRORS, StoreError) as err:
            yield seeds[0], err
            return
        except KeyboardInterrupt:
            results = [None] * len(seeds)
        yield from zip(seeds, results)
        return
    for seed in seeds:
        try:
            yield seed, execute_run(store, cls, config, seed, method_names, checkpoint_every, progress,
                                    preset=preset, raise_on_error=False)
        except (*SETUP_ERRORS, StoreError) as err:
            yield seed, err
            return
        except KeyboardInterrupt:
            yield seed, None
