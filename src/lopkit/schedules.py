"""Learning-rate schedules as ``torch.optim.lr_scheduler`` schedulers (a leaf module: imports torch only).

The one warm-up-then-cosine formula is :func:`warmup_cosine_factor`; :class:`BaseLambdaLR` applies a factor of
the step to every param group of an optimizer, including groups a mitigation adds after the scheduler was
built (torch's ``LambdaLR`` fixes the groups at construction), and can start at any step so a resumed run
gets the same rates.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["BaseLambdaLR", "warmup_cosine_factor", "warmup_cosine_scheduler"]


def warmup_cosine_factor(step: int, total: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Factor of the base rate at 0-based ``step``: linear warm-up over ``warmup_steps``, cosine to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total - warmup_steps)))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class BaseLambdaLR(LRScheduler):
    """Every param group's rate is ``base_lr * lr_lambda(step)``; the rate of step ``start_step`` is set at once.

    Call :meth:`step` after each ``optimizer.step()``, as with every torch scheduler.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, lr_lambda: Callable[[int], float],
                 start_step: int = 0):
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.base_lr = float(base_lr)
        self.lr_lambda = lr_lambda
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", self.base_lr)
        super().__init__(optimizer, last_epoch=start_step - 1)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """The rate of step ``last_epoch`` for every current param group."""
        rate = self.base_lr * self.lr_lambda(self.last_epoch)
        return [rate for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        """Torch's scheduler state without the (unpicklable) rate function."""
        return {key: value for key, value in super().state_dict().items() if key != "lr_lambda"}


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, base_lr: float, total: int, warmup_steps: int,
                            min_ratio: float = 0.0, period: int | None = None, start_step: int = 0) -> BaseLambdaLR:
    """Linear warm-up then cosine decay (:func:`warmup_cosine_factor`), restarting every ``period`` steps if given."""
    if period is not None and period < 1:
        raise ValueError(f"period must be >= 1, got {period}")

    def factor(step: int) -> float:
        return warmup_cosine_factor(step if period is None else step % period, total, warmup_steps, min_ratio)

    return BaseLambdaLR(optimizer, base_lr, factor, start_step)
