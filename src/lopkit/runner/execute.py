"""Run one (benchmark, config, seed, methods) into a results store: chunked, checkpointed, resumable.

:func:`execute_run` builds the benchmark, registers the run in the store and, if the store holds a checkpoint
of it, restores it; a finished run is skipped without building anything, and a set-up error (a bad config, a
missing dataset: :data:`SETUP_ERRORS`) is raised before anything is written. It then advances the benchmark in
small pieces (about a second each, for a live progress bar) and commits the rows produced together with a
checkpoint every ``checkpoint_every`` steps (default: a twentieth of the run) or at most every
``commit_seconds`` of wall time, whichever comes first. Because rows and checkpoint are committed in one
transaction, a run killed at any moment (even with SIGKILL) resumes from its last commit and ends with exactly
the rows of an uninterrupted run.

Ctrl-C (SIGINT) is handled gracefully: the piece in progress finishes, what is complete is committed, and the
run returns with status ``interrupted`` (a second Ctrl-C aborts at once; the store stays consistent). An
exception marks the run ``failed`` with its traceback (rows already committed are kept) and is re-raised, or
returned as a failed :class:`RunResult` with ``raise_on_error=False``. A divergence (a non-finite loss) first
commits every row produced before it, with a checkpoint at the last finite step, by replaying from the last commit
(the buffered rows and those of the piece that raised are not lost).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Iterable, Iterator, Sequence

from lopkit.benchmarks.base import Benchmark, BenchmarkConfig, DivergedError, check_accepts_methods, get_benchmark
from lopkit.configs import ConfigError, config_to_dict, parse_overrides
from lopkit.data.errors import DatasetNotFoundError
from lopkit.mitigations.base import Mitigation
from lopkit.mitigations.registry import split_method_specs
from lopkit.runner.store import (
    ResultStore,
    deserialize_state,
    last_error_line,
    load_kept_state,
    run_id_candidates,
    serialize_state,
)

__all__ = [
    "BASELINE_METHOD",
    "RunResult",
    "SETUP_ERRORS",
    "default_checkpoint_every",
    "execute_run",
    "method_label",
    "progress_enabled",
    "resolve_methods",
    "split_method_names",
]

#: Errors of the set-up (bad config, missing dataset): raised before anything is written to the store.
SETUP_ERRORS = (ConfigError, DatasetNotFoundError)
#: Label of the run with no mitigation.
BASELINE_METHOD = "sgd"
#: Method names that mean "no mitigation" when the mitigation registry is not available.
_FALLBACK_NO_OP_NAMES = frozenset({"sgd", "none"})
#: Target wall time of one ``benchmark.run`` call (the progress bar's refresh granularity).
PIECE_SECONDS = 1.0
#: Environment variable that forces the progress bar on (1) or off (0) whatever the terminal.
PROGRESS_ENV = "LOPKIT_PROGRESS"


@dataclasses.dataclass
class RunResult:
    """What :func:`execute_run` did: ``finished``, ``skipped`` (already finished), ``failed``, ``interrupted`` or ``paused``.

    ``step`` is the last committed step (for a failed run: what a resume would restart from).
    """

    run_id: str
    status: str
    step: int
    total_steps: int | None
    seconds: float = 0.0
    error: str = ""
    resumed_from: int | None = None

    @property
    def error_line(self) -> str:
        """The last non-empty line of the error (for a traceback: the exception type and message)."""
        return last_error_line(self.error)


# ------------------------------------------------------------------------------------------------ methods


def _registry() -> Any | None:
    """``lopkit.mitigations.registry`` if it exists and offers ``get_method``, else None (imported lazily)."""
    try:
        import lopkit.mitigations.registry as registry
    except ModuleNotFoundError as err:
        if err.name and "lopkit.mitigations.registry".startswith(err.name):
            return None
        raise
    return registry if callable(getattr(registry, "get_method", None)) else None


def _no_op_names() -> frozenset[str]:
    """Names meaning "no mitigation" (the registry's list when available)."""
    registry = _registry()
    names = getattr(registry, "NO_OP_NAMES", None) if registry is not None else None
    return frozenset(names) if names else _FALLBACK_NO_OP_NAMES


def split_method_names(names: str | Iterable[str] | None) -> list[str]:
    """``["cbp:replacement_rate=1e-4,l2init", "snp"]`` -> one canonical spec per method (the registry's grammar)."""
    return split_method_specs(names)


def method_label(names: str | Iterable[str] | None) -> str:
    """The canonical label of a method list (``+``-joined specs, no-op names dropped; ``sgd`` for none)."""
    no_op = _no_op_names()
    kept = [s for s in split_method_names(names) if s.split(":")[0] not in no_op or ":" in s]
    return "+".join(kept) if kept else BASELINE_METHOD


def resolve_methods(names: str | Iterable[str] | None) -> list[Mitigation]:
    """Build the mitigations named in ``names`` (ConfigError for an unknown name or bad hyper-parameters).

    Uses ``lopkit.mitigations.registry.get_method(name, params)`` when that registry exists; without it only
    the no-op baselines ``sgd`` and ``none`` are known.
    """
    registry = _registry()
    methods: list[Mitigation] = []
    for spec in split_method_names(names):
        name, *pairs = spec.split(":")
        if registry is None:
            if name in _FALLBACK_NO_OP_NAMES and not pairs:
                continue
            raise ConfigError(
                f"unknown method {name!r}: the mitigation registry is not available, only "
                f"{', '.join(sorted(_FALLBACK_NO_OP_NAMES))} (no mitigation) can be used"
            )
        method = registry.get_method(name, parse_overrides(pairs) or None)
        if method is not None:
            methods.append(method)
    return methods


# ----------------------------------------------------------------------------------------------- progress


def progress_enabled(progress: bool | str) -> bool:
    """Whether to draw a bar: ``"always"``/``"never"`` force it; True means "if stderr is a terminal"."""
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if progress in ("never", False):
        return False
    if progress == "always" or forced in ("1", "true", "yes", "always"):
        return True
    if forced in ("0", "false", "no", "never"):
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _format_postfix(status: dict[str, Any]) -> dict[str, str]:
    """Short text of the benchmark's ``progress()`` values (floats to 4 significant digits)."""
    formatted = {}
    for key, value in status.items():
        if isinstance(value, float):
            formatted[str(key)] = f"{value:.4g}"
        else:
            formatted[str(key)] = str(value)
    return formatted


class _ProgressBar:
    """A tqdm bar on stderr (steps, ETA, the benchmark's live status), or nothing when disabled."""

    def __init__(self, enabled: bool, total: int, initial: int, description: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=description, unit="step", file=sys.stderr,
                            dynamic_ncols=True, mininterval=0.5, smoothing=0.1, leave=True)

    def update(self, steps: int, status: dict[str, Any]) -> None:
        """Advance by ``steps`` and show ``status``."""
        if self.bar is not None:
            if status:
                self.bar.set_postfix(_format_postfix(status), refresh=False)
            self.bar.update(steps)

    def close(self) -> None:
        """Close the bar (idempotent)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ------------------------------------------------------------------------------------------------- SIGINT


class _InterruptFlag:
    """Turns the first SIGINT into a flag checked between pieces; a second SIGINT raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False

    def handle(self, signum: int, frame: Any) -> None:
        """Signal handler."""
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing the current step block and saving a checkpoint "
              "(press Ctrl-C again to abort at once)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _graceful_sigint(enabled: bool) -> Iterator[_InterruptFlag]:
    """Install :class:`_InterruptFlag` for SIGINT while the body runs (main thread only; restored afterwards)."""
    flag = _InterruptFlag()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return
    # installed even over SIG_IGN: pool workers ignore SIGINT between runs but stop a running one gracefully
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, flag.handle)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------------------------- execution


def default_checkpoint_every(total_steps: int) -> int:
    """Steps between checkpoints when none is given: a twentieth of the run, at least 1."""
    return max(1, int(total_steps) // 20)


def _next_piece(rate: float | None, remaining_in_chunk: int, first_piece: int) -> int:
    """Steps of the next ``benchmark.run`` call: about ``PIECE_SECONDS`` of work, never past the checkpoint."""
    steps = first_piece if rate is None else max(1, int(rate * PIECE_SECONDS))
    return max(1, min(steps, remaining_in_chunk))


def _resolve_benchmark(benchmark_cls: type[Benchmark] | str) -> type[Benchmark]:
    """A benchmark class from a class or a registered name."""
    if isinstance(benchmark_cls, str):
        return get_benchmark(benchmark_cls)
    if not (isinstance(benchmark_cls, type) and issubclass(benchmark_cls, Benchmark)):
        raise TypeError(f"benchmark_cls must be a Benchmark subclass or a registered name, got {benchmark_cls!r}")
    return benchmark_cls


def execute_run(
    store: ResultStore,
    benchmark_cls: type[Benchmark] | str,
    config: BenchmarkConfig,
    seed: int,
    method_names: str | Sequence[str] = (),
    checkpoint_every: int | None = None,
    progress: bool | str = True,
    *,
    preset: str | None = None,
    label: str | None = None,
    raise_on_error: bool = True,
    commit_seconds: float = 30.0,
    stop_after_steps: int | None = None,
    handle_sigint: bool = True,
    keep_checkpoint: bool = False,
    initial_state: Any = None,
    run_id: str | None = None,
) -> RunResult:
    """Run (or resume, or skip if finished) one benchmark run into ``store``; returns what happened.

    ``method_names``: mitigation specs (see :func:`resolve_methods`); ``label`` overrides the method label stored
    in the ``runs`` table (and hashed into the run id; default :func:`method_label`). ``checkpoint_every``:
    steps between commits (default :func:`default_checkpoint_every`); commits also happen at least every
    ``commit_seconds``. ``progress``: True draws a bar on stderr if it is a terminal, ``"always"``/``"never"``
    force it (env ``LOPKIT_PROGRESS=1`` forces it too). ``keep_checkpoint``: keep the final ``state_dict()`` in
    the store after the run finishes (a later stage, e.g. fine-tuning or evaluation, loads the trained weights).
    ``initial_state``: for a benchmark that continues another run (``cls.continues_from(config)`` is not None), the
    kept state it starts from; when omitted it is read from the store and run that ``continues_from`` names.
    ``run_id``: the id the caller already resolved with ``store.resolve_run_id`` for this run (default: resolved
    here); ValueError if it is not an id of this (benchmark, label, config, seed).
    ``stop_after_steps``: commit and return with status
    ``paused`` after exactly that many new steps (a later call resumes from there). With ``raise_on_error`` an
    exception from the benchmark is recorded in the store and re-raised; otherwise a ``failed`` result is returned.
    """
    cls = _resolve_benchmark(benchmark_cls)
    if not isinstance(config, cls.Config):
        raise ConfigError(f"{cls.name} expects a {cls.Config.__name__}, got {type(config).__name__}")
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or int(checkpoint_every) < 1):
        raise ConfigError(f"checkpoint_every must be a positive number of steps, got {checkpoint_every!r}")
    if not (commit_seconds > 0):
        raise ConfigError(f"commit_seconds must be > 0, got {commit_seconds!r}")
    methods = resolve_methods(method_names)  # ConfigError before anything is written
    check_accepts_methods(cls, methods)  # a benchmark that cannot apply methods refuses them
    label = label or method_label(method_names)
    config_dict = config_to_dict(config)
    if run_id is None:
        run_id = store.resolve_run_id(cls.name, label, config, seed)
    elif run_id not in run_id_candidates(cls.name, label, config, seed):
        raise ValueError(f"run id {run_id!r} is not an id of this {cls.name} {label} run (seed {seed})")
    started = time.monotonic()

    existing = store.get_run(run_id)
    if existing is not None and existing["status"] == "finished":
        return RunResult(run_id, "skipped", int(existing["step"]), existing["total_steps"])
    build_kwargs: dict[str, Any] = {}
    source = cls.continues_from(config)
    if source is not None:  # the stage it continues: read here, so that a benchmark never opens a store
        if initial_state is None:
            try:
                initial_state = load_kept_state(*source)
            except ConfigError as err:
                raise ConfigError(f"{cls.name} continues run {source[1]!r} of {source[0]}: {err}") from None
        build_kwargs["initial_state"] = initial_state
    elif initial_state is not None:
        raise ConfigError(f"{cls.name} does not continue another run; drop initial_state")
    # built before the run is registered: a set-up error (missing dataset, impossible combination) leaves the
    # store untouched and propagates; any other error of the constructor is recorded as the run's failure below
    benchmark: Benchmark | None = None
    build_error: Exception | None = None
    try:
        benchmark = cls(config, seed, methods, **build_kwargs)
    except SETUP_ERRORS:
        raise
    except Exception as err:  # noqa: BLE001  (re-raised inside the recording block)
        build_error = err
    store.start_run(cls.name, label, config_dict, seed, preset=preset, run_id=run_id)

    bar: _ProgressBar | None = None
    resumed_from: int | None = None
    try:
        if build_error is not None or benchmark is None:
            raise build_error or RuntimeError(f"{cls.name} could not be built")
        total = int(benchmark.total_steps)
        store.set_total_steps(run_id, total)
        resumed_from = _restore_checkpoint(store, run_id, benchmark)
        chunk = int(checkpoint_every) if checkpoint_every is not None else default_checkpoint_every(total)
        bar = _ProgressBar(progress_enabled(progress), total, benchmark.step,
                           getattr(benchmark, "progress_label", None) or f"{cls.name} {label} seed={seed}")

        def rebuild() -> Benchmark:
            """A fresh benchmark at the run's last commit (what a resume builds): replays a diverged run's rows."""
            fresh = cls(config, seed, resolve_methods(method_names), **build_kwargs)
            _restore_checkpoint(store, run_id, fresh)
            return fresh

        with _graceful_sigint(handle_sigint) as interrupt:
            status = _advance(store, run_id, benchmark, chunk, commit_seconds, stop_after_steps, interrupt, bar,
                              rebuild)
        if status == "finished":
            store.finish_run(run_id, keep_checkpoint=keep_checkpoint)
        bar.close()
        return RunResult(run_id, status, benchmark.step, total, time.monotonic() - started, resumed_from=resumed_from)
    except KeyboardInterrupt:
        # a hard abort: the store holds the last commit and the run stays 'running', ready to resume
        if bar is not None:
            bar.close()
        raise
    except Exception as err:  # noqa: BLE001  (recorded, then re-raised or returned)
        if bar is not None:
            bar.close()
        text = traceback.format_exc()
        if isinstance(err, DivergedError):
            text = f"{text}\n{err}"  # the last line (RunResult.error_line): "... diverged at step N ...; lower lr"
        elif isinstance(err, FloatingPointError):
            text = f"{text}\nthe run diverged (non-finite loss): {err}"
        store.fail_run(run_id, text)
        if raise_on_error:
            raise
        stored = store.get_run(run_id) or {}
        return RunResult(run_id, "failed", int(stored.get("step") or 0), stored.get("total_steps"),
                         time.monotonic() - started, text, resumed_from)


def _restore_checkpoint(store: ResultStore, run_id: str, benchmark: Benchmark) -> int | None:
    """Load the store's checkpoint of ``run_id`` into ``benchmark``; its step, or None when there is none."""
    checkpoint = store.load_checkpoint_bytes(run_id)
    if checkpoint is None:
        return None
    saved_step, state_bytes = checkpoint
    benchmark.load_state_dict(deserialize_state(state_bytes))
    if benchmark.step != saved_step:
        raise RuntimeError(
            f"checkpoint of run {run_id} is at step {saved_step} but {benchmark.name}.load_state_dict restored "
            f"step {benchmark.step}; the benchmark's state_dict must include its step"
        )
    return saved_step


def _keep_rows_before_divergence(
    store: ResultStore, run_id: str, rebuild: Any, completed_step: int, error: FloatingPointError
) -> None:
    """Commit the rows a diverged run produced after its last commit, with a checkpoint, before the failure is stored.

    The rows buffered in memory and those of the piece that raised are gone with the diverged benchmark, so a
    fresh one is restored from the last commit (``rebuild``, exactly what a resume does) and replayed: first to
    ``completed_step`` (the end of the last piece that returned; those steps ran without error), then, for a
    :class:`DivergedError`, up to the step it names (every step before it had a finite loss). Each leg commits its
    rows together with the state after it, so the store stays resumable; a leg that fails is dropped (the
    committed ones are kept) and the original error is recorded by the caller whatever happens here.
    """
    stored = store.get_run(run_id) or {}
    targets = [int(completed_step)]
    if isinstance(error, DivergedError):
        targets.append(int(error.step))
    if max(targets) <= int(stored.get("step") or 0):
        return
    try:
        replay = rebuild()
        for target in targets:
            if target <= replay.step:
                continue
            rows = replay.run(target - replay.step)
            store.commit_chunk(run_id, rows, serialize_state(replay.state_dict()), replay.step)
    except Exception:  # noqa: BLE001  (best effort: the divergence itself is what the caller records)
        return


def _advance(
    store: ResultStore,
    run_id: str,
    benchmark: Benchmark,
    chunk: int,
    commit_seconds: float,
    stop_after_steps: int | None,
    interrupt: _InterruptFlag,
    bar: _ProgressBar,
    rebuild: Any = None,
) -> str:
    """The chunk loop of :func:`execute_run`; returns ``finished``, ``interrupted`` or ``paused``.

    A divergence (FloatingPointError) first commits the rows before it (:func:`_keep_rows_before_divergence`,
    with ``rebuild``), then propagates.
    """
    total = int(benchmark.total_steps)
    start_step = benchmark.step
    pending: list[dict[str, Any]] = []
    since_commit = 0
    last_commit = time.monotonic()
    rate: float | None = None
    first_piece = max(1, min(chunk, math.ceil(chunk / 10)))

    def commit() -> None:
        nonlocal pending, since_commit, last_commit
        store.commit_chunk(run_id, pending, serialize_state(benchmark.state_dict()), benchmark.step)
        pending, since_commit, last_commit = [], 0, time.monotonic()

    while not benchmark.done:
        if interrupt.requested:
            break
        if stop_after_steps is not None and benchmark.step - start_step >= stop_after_steps:
            break
        piece = _next_piece(rate, chunk - since_commit, first_piece)
        if stop_after_steps is not None:
            piece = min(piece, stop_after_steps - (benchmark.step - start_step))
        before, tick = benchmark.step, time.monotonic()
        try:
            pending.extend(benchmark.run(piece))
        except FloatingPointError as err:
            if rebuild is not None:
                _keep_rows_before_divergence(store, run_id, rebuild, before, err)
            raise
        advanced = benchmark.step - before
        if advanced <= 0 and not benchmark.done:
            raise RuntimeError(f"{benchmark.name}.run({piece}) made no progress at step {before} of {total}")
        elapsed = time.monotonic() - tick
        rate = advanced / elapsed if elapsed > 0 else None
        since_commit += advanced
        bar.update(advanced, benchmark.progress())
        if since_commit >= chunk or time.monotonic() - last_commit >= commit_seconds or benchmark.done:
            commit()
    if pending or since_commit:
        commit()
    if benchmark.done:
        # a run resumed from its final checkpoint, or one with zero steps, may end without a commit of its own
        return "finished"
    return "interrupted" if interrupt.requested else "paused"
