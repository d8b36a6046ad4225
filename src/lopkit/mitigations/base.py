"""The hook protocol every mitigation implements, so they compose and plug into any training loop."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from lopkit.seeding import derive_seed, stable_key


class Mitigation:
    """A plasticity intervention expressed as a few optional hooks (all no-ops by default).

    A training loop calls ``prepare_model`` once before building the optimizer and ``attach`` once after,
    then, in order: ``on_task_start`` when the data distribution changes,
    ``loss_term`` to add a regulariser to the loss, ``before_step`` after ``backward`` and before
    ``optimizer.step()`` (e.g. to add gradient noise), and ``after_step`` after the update
    (e.g. to reset units). Hooks receive the model and optimizer so they work on any ``nn.Module``.
    :meth:`hook` does ``attach`` and registers ``before_step``/``after_step`` as the optimizer's step pre/post
    hooks, so a loop then only adds ``loss_term`` (and calls ``on_task_start``); explicit calls stay available.

    Randomness: a benchmark calls ``seed_from_run(run_seed)`` before any hook; a method draws its random
    numbers only from generators seeded with :meth:`method_seed`, so the same run seed gives the same draws in
    every process. A method used outside a benchmark (no ``seed_from_run``) behaves as with run seed 0.
    """

    name: str = "none"
    #: True when the method needs the training step's autograd graph or trains parameters outside the model
    #: (gradient hooks, auxiliary heads): engines that update the weights by hand (bitflip's lean engine) refuse it
    needs_autograd_step: bool = False
    #: ``(run_seed, *keys)`` given by :meth:`seed_from_run`; empty means run seed 0
    _seed_source: tuple[int, ...] = ()

    def seed_from_run(self, run_seed: int, *keys: int) -> None:
        """Record the run's seed (and position ``keys`` inside a composition) that :meth:`method_seed` derives from."""
        self._seed_source = (int(run_seed), *(int(k) for k in keys))

    def method_seed(self, explicit: int | None = None) -> int:
        """The seed of this method's own generator: from ``explicit`` (a config ``seed``) if given, else the run's.

        Both go through :func:`lopkit.seeding.derive_seed` with the method's name as a stable key, so two
        methods of one run draw independent streams.
        """
        if explicit is not None:
            return derive_seed(int(explicit), stable_key(self.name))
        run_seed, *keys = self._seed_source or (0,)
        return derive_seed(run_seed, stable_key(self.name), *keys)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Called once before the optimizer is built; architectural methods (norm, dropout, CReLU) return a new model."""
        return model

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called once before training so the method can record initial weights or build state."""

    def hook(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, step: int = 0) -> "MitigationHooks":
        """``attach``, then run ``before_step``/``after_step`` inside every ``optimizer.step()``; ``.remove()`` undoes the hooks.

        ``step`` is the index passed to the first step's hooks (e.g. the step a resumed run continues from); it
        rises by one after each ``optimizer.step()``. Do not also call ``before_step``/``after_step`` yourself.
        """
        self.attach(model, optimizer)
        return MitigationHooks(self, model, optimizer, step=step)

    def on_task_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, task: int) -> None:
        """Called when a new task begins."""

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """Extra differentiable loss (e.g. L2-init), or None."""
        return None

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Called after backward() and before optimizer.step()."""

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Called after optimizer.step()."""

    def state_dict(self) -> dict:
        """Serializable state, so a run can be resumed exactly."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""


class MitigationHooks:
    """Handle of a mitigation hooked into an optimizer's ``step``: counts steps; ``remove()`` detaches it.

    Built by :meth:`Mitigation.hook`. The optimizer's step pre-hook calls ``method.before_step(model, optimizer,
    step)`` and its post-hook ``method.after_step(model, optimizer, step)`` then adds one to ``step``. Usable as
    a context manager (the hooks are removed on exit), like torch's ``RemovableHandle``.
    """

    def __init__(self, method: Mitigation, model: nn.Module, optimizer: torch.optim.Optimizer, *, step: int = 0):
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        self.method, self.model, self.step = method, model, step
        self._handles = [optimizer.register_step_pre_hook(self._pre_step),
                         optimizer.register_step_post_hook(self._post_step)]

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        """The optimizer's step pre-hook: ``before_step`` (returns None, so step's arguments are unchanged)."""
        self.method.before_step(self.model, optimizer, self.step)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        """The optimizer's step post-hook: ``after_step``, then count the step."""
        self.method.after_step(self.model, optimizer, self.step)
        self.step += 1

    @property
    def attached(self) -> bool:
        """False once :meth:`remove` ran."""
        return bool(self._handles)

    def remove(self) -> None:
        """Detach both hooks from the optimizer (idempotent); the method's state is left as it is."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "MitigationHooks":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


class Compose(Mitigation):
    """Apply several mitigations in order; loss terms add up."""

    def __init__(self, methods: Sequence[Mitigation]):
        self.methods = list(methods)
        self.name = "+".join(m.name for m in self.methods) or "none"

    def seed_from_run(self, run_seed, *keys):
        """Each part gets the run seed and its position, so two copies of one method draw different streams."""
        for position, m in enumerate(self.methods):
            m.seed_from_run(run_seed, *keys, position)

    def prepare_model(self, model):
        for m in self.methods:
            model = m.prepare_model(model)
        return model

    def attach(self, model, optimizer):
        for m in self.methods:
            m.attach(model, optimizer)

    def on_task_start(self, model, optimizer, task):
        for m in self.methods:
            m.on_task_start(model, optimizer, task)

    def loss_term(self, model):
        terms = [t for t in (m.loss_term(model) for m in self.methods) if t is not None]
        return sum(terms) if terms else None

    def before_step(self, model, optimizer, step):
        for m in self.methods:
            m.before_step(model, optimizer, step)

    def after_step(self, model, optimizer, step):
        for m in self.methods:
            m.after_step(model, optimizer, step)

    def state_dict(self):
        return {str(i): m.state_dict() for i, m in enumerate(self.methods)}

    def load_state_dict(self, state):
        for i, m in enumerate(self.methods):
            m.load_state_dict(state.get(str(i), {}))


def changes_architecture(method: Mitigation) -> bool:
    """True if ``method`` (or any part of a composition) rewrites the model in ``prepare_model``."""
    if isinstance(method, Compose):
        return any(changes_architecture(m) for m in method.methods)
    return type(method).prepare_model is not Mitigation.prepare_model


def compose(methods: Iterable[Mitigation] | None) -> Mitigation:
    """One object standing for any number of mitigations (no-op for none)."""
    methods = list(methods or [])
    return methods[0] if len(methods) == 1 else Compose(methods)
