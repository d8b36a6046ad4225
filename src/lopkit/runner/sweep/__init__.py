"""Sweeps: a YAML file of benchmarks x methods x grids x seeds, expanded into runs and executed on a backend.

A sweep file (see ``docs/sweeps.md``) is parsed and validated at once by :func:`load_sweep`: unknown keys,
unknown benchmarks, presets, config values (through the benchmark's ``make_config``) and method names
(through the mitigation registry) are all collected and reported in one :class:`SweepError`. The result is
a :class:`Sweep`, a flat, ordered list of :class:`RunSpec` (one per benchmark x grid point x method x seed).

:func:`run_sweep` executes the runs with one of three backends, each run through
:func:`lopkit.runner.execute.execute_run` into the same results store as ``lopkit run``
(``EXPERIMENT/results.sqlite``):

- ``sequential``: one run after the other in this process (the reference);
- ``local``: a pool of spawned worker processes on this machine (a worker that dies, e.g. killed by the
  out-of-memory killer, costs only its own run: it is retried once on a fresh worker, then recorded failed);
- ``ray``: one Ray task per run (``num_cpus=1``), on a local Ray instance or an existing cluster (``address``).

Workers re-open the store themselves (SQLite in WAL mode lets several processes write). Finished runs are
skipped, unfinished ones resume from their last checkpoint, and a run that raises is recorded as failed
with its traceback without stopping the sweep. :func:`run_sweep` returns one :class:`RunOutcome` per run.

Fast path (``vectorize_seeds: true``): runs of the ``bitflip`` benchmark that share a config, use no
mitigation and differ only by seed are trained together in one task by
:func:`lopkit.benchmarks.vmap_seeds.run_bitflip_seeds`, which writes the same rows per run into the store
(equal to separate runs up to float32 rounding). ``vectorize_engine`` picks its engine: ``lean`` (default,
the benchmark's hand-written step batched over seeds) or ``func`` (``torch.func.vmap`` over any learner;
faster than separate autograd runs but slower than the lean engine on this two-layer net, see
``benchmarks/sweep_backends.py``).

The package is split by job: :mod:`~lopkit.runner.sweep.schema` (keys, specs, parsing),
:mod:`~lopkit.runner.sweep.planning` (tasks), :mod:`~lopkit.runner.sweep.tasks` (what a worker runs),
:mod:`~lopkit.runner.sweep.local` (process pool), :mod:`~lopkit.runner.sweep.ray_backend` (Ray),
:mod:`~lopkit.runner.sweep.driver` (:func:`run_sweep`) and :mod:`~lopkit.runner.sweep.summary`.
"""

from __future__ import annotations

from lopkit.runner.sweep.driver import run_sweep
from lopkit.runner.sweep.local import WORKER_DEATH_RETRIES, describe_worker_death, worker_death_error
from lopkit.runner.sweep.planning import plan_tasks
from lopkit.runner.sweep.schema import (
    BACKENDS,
    RAY_INSTALL_HINT,
    VECTORIZE_ENGINES,
    RunOutcome,
    RunSpec,
    Sweep,
    SweepError,
    load_sweep,
    parse_sweep,
)
from lopkit.runner.sweep.summary import format_summary, summary_counts

_plan_tasks = plan_tasks  # the name tests and scripts knew before the split

__all__ = [
    "BACKENDS",
    "RAY_INSTALL_HINT",
    "VECTORIZE_ENGINES",
    "WORKER_DEATH_RETRIES",
    "RunOutcome",
    "RunSpec",
    "Sweep",
    "SweepError",
    "describe_worker_death",
    "format_summary",
    "load_sweep",
    "parse_sweep",
    "plan_tasks",
    "run_sweep",
    "summary_counts",
    "worker_death_error",
]
