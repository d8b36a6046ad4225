"""``lopkit run bitflip --seeds``: several bit-flipping seeds trained as one vectorised learner, written to the store.

The training is :class:`lopkit.benchmarks.vmap_seeds.BitFlipSeedGroup`; this runner-side module owns the store
access (benchmarks never open the store), the way :func:`lopkit.runner.execute.execute_run` does for one run.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from lopkit.benchmarks.bitflip import BitFlipBenchmark, BitFlipBenchmarkConfig
from lopkit.benchmarks.vmap_seeds import BitFlipSeedGroup, group_unsupported_reason
from lopkit.configs import config_to_dict
from lopkit.runner.execute import RunResult, default_checkpoint_every, method_label, resolve_methods
from lopkit.runner.store import deserialize_state, serialize_state

__all__ = ["execute_seed_group"]


def execute_seed_group(
    store: Any,
    config: BitFlipBenchmarkConfig,
    seeds: Sequence[int],
    method_names: Sequence[str],
    checkpoint_every: int | None = None,
    *,
    preset: str | None = None,
    commit_seconds: float = 30.0,
    log: Callable[[str], None] = print,
) -> dict[int, Any] | None:
    """Run the bit-flipping ``seeds`` into ``store`` as one vectorised learner, as separate ``execute_run`` calls would.

    Each seed keeps its own run (id, rows, checkpoints), so a later command resumes or reports it as usual.
    Returns ``{seed: RunResult}`` for every seed, or None, after logging why, when the runs cannot be
    vectorised (:func:`group_unsupported_reason`; nothing is written then): the caller runs them one by one.
    When a member diverges (FloatingPointError) the seeds still training are left out of the result, after logging
    it: the caller continues each one alone from its last commit with ``execute_run``, which keeps every row before
    the divergence of the seed that diverged and finishes the others (the group's unsaved rows would be lost).
    """
    label = method_label(method_names)
    config_dict = config_to_dict(config)
    results: dict[int, Any] = {}
    pending: list[tuple[int, str]] = []
    for seed in seeds:
        run_id = store.resolve_run_id(BitFlipBenchmark.name, label, config, seed)
        existing = store.get_run(run_id)
        if existing is not None and existing["status"] == "finished":
            results[seed] = RunResult(run_id, "skipped", int(existing["step"]), existing["total_steps"])
        else:
            pending.append((seed, run_id))
    if len(pending) < 2:
        log(f"seeds: separate runs ({len(pending)} run(s) left to train; vectorising needs 2 or more)")
        return None
    benches = [BitFlipBenchmark(config, seed, resolve_methods(method_names)) for seed, _ in pending]
    for (seed, run_id), bench in zip(pending, benches):
        checkpoint = store.load_checkpoint_bytes(run_id)
        if checkpoint is not None:
            bench.load_state_dict(deserialize_state(checkpoint[1]))
    reason = group_unsupported_reason(benches)
    if reason is not None:
        log(f"seeds: separate runs, one after the other (cannot vectorise: {reason})")
        return None
    group = BitFlipSeedGroup(benches)
    start_step = group.step
    log(f"seeds: {len(benches)} runs trained as one vectorised learner (method {label}, from step {start_step})")
    total = benches[0].total_steps
    for (seed, run_id), bench in zip(pending, benches):
        store.start_run(BitFlipBenchmark.name, label, config_dict, seed, preset=preset, run_id=run_id)
        store.set_total_steps(run_id, total)
    chunk = int(checkpoint_every) if checkpoint_every is not None else default_checkpoint_every(total)
    rows: list[list[dict[str, Any]]] = [[] for _ in benches]
    started = last_commit = time.monotonic()
    since_commit = 0

    def commit() -> None:
        nonlocal rows, since_commit, last_commit
        for (_seed, run_id), bench, chunk_rows in zip(pending, benches, rows):
            store.commit_chunk(run_id, chunk_rows, serialize_state(bench.state_dict()), bench.step)
        rows, since_commit, last_commit = [[] for _ in benches], 0, time.monotonic()

    status = "finished"
    try:
        while group.step < total:
            piece = max(1, min(chunk - since_commit, 2000))
            before = group.step
            for index, new_rows in enumerate(group.run(piece)):
                rows[index] += new_rows
            since_commit += group.step - before
            if since_commit >= chunk or time.monotonic() - last_commit >= commit_seconds or group.step >= total:
                commit()
    except KeyboardInterrupt:
        commit()  # the rows of whole blocks are consistent with the saved states
        status = "interrupted"
    except FloatingPointError as err:  # a member diverged: each run goes on alone from its last commit
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        log(f"vectorised learner stopped ({first}); continuing each run separately from its last checkpoint")
        return results
    except Exception:  # noqa: BLE001  (recorded in every run, as execute_run records its run's failure)
        text = traceback.format_exc()
        for seed, run_id in pending:
            store.fail_run(run_id, text)
            stored = store.get_run(run_id) or {}
            results[seed] = RunResult(run_id, "failed", int(stored.get("step") or 0), total,
                                      time.monotonic() - started, text, start_step or None)
        return results
    for (seed, run_id), bench in zip(pending, benches):
        if status == "finished":
            store.finish_run(run_id)
        results[seed] = RunResult(run_id, status, bench.step, total, time.monotonic() - started,
                                  resumed_from=start_step or None)
    return results
