"""run_sweep: every run of a sweep on one backend, skipping finished runs and resuming unfinished ones."""

from __future__ import annotations

import os

from lopkit.runner.store import ResultStore
from lopkit.runner.sweep.collect import Collector, progress_bar, run_sequential
from lopkit.runner.sweep.local import run_local
from lopkit.runner.sweep.planning import plan_tasks
from lopkit.runner.sweep.ray_backend import cluster_cpus, import_ray, init_ray, run_ray
from lopkit.runner.sweep.schema import BACKENDS, RunOutcome, Sweep

__all__ = ["run_sweep"]


def run_sweep(
    sweep: Sweep,
    backend: str = "local",
    *,
    max_workers: int | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    store_mode: str = "auto",
    threads_per_run: int | None = 1,
    progress: bool | str = True,
) -> list[RunOutcome]:
    """Execute every run of ``sweep`` on ``backend``; one outcome per run, in sweep order.

    Finished runs are skipped (status ``skipped``); unfinished ones resume from their last checkpoint; a run
    that raises is ``failed`` (traceback in the store and the outcome) and the sweep goes on. On Ctrl-C the
    running runs commit a checkpoint, the rest are ``cancelled``, and the sweep returns early.

    ``max_workers``: processes of the ``local`` backend (default: CPU count). ``address``/``num_cpus``: an
    existing Ray cluster to join, or the CPUs of the local Ray it starts. ``store_mode``: ``shared`` (workers
    write the store themselves), ``driver`` (workers use a private store and ship rows back; for clusters
    whose nodes do not share the experiment folder's disk) or ``auto`` (``driver`` with an ``address``).
    ``threads_per_run``: torch intra-op threads inside each run (None leaves torch's default).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if store_mode not in ("auto", "shared", "driver"):
        raise ValueError(f"store_mode must be auto, shared or driver, got {store_mode!r}")
    if max_workers is not None and max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    if threads_per_run is not None and threads_per_run < 1:
        raise ValueError(f"threads_per_run must be >= 1 (or None for torch's default), got {threads_per_run}")
    if address and backend != "ray":
        raise ValueError("an address is only used by the ray backend; add --backend ray")
    driver_writes = store_mode == "driver" or (store_mode == "auto" and backend == "ray" and bool(address))
    ray = import_ray() if backend == "ray" else None
    sweep.experiment.mkdir(parents=True, exist_ok=True)
    with ResultStore(sweep.experiment) as store:
        store.ensure_writable()  # read-only storage: one StoreError before any worker starts
        configs = [spec.make_config() for spec in sweep.runs]
        done: dict[int, RunOutcome] = {}
        for index, (spec, config) in enumerate(zip(sweep.runs, configs)):
            record = store.get_run(spec.stored_run_id(store, config))
            if record is not None and record["status"] == "finished":
                done[index] = RunOutcome(spec, "skipped")
        pending = [i for i in range(len(sweep.runs)) if i not in done]
        bar = progress_bar(len(sweep.runs), len(done), progress, f"sweep ({backend})")
        collect = Collector(sweep, store, driver_writes, bar)
        collect.outcomes.update(done)
        shared_store = None if driver_writes else str(sweep.experiment)
        started_ray = False
        try:
            if backend == "sequential":
                tasks = plan_tasks(sweep, pending, shared_store, 1, threads_per_run)
                run_sequential(tasks, collect)
            elif backend == "local":
                workers = max_workers or os.cpu_count() or 1
                tasks = plan_tasks(sweep, pending, shared_store, workers, threads_per_run)
                if tasks:
                    run_local(tasks, collect, min(workers, len(tasks)))
            elif pending:
                started_ray = init_ray(ray, address, num_cpus)
                tasks = plan_tasks(sweep, pending, shared_store, cluster_cpus(ray), threads_per_run)
                run_ray(tasks, collect, ray)
        finally:
            if bar is not None:
                bar.close()
            if started_ray:
                ray.shutdown()
    return [collect.outcomes.get(i, RunOutcome(spec, "cancelled")) for i, spec in enumerate(sweep.runs)]
