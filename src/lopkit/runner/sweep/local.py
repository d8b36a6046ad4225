"""The ``local`` backend: a pool of spawned worker processes; a worker that dies costs only its own task."""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import traceback
from typing import Any

from lopkit.runner.sweep.collect import Collector
from lopkit.runner.sweep.tasks import Task, TaskResult, run_task, worker_init

__all__ = ["WORKER_DEATH_RETRIES", "describe_worker_death", "run_local", "worker_death_error"]

WORKER_DEATH_RETRIES = 1
"""How often a task whose worker process died (crash, SIGKILL, out-of-memory kill) is run again on a fresh
worker before its runs are recorded as failed. The retry resumes from the run's last checkpoint."""


def describe_worker_death(exitcode: int | None) -> str:
    """Why a worker process ended, for the error of its run: ``signal 9 / SIGKILL: killed, maybe out of memory``."""
    if exitcode is None:
        return "the process vanished"
    if exitcode < 0:
        number = -exitcode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown signal"
        if number == signal.SIGKILL:
            return f"signal {number} / {name}: killed, maybe by the out-of-memory killer"
        return f"signal {number} / {name}"
    return f"exit code {exitcode}"


SWEEP_RESUME_HINT = "rerun the sweep"


def worker_death_error(cause: str, attempts: int, resume_hint: str = SWEEP_RESUME_HINT) -> str:
    """The error recorded for the runs of a task whose worker died ``attempts`` times; ``resume_hint`` says what
    to run again (the sweep, or the same ``lopkit run --workers`` command)."""
    tries = f" (on each of its {attempts} attempts)" if attempts > 1 else ""
    return (f"worker process died ({cause}) while running this run{tries}; the other runs went on; "
            f"{resume_hint} to resume it from its last checkpoint")


def _worker_loop(conn: Any, stop_event: Any) -> None:
    """A local-backend worker: run the tasks received on ``conn`` one at a time, send back their results."""
    worker_init(stop_event)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the driver is gone
            return
        if task is None:
            return
        try:
            results = run_task(task)
        except KeyboardInterrupt:  # a second Ctrl-C inside a run: its last commit is in the store
            results = [TaskResult(index, "interrupted") for index in task.indices]
        except BaseException:  # noqa: BLE001  (never lose the answer: the driver waits for it)
            results = [TaskResult(index, "failed", traceback.format_exc()) for index in task.indices]
        try:
            conn.send(results)
        except (EOFError, OSError):  # the driver is gone
            return
        except Exception:  # noqa: BLE001  (a result that cannot be pickled: report that instead)
            conn.send([TaskResult(index, "failed", traceback.format_exc()) for index in task.indices])


class _LocalWorker:
    """One spawned worker process of the local backend, the driver's end of its pipe and the task it runs."""

    def __init__(self, context: Any, stop_event: Any):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_loop, args=(child, stop_event), name="lopkit-sweep-worker")
        self.process.start()
        child.close()
        self.task: Task | None = None

    def send(self, task: Task) -> None:
        """Hand ``task`` to the worker."""
        self.task = task
        self.conn.send(task)

    def interrupt(self) -> None:
        """Forward one SIGINT (the worker lives in its own process group, so a terminal's Ctrl-C misses it)."""
        with contextlib.suppress(OSError, TypeError):
            os.kill(self.process.pid, signal.SIGINT)

    def stop(self, timeout: float) -> None:
        """Ask the worker to exit, wait up to ``timeout`` seconds, then terminate it."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.conn.close()


def run_local(tasks: list[Task], collect: Collector, max_workers: int, resume_hint: str = SWEEP_RESUME_HINT) -> bool:
    """Tasks on up to ``max_workers`` spawned worker processes; returns True if interrupted (Ctrl-C).

    A worker that dies (crash, SIGKILL, out-of-memory kill) costs only the task it was running: that task is
    run once more on a fresh worker (``WORKER_DEATH_RETRIES``), then its runs are recorded as failed with the
    cause, while every other task goes on.
    """
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    queue = collections.deque(tasks)
    deaths: dict[int, int] = {}
    workers: list[_LocalWorker] = []
    interrupted = False
    try:
        while True:
            try:
                if not interrupted:
                    for worker in workers:
                        if worker.task is None and queue:
                            worker.send(queue.popleft())
                    while queue and len(workers) < max_workers:
                        workers.append(_LocalWorker(context, stop))
                        workers[-1].send(queue.popleft())
                busy = [w for w in workers if w.task is not None]
                if not busy:
                    break
                ready = set(multiprocessing.connection.wait(
                    [w.conn for w in busy] + [w.process.sentinel for w in busy]))
                for worker in busy:
                    if worker.conn in ready or worker.process.sentinel in ready:
                        _settle(worker, workers, queue, deaths, collect, retry=not interrupted,
                                resume_hint=resume_hint)
            except KeyboardInterrupt:
                if interrupted:
                    raise
                interrupted = True
                stop.set()  # workers start no new task
                queue.clear()  # runs not started stay 'cancelled'
                for worker in workers:
                    if worker.task is not None:
                        worker.interrupt()  # running runs commit what they have and return 'interrupted'
                print("\ninterrupt: the running runs are saving a checkpoint (press Ctrl-C again to abort at once)",
                      file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # second Ctrl-C: abort now; the store holds every run's last commit
        for worker in workers:
            worker.interrupt()
        raise
    finally:
        for worker in workers:
            worker.stop(timeout=10 if worker.task is None else 0.5)
    return interrupted


def _settle(worker: _LocalWorker, workers: list[_LocalWorker], queue: Any, deaths: dict[int, int],
            collect: Collector, retry: bool, resume_hint: str = SWEEP_RESUME_HINT) -> None:
    """Collect a worker's answer, or handle its death: retry its task on a fresh worker, or fail its runs."""
    task = worker.task
    assert task is not None
    try:
        results = worker.conn.recv()
    except (EOFError, OSError):
        results = None
    except Exception:  # noqa: BLE001  (an answer that cannot be unpickled)
        worker.task = None
        collect.fail(task, traceback.format_exc())
        return
    if results is not None:
        worker.task = None
        collect.add(results)
        return
    worker.process.join(5)
    cause = describe_worker_death(worker.process.exitcode)
    workers.remove(worker)
    worker.task = None
    worker.conn.close()
    attempts = deaths[id(task)] = deaths.get(id(task), 0) + 1
    labels = ", ".join(spec.label for spec in task.specs)
    if retry and attempts <= WORKER_DEATH_RETRIES:
        print(f"warning: a sweep worker died ({cause}) while running {labels}; running it again on a fresh "
              "worker", file=sys.stderr, flush=True)
        queue.appendleft(task)
        return
    print(f"warning: a sweep worker died ({cause}) while running {labels}; recorded as failed, the sweep goes on",
          file=sys.stderr, flush=True)
    collect.fail(task, worker_death_error(cause, attempts, resume_hint))
