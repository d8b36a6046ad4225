"""The ``ray`` backend: one Ray task per task (``num_cpus=1``), on a local Ray or an existing cluster."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from typing import Any

from lopkit.runner.sweep.collect import Collector
from lopkit.runner.sweep.local import WORKER_DEATH_RETRIES, worker_death_error
from lopkit.runner.sweep.schema import RAY_INSTALL_HINT
from lopkit.runner.sweep.tasks import Task, run_task

__all__ = ["cluster_cpus", "import_ray", "init_ray", "run_ray"]


def import_ray() -> Any:
    """Import Ray lazily, with the install hint when it is missing."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise RuntimeError(RAY_INSTALL_HINT) from None
    return ray


def init_ray(ray: Any, address: str | None, num_cpus: int | None) -> bool:
    """Connect to ``address`` or start a quiet local Ray; returns True if this call started it."""
    if ray.is_initialized():
        return False
    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
    return True


def run_ray(tasks: list[Task], collect: Collector, ray: Any) -> bool:
    """One Ray task per task (``num_cpus=1`` each); returns True if interrupted (Ctrl-C)."""
    # a task whose worker process dies is retried once by Ray (as the local backend does), then recorded failed
    remote = ray.remote(num_cpus=1, max_retries=WORKER_DEATH_RETRIES)(run_task)
    refs = {remote.remote(task): task for task in tasks}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                _collect_ray(ray, ref, refs[ref], collect)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)
        print("\ninterrupt: cancelled the remaining Ray tasks; rerun the sweep to continue",
              file=sys.stderr, flush=True)
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=30)
        for ref in done:
            _collect_ray(ray, ref, refs[ref], collect)
        return True
    return False


def _collect_ray(ray: Any, ref: Any, task: Task, collect: Collector) -> None:
    """Record a finished Ray task's results (or its crash / cancellation)."""
    try:
        results = ray.get(ref)
    except ray.exceptions.TaskCancelledError:
        return
    except Exception as err:  # noqa: BLE001  (worker died, serialisation failed...)
        died = tuple(getattr(ray.exceptions, name) for name in (
            "WorkerCrashedError", "OutOfMemoryError", "NodeDiedError", "LocalRayletDiedError")
            if hasattr(ray.exceptions, name))
        if isinstance(err, died):
            cause = {"OutOfMemoryError": "killed by Ray's out-of-memory monitor",
                     "NodeDiedError": "its node died"}.get(type(err).__name__, "the Ray worker crashed or was killed")
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            collect.fail(task, f"{traceback.format_exc()}\n"
                               f"{worker_death_error(f'{cause}: {first.strip()}', 1 + WORKER_DEATH_RETRIES)}")
            return
        collect.fail(task, traceback.format_exc())
        return
    collect.add(results)


def cluster_cpus(ray: Any) -> int:
    """CPUs of the connected Ray cluster (at least 1)."""
    with contextlib.suppress(Exception):
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return 1
