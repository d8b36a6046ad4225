"""lopkit.schedules: the one warm-up/cosine schedule, a torch scheduler setting the rates a hand-written loop set."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lopkit.schedules import BaseLambdaLR, warmup_cosine_factor, warmup_cosine_scheduler


def _kws_reference(step: int, total: int, warmup_fraction: float) -> float:
    """The formula kws/train.py computed by hand before the schedule moved to lopkit.schedules."""
    warmup = max(1, int(round(warmup_fraction * total)))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def test_factor_equals_the_hand_written_kws_formula_exactly():
    for total in (1, 2, 7, 40, 333):
        for fraction in (0.0, 0.05, 0.3, 0.9):
            warmup = max(1, int(round(fraction * total)))
            for step in range(total + 3):
                assert warmup_cosine_factor(step, total, warmup) == _kws_reference(step, total, fraction)


def test_factor_warms_up_then_decays_to_the_floor():
    assert warmup_cosine_factor(0, 100, 10) == pytest.approx(0.1) and warmup_cosine_factor(9, 100, 10) == 1.0
    assert warmup_cosine_factor(10, 100, 10) == 1.0
    assert warmup_cosine_factor(100, 100, 10, min_ratio=0.2) == pytest.approx(0.2)
    assert warmup_cosine_factor(55, 100, 10, min_ratio=0.2) == pytest.approx(0.6)
    assert warmup_cosine_factor(0, 100, 0) == 1.0  # no warm-up


def _train(scheduled: bool, steps: int, start: int = 0, period: int | None = None, model=None, add_at: int = 0):
    """Rates seen by each optimiser step of SGD on a small model, and the final weights."""
    torch.manual_seed(0)
    model = model or nn.Linear(3, 2)
    extra = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    seen: list[list[float]] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append([g["lr"] for g in opt.param_groups]))
    scheduler = None
    x = torch.linspace(-1, 1, 12).reshape(4, 3)
    for step in range(start, start + steps):
        if step == add_at:  # a mitigation adding a head at attach, before the first step (as infer / injection do)
            optimizer.add_param_group({"params": list(extra.parameters())})
        local = step if period is None else step % period
        if scheduled:
            if scheduler is None:
                scheduler = warmup_cosine_scheduler(optimizer, 0.5, period or 20, 4, 0.1, period, start_step=step)
        else:
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * warmup_cosine_factor(local, period or 20, 4, 0.1)
        loss = (model(x) ** 2).mean() + extra(model(x)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduled:
            scheduler.step()
    return seen, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("period", [None, 6])
def test_scheduler_sets_exactly_the_rates_of_the_hand_written_loop(period):
    by_hand, weights_hand = _train(False, 20, period=period)
    scheduled, weights_sched = _train(True, 20, period=period)
    assert scheduled == by_hand
    assert {len(r) for r in scheduled} == {2}  # the group a mitigation added is scheduled too
    assert all(torch.equal(a, b) for a, b in zip(weights_hand, weights_sched))


def test_scheduler_started_at_a_step_continues_the_sequence():
    whole, _ = _train(True, 20, add_at=-1)
    resumed, _ = _train(True, 12, start=8, add_at=-1)
    assert resumed == whole[8:]


def test_scheduler_state_dict_round_trips_without_the_rate_function():
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    scheduler = BaseLambdaLR(optimizer, 1.0, lambda step: 1.0 / (step + 1), start_step=3)
    assert optimizer.param_groups[0]["lr"] == 0.25
    state = scheduler.state_dict()
    assert "lr_lambda" not in state and state["last_epoch"] == 3
    torch.save(state, __import__("io").BytesIO())
    with pytest.raises(ValueError, match="start_step"):
        BaseLambdaLR(optimizer, 1.0, lambda step: 1.0, start_step=-1)
