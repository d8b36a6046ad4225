"""A seconds-long continual regression used to test the runner: a small ReLU MLP chases a teacher that changes every task.

Each task draws a new random teacher ``y = v . relu(W x) / sqrt(teacher_width)`` (seeded by the run seed and the
task index); inputs are standard normal batches drawn from a seeded ``torch.Generator`` whose state is part of
the checkpoint. The learner is a 2-layer ReLU MLP trained with plain SGD on the MSE, calling every mitigation
hook (``prepare_model``, ``attach``, ``on_task_start``, ``loss_term``, ``before_step``, ``after_step``).

Rows (``layer="model"``):

- ``loss`` every ``log_every`` steps within a task (and at the task's last step if ``steps_per_task`` is not a
  multiple): the mean training loss of the bin. The partial sums live in the state, so rows do not depend on
  how ``run`` is chunked;
- ``task_final_loss`` at each task's last step: the loss on a fixed probe batch of that task's data.

``step`` in a row is the number of optimiser steps done; ``task`` the task those steps belong to.

Several runs (seeds, or configs that differ only in :data:`VARYING_FIELDS`: an lr grid) train as one learner
with :class:`ToySeedGroup` (``lopkit run toy --seeds N`` picks it; :func:`toy_refusal` says when it cannot).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from lopkit.benchmarks.base import (
    Benchmark,
    BenchmarkConfig,
    MemberGroup,
    PrivateRNG,
    check_finite_loss,
    differing_fields_refusal,
    make_row,
    register_benchmark,
)
from lopkit.configs import check_device, require
from lopkit.seeding import rng_sandbox, seeded_generator
from lopkit.mitigations.base import Mitigation, MitigationHooks

__all__ = ["VARYING_FIELDS", "ToyBenchmark", "ToyConfig", "ToySeedGroup", "build_toy_model", "toy_refusal", "toy_teacher"]

# keys of the independent random streams derived from the run seed
_INIT_KEY, _DATA_KEY, _TEACHER_KEY, _PROBE_KEY = 1, 2, 3, 4


@dataclasses.dataclass
class ToyConfig(BenchmarkConfig):
    """Sizes and schedule of the toy regression."""

    num_tasks: int = 4
    """Number of teachers the learner is trained on, one after the other."""
    steps_per_task: int = 100
    """SGD steps per task."""
    input_dim: int = 8
    """Input features."""
    width: int = 32
    """Hidden ReLU units of the learner."""
    teacher_width: int = 16
    """Hidden ReLU units of each random teacher."""
    lr: float = 0.05
    """SGD step size."""
    batch_size: int = 16
    """Samples per SGD step."""
    log_every: int = 10
    """Steps per ``loss`` row (bins restart at each task)."""
    probe_size: int = 128
    """Samples of the fixed probe batch for ``task_final_loss``."""
    step_sleep: float = 0.0
    """Seconds to sleep after every step: slows the toy down so tests can interrupt it mid-run (rows unchanged)."""
    device: str = "cpu"
    """Where the model and its batches live: ``cpu``, ``cuda`` or ``cuda:N`` (data is drawn on the CPU, then moved)."""

    def validate(self) -> None:
        """Reject impossible sizes and step sizes with a message naming the field."""
        for name in ("num_tasks", "steps_per_task", "input_dim", "width", "teacher_width", "batch_size",
                     "log_every", "probe_size"):
            value = getattr(self, name)
            require(value >= 1, f"{name} must be >= 1, got {value}")
        require(math.isfinite(self.lr) and self.lr > 0, f"lr must be a positive finite number, got {self.lr}")
        require(math.isfinite(self.step_sleep) and self.step_sleep >= 0,
                f"step_sleep must be >= 0 seconds, got {self.step_sleep}")
        check_device(self.device)


def build_toy_model(config: ToyConfig, seed: int) -> nn.Sequential:
    """The learner: Linear(input_dim, width) -> ReLU -> Linear(width, 1), initialised from the seed only."""
    with rng_sandbox():  # the default init draws from the global RNG; leave it untouched
        model = nn.Sequential(OrderedDict(  # the readable names every lopkit model uses (fc1, act1, head)
            [("fc1", nn.Linear(config.input_dim, config.width)), ("act1", nn.ReLU()), ("head", nn.Linear(config.width, 1))]
        ))
    generator = seeded_generator(seed, _INIT_KEY)
    with torch.no_grad():
        for layer, gain in ((model[0], "relu"), (model[2], "linear")):
            nn.init.kaiming_uniform_(layer.weight, a=0.0, nonlinearity=gain, generator=generator)
            nn.init.zeros_(layer.bias)
    return model


def toy_teacher(config: ToyConfig, seed: int, task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The random teacher of ``task``: hidden weights ``(teacher_width, input_dim)`` and output weights ``(teacher_width,)``."""
    generator = seeded_generator(seed, _TEACHER_KEY, task)
    hidden = torch.randn(config.teacher_width, config.input_dim, generator=generator) / math.sqrt(config.input_dim)
    output = torch.randn(config.teacher_width, generator=generator)
    return hidden, output


def teacher_targets(teacher: tuple[torch.Tensor, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """Teacher outputs ``(N, 1)`` for inputs ``(N, input_dim)``."""
    hidden, output = teacher
    return (torch.relu(inputs @ hidden.T) @ output / math.sqrt(hidden.shape[0])).unsqueeze(1)


@register_benchmark
class ToyBenchmark(Benchmark):
    """Toy continual regression (a new random teacher per task); about a second per run, for runner tests."""

    name = "toy"
    Config = ToyConfig
    description = "Tiny continual regression (new random teacher every task); runs in about a second, for tests."
    presets = {
        "smoke": {"num_tasks": 3, "steps_per_task": 40, "width": 16, "log_every": 10},
        "default": {},
        "paper": {"num_tasks": 10, "steps_per_task": 200, "width": 64},
    }

    def __init__(self, config: ToyConfig, seed: int, method: Mitigation | list[Mitigation] | None = None, *,
                 optimizer_hooks: bool = False):
        """``optimizer_hooks``: attach the method with :meth:`Mitigation.hook` (before_step/after_step run inside
        ``optimizer.step()``) instead of calling them around it; the rows are the same either way."""
        super().__init__(config, seed, method)
        self.rng = PrivateRNG(self.seed)
        self.data_generator = seeded_generator(self.seed, _DATA_KEY)
        self.hooks: MitigationHooks | None = None
        self.device = check_device(config.device)
        with self.rng.active():
            self.model = self.method.prepare_model(build_toy_model(config, self.seed).to(self.device)).to(self.device)
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr)
            if optimizer_hooks:
                self.hooks = self.method.hook(self.model, self.optimizer)
            else:
                self.method.attach(self.model, self.optimizer)
        self._teacher_task = -1
        self._teacher: tuple[torch.Tensor, torch.Tensor] | None = None
        self._bin_sum = 0.0
        self._bin_count = 0
        self._last_loss = float("nan")

    @property
    def total_steps(self) -> int:
        """``num_tasks * steps_per_task``."""
        return self.config.num_tasks * self.config.steps_per_task

    def teacher(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cached) teacher of ``task``."""
        if task != self._teacher_task:
            hidden, output = toy_teacher(self.config, self.seed, task)
            self._teacher, self._teacher_task = (hidden.to(self.device), output.to(self.device)), task
        assert self._teacher is not None
        return self._teacher

    def run(self, n_steps: int) -> list[dict[str, Any]]:
        """Train for up to ``n_steps`` SGD steps; return the rows completed on the way."""
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be a non-negative int, got {n_steps!r}")
        rows: list[dict[str, Any]] = []
        end = min(self.step + n_steps, self.total_steps)
        self.model.train()
        with self.rng.active():
            while self.step < end:
                rows += self._train_step()
        return rows

    def _train_step(self) -> list[dict[str, Any]]:
        """One SGD step with every mitigation hook; returns the rows due after it."""
        cfg, model, optimizer, method = self.config, self.model, self.optimizer, self.method
        index = self.step
        task, within = divmod(index, cfg.steps_per_task)
        if within == 0:
            method.on_task_start(model, optimizer, task)
        inputs = torch.randn(cfg.batch_size, cfg.input_dim, generator=self.data_generator).to(self.device)
        targets = teacher_targets(self.teacher(task), inputs)
        loss = nn.functional.mse_loss(model(inputs), targets)
        check_finite_loss("toy", loss, index, cfg.lr, f"task {task}")
        extra = method.loss_term(model)
        optimizer.zero_grad(set_to_none=True)
        (loss if extra is None else loss + extra).backward()
        if self.hooks is None:
            method.before_step(model, optimizer, index)
            optimizer.step()
            method.after_step(model, optimizer, index)
        else:  # the hooks call before_step/after_step with their own counter, kept equal to self.step
            optimizer.step()
        self.step += 1
        self._bin_sum += float(loss.detach())
        self._bin_count += 1
        if cfg.step_sleep > 0:
            time.sleep(cfg.step_sleep)
        return self._rows_due(task, within + 1)

    def _rows_due(self, task: int, done_in_task: int) -> list[dict[str, Any]]:
        """A completed loss bin and, at the task's end, the probe loss."""
        cfg = self.config
        rows = []
        task_over = done_in_task == cfg.steps_per_task
        if done_in_task % cfg.log_every == 0 or task_over:
            self._last_loss = self._bin_sum / self._bin_count
            rows.append(make_row(self.step, task, "model", "loss", self._last_loss))
            self._bin_sum, self._bin_count = 0.0, 0
        if task_over:
            rows.append(make_row(self.step, task, "model", "task_final_loss", self.probe_loss(task)))
        return rows

    @torch.no_grad()
    def probe_loss(self, task: int) -> float:
        """MSE of the model on the fixed probe batch of ``task`` (eval mode, restored afterwards)."""
        generator = seeded_generator(self.seed, _PROBE_KEY, task)
        inputs = torch.randn(self.config.probe_size, self.config.input_dim, generator=generator).to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            return float(nn.functional.mse_loss(self.model(inputs), teacher_targets(self.teacher(task), inputs)))
        finally:
            self.model.train(was_training)

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, method, data generator, global RNGs, step and the loss-bin accumulator (copies)."""
        return {
            "step": self.step,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "data_generator": self.data_generator.get_state(),
            "rng": self.rng.state,
            "bin_sum": self._bin_sum,
            "bin_count": self._bin_count,
            "last_loss": self._last_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        self.data_generator.set_state(state["data_generator"])
        self.rng.state = state["rng"]
        self.step = int(state["step"])
        if self.hooks is not None:
            self.hooks.step = self.step
        self._bin_sum = float(state["bin_sum"])
        self._bin_count = int(state["bin_count"])
        self._last_loss = float(state["last_loss"])

    def progress(self) -> dict[str, Any]:
        """Current task and the last binned training loss."""
        return {"task": min(self.step // self.config.steps_per_task, self.config.num_tasks - 1), "loss": self._last_loss}


# --------------------------------------------------------------------------- several runs as one learner

#: Config fields that may differ between the members of one :class:`ToySeedGroup` (they change no shape).
VARYING_FIELDS: tuple[str, ...] = ("lr",)


def _methods_present(methods: Mitigation | list[Mitigation] | None) -> list[Mitigation]:
    """The mitigations in ``methods`` that do something (a composition is unpacked; None and no-ops dropped)."""
    if methods is None:
        return []
    if isinstance(methods, Mitigation):
        inner = getattr(methods, "methods", None)
        methods = list(inner) if inner is not None else [methods]
    present: list[Mitigation] = []
    for method in methods:
        inner = getattr(method, "methods", None)
        if inner is not None:
            present += _methods_present(list(inner))
        elif type(method) is not Mitigation:
            present.append(method)
    return present


def toy_refusal(configs: list[ToyConfig], methods: Mitigation | list[Mitigation] | None = None) -> str | None:
    """Why these toy runs cannot train as one :class:`ToySeedGroup`, in one line (None when they can)."""
    if not configs:
        return "no runs to vectorise"
    present = _methods_present(methods)
    if present:
        names = ", ".join(getattr(m, "name", type(m).__name__) for m in present)
        return (f"method {names} is not vectorised for toy (its hooks act on one run's model and optimizer, "
                "step by step)")
    first = configs[0]
    if not isinstance(first, ToyConfig):
        return f"configs of another benchmark ({type(first).__name__}), not toy's"
    for other in configs[1:]:
        if not isinstance(other, ToyConfig):
            return f"configs of another benchmark ({type(other).__name__}), not toy's"
    return differing_fields_refusal(configs, VARYING_FIELDS)


class ToySeedGroup(MemberGroup):
    """S toy runs (seeds and/or an lr grid, no method) trained as one learner; rows and states per member.

    One ordinary :class:`ToyBenchmark` per member keeps everything its separate run has (data generator,
    teachers, loss bins, probe); only the SGD step is shared: the members' parameters are stacked along a
    leading member axis (each member's ``nn.Module`` parameters are views of its slice, so the probe loss and
    ``state_dict`` see the current weights), every member draws its own batch from its own data generator as
    its separate run does, and one batched forward (``baddbmm``), one backward of the summed member losses and
    one ``p -= lr g`` per distinct lr advance all members. Rows and states equal the separate runs' to float32
    rounding (the batched products sum in another order); a state written here resumes a separate run and the
    other way round. ``build`` of the toy's :class:`~lopkit.runner.vectorised.VectorisedRunner`.
    """

    def __init__(self, benchmark_cls: type[ToyBenchmark], members: list[tuple[ToyConfig, int]],
                 methods: Mitigation | list[Mitigation] | None = None):
        members = list(members)
        if not members:
            raise ValueError("no runs to vectorise: pass at least one (config, seed)")
        reason = toy_refusal([config for config, _ in members], methods)
        if reason is not None:
            raise ValueError(f"cannot vectorise these toy runs: {reason}")
        self.benchmarks = [benchmark_cls(config, seed) for config, seed in members]
        self.config = self.benchmarks[0].config
        models = [bench.model for bench in self.benchmarks]
        self.names = [name for name, _ in models[0].named_parameters()]
        self.params = {
            name: torch.stack([dict(m.named_parameters())[name].detach() for m in models]).requires_grad_(True)
            for name in self.names
        }
        for index, model in enumerate(models):
            for name, parameter in model.named_parameters():
                parameter.data = self.params[name].detach()[index]  # the member's module sees its slice
        lrs: dict[float, list[int]] = {}
        for index, (config, _seed) in enumerate(members):
            lrs.setdefault(float(config.lr), []).append(index)
        # (lr, members or None for all): one in-place update per distinct lr, the formula of torch.optim.SGD
        self.lr_groups = [(lr, None if len(lrs) == 1 else indices) for lr, indices in lrs.items()]

    def run(self, n_steps: int) -> list[list[dict[str, Any]]]:
        """Advance every member by up to ``n_steps`` SGD steps; per member, the rows its own ``run`` would return."""
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be a non-negative int, got {n_steps!r}")
        rows: list[list[dict[str, Any]]] = [[] for _ in self.benchmarks]
        end = min(self.step + n_steps, self.total_steps)
        while self.step < end:
            for out, new in zip(rows, self._train_step()):
                out += new
        return rows

    def _forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The members' MLPs on their own batches: ``inputs`` (S, B, D) -> (S, B, 1)."""
        p = self.params
        hidden = torch.baddbmm(p["fc1.bias"].unsqueeze(1), inputs, p["fc1.weight"].transpose(1, 2))
        return torch.baddbmm(p["head.bias"].unsqueeze(1), torch.relu(hidden), p["head.weight"].transpose(1, 2))

    def _train_step(self) -> list[list[dict[str, Any]]]:
        """One SGD step of every member on its own next batch; returns each member's rows due after it."""
        cfg, benches = self.config, self.benchmarks
        index = self.step
        task, within = divmod(index, cfg.steps_per_task)
        inputs, targets = [], []
        for bench in benches:  # each member's batch from its own generator, as its separate run draws it
            x = torch.randn(cfg.batch_size, cfg.input_dim, generator=bench.data_generator).to(bench.device)
            inputs.append(x)
            targets.append(teacher_targets(bench.teacher(task), x))
        x, y = torch.stack(inputs), torch.stack(targets)  # (S, B, D), (S, B, 1)
        losses = (self._forward(x) - y).pow(2).mean(dim=(1, 2))  # each member's mse_loss
        values = losses.detach().tolist()
        for member, (bench, value) in enumerate(zip(benches, values)):
            if not math.isfinite(value):
                check_finite_loss("toy", value, index, bench.config.lr, f"task {task}, member {member}")
        for param in self.params.values():
            param.grad = None
        losses.sum().backward()  # members share no parameter: each slice gets its own loss's gradient
        with torch.no_grad():
            for param in self.params.values():
                for lr, members in self.lr_groups:
                    if members is None:
                        param.add_(param.grad, alpha=-lr)
                    else:
                        for member in members:
                            param[member].add_(param.grad[member], alpha=-lr)
        rows = []
        for bench, value in zip(benches, values):
            bench.step += 1
            bench._bin_sum += value
            bench._bin_count += 1
            rows.append(bench._rows_due(task, within + 1))
        if cfg.step_sleep > 0:
            time.sleep(cfg.step_sleep)
        return rows

    def state_dicts(self) -> list[dict[str, Any]]:
        """Each member's state, what its separate run's ``state_dict`` holds (loadable by either path)."""
        return [bench.state_dict() for bench in self.benchmarks]  # the model entries are copies of the slices

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """Restore every member from a state of its run (written here or by a separate run), all at one step."""
        self._check_member_states(states)
        for bench, state in zip(self.benchmarks, states):
            bench.load_state_dict(state)  # the model loads in place into its slice of the stacked tensors
