"""The contract between a benchmark and the runner: a resumable, steppable, seeded experiment.

A benchmark is built from ``(config, seed, method)`` and is advanced in chunks with ``run(n_steps)``,
which returns tidy metric rows. The runner checkpoints ``state_dict()`` together with the rows of each chunk
in one transaction, so a killed run resumes from its last checkpoint and produces exactly the same rows as an
uninterrupted one. For that, a benchmark must:

- derive everything (model init, data order, noise) from its seed, and keep every random generator and
  every running accumulator in ``state_dict()``;
- emit rows that do not depend on how the steps were chunked (e.g. emit a binned average only when its bin
  is complete, keeping the partial sums in the state).

Rows are dicts with keys ``step, task, layer, metric, value`` (``layer`` is ``"model"`` for whole-model
metrics such as loss or accuracy).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Sequence

import torch

from lopkit.benchmarks.registry import BENCHMARKS, get_benchmark  # noqa: F401  (re-exported)
from lopkit.configs import ConfigError, build_config
from lopkit.mitigations.base import Compose, Mitigation, compose
from lopkit.seeding import (  # noqa: F401  (capture/restore re-exported)
    RNGSandbox,
    capture_rng_state,
    restore_rng_state,
    rng_sandbox,
    seed_global_rngs,
    seeded_generator,
)

ROW_KEYS = ("step", "task", "layer", "metric", "value")
PRESET_NAMES = ("smoke", "default", "paper")


@dataclasses.dataclass
class BenchmarkConfig:
    """Base class of every benchmark config; subclasses add typed fields and override ``validate``.

    ``run_id_neutral`` names the fields added after runs had been stored whose default reproduces what those
    runs did: while such a field holds its default it is left out of the run id
    (:func:`lopkit.configs.run_identity`), so a store written before the field existed keeps its ids and resumes.
    """

    run_id_neutral: ClassVar[tuple[str, ...]] = ("device",)

    def validate(self) -> None:
        """Raise ConfigError for impossible values (called by ``build_config``)."""


def make_row(step: int, task: int, layer: str, metric: str, value: float) -> dict[str, Any]:
    """One tidy metric row."""
    return {"step": int(step), "task": int(task), "layer": str(layer), "metric": str(metric), "value": float(value)}


# stream keys (lopkit.seeding) of the global generators a benchmark owns and of its spare data generator
_GLOBAL_RNG_KEY, _DATA_KEY = 0x474C, 0x4454


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch global generators from ``seed`` (:mod:`lopkit.seeding`); return a data Generator."""
    seed_global_rngs(seed, _GLOBAL_RNG_KEY)
    return seeded_generator(seed, _DATA_KEY)


class PrivateRNG(RNGSandbox):
    """Global (python, numpy, torch) RNG state owned by one benchmark and swapped in only while it trains.

    Dropout and mitigations draw from the global generators; keeping a private copy makes a benchmark's
    numbers independent of whatever else runs in the process, and lets ``state_dict`` save them exactly.
    """

    def __init__(self, seed: int):
        with rng_sandbox():
            seed_everything(seed)
            state = capture_rng_state()
        super().__init__(state)


class DivergedError(FloatingPointError):
    """Training produced a non-finite loss: the run is stored ``failed`` with this one-line message."""

    def __init__(self, benchmark: str, step: int, value: float, lr: float | None = None, detail: str = ""):
        self.benchmark, self.step, self.value, self.lr = benchmark, int(step), float(value), lr
        where = f" ({detail})" if detail else ""
        now = f" (now {lr:g})" if lr is not None else ""
        super().__init__(
            f"{benchmark} diverged at step {self.step}{where}: the training loss became {self.value}; "
            f"lower lr{now} or check the method's hyper-parameters"
        )


def check_finite_loss(
    benchmark: str, loss: float | torch.Tensor, step: int, lr: float | None = None, detail: str = ""
) -> None:
    """Raise :class:`DivergedError` if the training ``loss`` of ``step`` is NaN or infinite (every benchmark uses it)."""
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    if not math.isfinite(value):
        raise DivergedError(benchmark, step, value, lr, detail)


class Benchmark(ABC):
    """A resumable experiment; subclasses set ``name``, ``Config``, ``presets`` and implement the abstract methods."""

    name: ClassVar[str]
    Config: ClassVar[type[BenchmarkConfig]]
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    description: ClassVar[str] = ""
    #: False for a benchmark whose training loop does not call the mitigation hooks: it refuses methods
    accepts_methods: ClassVar[bool] = True

    def __init__(self, config: BenchmarkConfig, seed: int, method: Mitigation | list[Mitigation] | None = None):
        if not isinstance(config, self.Config):
            raise ConfigError(f"{self.name} expects a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        self.seed = int(seed)
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        check_accepts_methods(type(self), method)
        self.method = method if isinstance(method, Mitigation) else compose(method)
        self.method.seed_from_run(self.seed)  # every method's randomness derives from the run's seed
        self.step = 0

    @classmethod
    def make_config(cls, preset: str = "default", overrides: dict[str, Any] | None = None) -> BenchmarkConfig:
        """The typed config of a preset with overrides applied, validated (ConfigError on bad input)."""
        if preset not in cls.presets:
            raise ConfigError(
                f"benchmark {cls.name!r} has no preset {preset!r}; choose one of {', '.join(cls.presets)}"
            )
        return build_config(cls.Config, cls.presets[preset], overrides or {})

    @classmethod
    def continues_from(cls, config: BenchmarkConfig) -> tuple[str, str] | None:
        """``(store path, run id)`` of the finished run whose kept state this stage starts from; None for most.

        A benchmark that continues another (fine-tuning, evaluation) never opens a results store itself: the
        runner (:func:`lopkit.runner.execute.execute_run`) or a pipeline reads that state and passes it to the
        constructor as the keyword ``initial_state``.
        """
        return None

    @property
    @abstractmethod
    def total_steps(self) -> int:
        """Number of optimiser steps of the whole run."""

    @abstractmethod
    def run(self, n_steps: int) -> list[dict[str, Any]]:
        """Advance by at most ``n_steps`` steps (never past ``total_steps``); return the metric rows produced."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: model, optimizer, method, data position, RNGs, accumulators."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def progress(self) -> dict[str, Any]:
        """Short live status for the progress bar (e.g. task, loss, accuracy)."""
        return {}

    @property
    def done(self) -> bool:
        """True once every step has run."""
        return self.step >= self.total_steps


def check_accepts_methods(cls: type[Benchmark], methods: Mitigation | list[Mitigation] | None) -> None:
    """ConfigError if ``methods`` holds a mitigation but benchmark ``cls`` cannot apply one (``accepts_methods``)."""
    if isinstance(methods, Compose):
        methods = methods.methods
    present = [methods] if isinstance(methods, Mitigation) else list(methods or [])
    if present and not cls.accepts_methods:
        names = "+".join(m.name for m in present)
        raise ConfigError(f"benchmark {cls.name!r} cannot apply mitigations (got --method {names}): its training "
                          f"loop does not call the method hooks; run it without --method (or with sgd)")


def register_benchmark(cls: type[Benchmark]) -> type[Benchmark]:
    """Class decorator adding a benchmark to the registry under ``cls.name``."""
    missing = [p for p in PRESET_NAMES if p not in cls.presets]
    if missing:
        raise TypeError(f"benchmark {cls.__name__} lacks presets {missing}")
    BENCHMARKS[cls.name] = cls
    return cls


class MemberGroup:
    """Base of a vectorised group of runs: ``benchmarks`` holds one Benchmark per member, all at the same step.

    Gives the progress part of the group contract of :mod:`lopkit.runner.vectorised` (``step``, ``total_steps``,
    ``done``, ``progress()``); a subclass adds ``run``, ``state_dicts`` and ``load_state_dicts``.
    """

    benchmarks: list[Benchmark]

    @property
    def step(self) -> int:
        """Steps taken (the same for every member)."""
        return self.benchmarks[0].step

    @property
    def total_steps(self) -> int:
        """Steps of each member's run."""
        return self.benchmarks[0].total_steps

    @property
    def done(self) -> bool:
        """Whether every member has finished."""
        return self.step >= self.total_steps

    def progress(self) -> dict[str, Any]:
        """The first member's live status."""
        return self.benchmarks[0].progress()

    def _check_member_states(self, states: Sequence[dict[str, Any]]) -> None:
        """ValueError unless ``states`` has one state per member, all at the same step (a group resumes together)."""
        if len(states) != len(self.benchmarks):
            raise ValueError(f"expected {len(self.benchmarks)} states, got {len(states)}")
        steps = {int(state["step"]) for state in states}
        if len(steps) != 1:
            raise ValueError(f"the members' states are at different steps ({sorted(steps)}); resume them separately")


def differing_fields_refusal(configs: Sequence[Any], varying: Sequence[str]) -> str | None:
    """Why these member configs cannot share one vectorised learner: the fields outside ``varying`` that differ."""
    from lopkit.configs import config_to_dict

    shared = {k: v for k, v in config_to_dict(configs[0]).items() if k not in varying}
    for other in configs[1:]:
        theirs = {k: v for k, v in config_to_dict(other).items() if k not in varying}
        differing = sorted(k for k in shared if shared[k] != theirs.get(k))
        if differing:
            return f"configs differ in {', '.join(differing)} (only {', '.join(varying)} may differ)"
    return None


def stacked_sgd_(param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], lr_groups: Sequence[tuple[float, Any]],
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
    """torch.optim.SGD's single-tensor step (no dampening, no Nesterov) on a stacked ``(members, ...)`` parameter.

    ``lr_groups``: ``(lr, member indices)`` pairs, indices None for all members; ``state`` holds the momentum buffer.
    """
    if weight_decay:
        grad = grad.add(param, alpha=weight_decay)
    if momentum:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = grad.detach().clone()
        else:
            state["momentum_buffer"].mul_(momentum).add_(grad)
        grad = state["momentum_buffer"]
    for lr, members in lr_groups:
        if members is None:
            param.add_(grad, alpha=-lr)
        else:
            for member in members:
                param[member].add_(grad[member], alpha=-lr)
