"""Tests for the Monitor's slow-metric schedule (``MonitorConfig.slow_every`` / ``slow_metrics``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lopkit.diagnostics.monitor import Monitor, MonitorConfig
from lopkit.diagnostics.rank import RANK_METRIC_NAMES

pytestmark = pytest.mark.filterwarnings("ignore::lopkit.diagnostics.errors.ConstantUnitWarning")

#: the metrics of the default slow schedule
SLOW = ("duplicate_fraction", *RANK_METRIC_NAMES)


def make_mlp(seed: int = 0) -> nn.Sequential:
    """ReLU MLP 8 -> 16 -> 16 -> 3."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def probe(n: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed probe batch for make_mlp."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def sgd_step(model: nn.Module, seed: int) -> None:
    """One hand-written SGD step on a random batch (changes the weights between measurements)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad


def metrics_by_step(rows: list[dict]) -> dict[int, set[tuple[str, str]]]:
    """{step: {(layer, metric)}} of a list of rows."""
    found: dict[int, set[tuple[str, str]]] = {}
    for row in rows:
        found.setdefault(row["step"], set()).add((row["layer"], row["metric"]))
    return found


def test_default_schedule_computes_duplicates_and_ranks_on_every_fifth_periodic_measurement() -> None:
    model = make_mlp()
    x, y = probe()
    monitor = Monitor(model, config=MonitorConfig(every=2))
    assert monitor.config.slow_every == 5 and set(monitor.config.slow_metrics) == set(SLOW)
    reference = Monitor(model, config=MonitorConfig(every=2))
    for step in range(24):
        rows = monitor.maybe_measure(x, y, nn.CrossEntropyLoss(), step=step)
        if rows is not None:
            full = reference.measure(x, y, nn.CrossEntropyLoss(), step=step)  # same weights, every metric
            got = {(r["layer"], r["metric"]): r["value"] for r in rows}
            want = {(r["layer"], r["metric"]): r["value"] for r in full}
            with_ranks = (step // 2) % 5 == 0
            expected_keys = {k for k in want if with_ranks or k[1] not in SLOW}
            assert set(got) == expected_keys
            assert got == {k: want[k] for k in expected_keys}  # same values where computed
        sgd_step(model, seed=step)
    steps = metrics_by_step(monitor.rows)
    for metric in SLOW:
        assert sorted(s for s, keys in steps.items() if any(m == metric for _, m in keys)) == [0, 10, 20]
    for step, keys in steps.items():  # the required activation metrics of both ReLU layers
        for layer in ("1", "3"):
            assert {(layer, m) for m in ("dead_fraction", "dormant_fraction", "frozen_fraction")} <= keys
            if step in (0, 10, 20):
                assert {(layer, m) for m in ("duplicate_fraction", "effective_rank", "stable_rank")} <= keys


def test_slow_every_one_computes_everything_at_every_measurement() -> None:
    model = make_mlp()
    x, y = probe()
    monitor = Monitor(model, config=MonitorConfig(every=1, slow_every=1))
    for step in range(3):
        rows = monitor.maybe_measure(x, y, nn.CrossEntropyLoss(), step=step)
        assert rows == Monitor(model).measure(x, y, nn.CrossEntropyLoss(), step=step)


def test_measure_ignores_the_schedule_and_counts_towards_it() -> None:
    model = make_mlp()
    x, _ = probe()
    monitor = Monitor(model, metrics=["dead_fraction", "effective_rank"], config=MonitorConfig(slow_every=2))
    for _ in range(3):  # direct calls: every chosen metric each time
        assert {r["metric"] for r in monitor.measure(x)} == {"dead_fraction", "effective_rank"}
    # three measurements so far: the next periodic one (number 3) is off the schedule, the one after is on it
    assert {r["metric"] for r in monitor.maybe_measure(x, step=100)} == {"dead_fraction"}
    assert {r["metric"] for r in monitor.maybe_measure(x, step=200)} == {"dead_fraction", "effective_rank"}


def test_custom_slow_metrics() -> None:
    model = make_mlp()
    x, _ = probe()
    config = MonitorConfig(every=1, slow_every=3, slow_metrics=("duplicate_fraction",))
    monitor = Monitor(model, metrics=["duplicate_fraction", "effective_rank"], config=config)
    seen = [{r["metric"] for r in monitor.maybe_measure(x, step=s)} for s in range(4)]
    assert seen == [{"duplicate_fraction", "effective_rank"}, {"effective_rank"}, {"effective_rank"},
                    {"duplicate_fraction", "effective_rank"}]


@pytest.mark.parametrize("bad", [dict(slow_every=0), dict(slow_every=1.5), dict(slow_metrics="effective_rank"),
                                 dict(slow_metrics=(1,))])
def test_bad_schedule_config_is_rejected(bad: dict) -> None:
    with pytest.raises(ValueError, match="slow_"):
        MonitorConfig(**bad)


def test_unknown_slow_metric_is_rejected_by_the_monitor() -> None:
    with pytest.raises(ValueError, match="slow_metrics has unknown"):
        Monitor(make_mlp(), config=MonitorConfig(slow_metrics=("effective_rnak",)))
