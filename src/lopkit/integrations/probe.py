"""What every framework callback shares: a Monitor measured on a fixed probe every N steps, its rows and state.

Framework-free (imports neither Lightning nor transformers): the callbacks decide *when* (their step counter,
rank 0 only) and *where* the values go (their logger); :class:`ProbeSchedule` does the measuring and keeps the
history, which is what a checkpoint saves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lopkit.diagnostics.monitor import Monitor, MonitorConfig

__all__ = ["ProbeSchedule", "metric_key", "move_to_device"]

#: Version of the layout of :meth:`ProbeSchedule.state_dict`.
STATE_VERSION = 1


def move_to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside it (dicts, lists, tuples) moved to ``device``."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: move_to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(move_to_device(item, device) for item in value)
    return value


def metric_key(prefix: str, row: Mapping[str, Any]) -> str:
    """The logged name of one Monitor row: ``"{prefix}/{metric}/{layer}"`` (``prefix`` empty: no leading slash)."""
    return "/".join(part for part in (prefix, str(row["metric"]), str(row["layer"])) if part)


class ProbeSchedule:
    """A :class:`Monitor` on one probe batch, measured when ``step % every == 0`` (at most once per step).

    ``probe_targets`` and ``loss_fn(model_output, probe_targets)`` are optional; without them the gradient
    metrics (loss, saturated fraction, gradient norms) are skipped. ``config``, ``layers``, ``metrics`` and
    ``activation_types`` are passed to the Monitor, which is built on the first measurement (on the model the
    framework hands over). ``every`` defaults to ``config.every``. Measured rows are kept in :attr:`rows`
    (``step, layer, metric, value``) unless ``keep_rows=False``; :meth:`state_dict` saves them with the last
    measured step so that a resumed run neither measures a step twice nor loses the history.
    """

    def __init__(
        self,
        probe_inputs: Any,
        probe_targets: Any = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        *,
        every: int | None = None,
        config: MonitorConfig | None = None,
        layers: Sequence[str | type[nn.Module]] | None = None,
        metrics: Iterable[str] | None = None,
        activation_types: Sequence[type[nn.Module]] = (),
        prefix: str = "lopkit",
        keep_rows: bool = True,
    ) -> None:
        """Validate the schedule; the Monitor itself is built on the first measurement."""
        if (probe_targets is None) != (loss_fn is None):
            raise ValueError("pass both probe_targets and loss_fn (for the gradient metrics), or neither")
        self.config = config if config is not None else MonitorConfig()
        if not isinstance(self.config, MonitorConfig):
            raise ValueError(f"config must be a MonitorConfig, got {type(self.config).__name__}")
        every = self.config.every if every is None else every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer (steps between measurements), got {every!r}")
        self.every = every
        self.probe_inputs = probe_inputs
        self.probe_targets = probe_targets
        self.loss_fn = loss_fn
        self.layers = layers
        self.metrics = metrics
        self.activation_types = tuple(activation_types)
        self.prefix = prefix
        self.keep_rows = keep_rows
        self.monitor: Monitor | None = None
        self._monitor_state: Mapping[str, Any] | None = None  # restored before the Monitor exists
        self.rows: list[dict[str, Any]] = []
        self.last_step: int | None = None
        self.measurements = 0

    def due(self, step: int) -> bool:
        """Whether ``step`` is a measuring step not measured yet."""
        return step % self.every == 0 and step != self.last_step

    def monitor_for(self, model: nn.Module) -> Monitor:
        """The Monitor of ``model`` (built on first use, rebuilt if the framework hands over another model)."""
        if self.monitor is None or self.monitor.model is not model:
            self.monitor = Monitor(model, self.layers, metrics=self.metrics, config=self.config,
                                   activation_types=self.activation_types, max_rows=0)  # the history is self.rows
            if self._monitor_state is not None:
                self.monitor.load_state_dict(self._monitor_state)
                self._monitor_state = None
        return self.monitor

    def measure(self, model: nn.Module, step: int) -> list[dict[str, Any]]:
        """Measure ``model`` on the probe (moved to the model's device) now, recorded as ``step``; the new rows."""
        monitor = self.monitor_for(model)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        targets = move_to_device(self.probe_targets, device)
        rows = monitor.measure(move_to_device(self.probe_inputs, device), targets, self.loss_fn, step=step)
        if self.keep_rows:
            self.rows.extend(rows)
        self.last_step = int(step)
        self.measurements += 1
        return rows

    def logged_values(self, rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
        """``{"prefix/metric/layer": value}`` of rows, finite values only (loggers reject NaN)."""
        return {metric_key(self.prefix, row): float(row["value"]) for row in rows if math.isfinite(row["value"])}

    def to_dataframe(self) -> Any:
        """The kept rows as a pandas DataFrame (columns ``step, layer, metric, value``)."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["step", "layer", "metric", "value"])

    def state_dict(self) -> dict[str, Any]:
        """The history and position (plain Python values, JSON-safe): rows, last measured step, count, every."""
        return {"version": STATE_VERSION, "every": self.every, "last_step": self.last_step,
                "measurements": self.measurements, "rows": [dict(row) for row in self.rows],
                "monitor": self.monitor.state_dict() if self.monitor is not None else self._monitor_state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (ValueError for another layout)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown lopkit callback state version {state.get('version')!r}; expected {STATE_VERSION}")
        self.rows = [dict(row) for row in state["rows"]]
        self.last_step = state["last_step"]
        self.measurements = int(state["measurements"])
        self._monitor_state = state.get("monitor")  # warnings already given, latest measurement (older states: none)
        if self.monitor is not None and self._monitor_state is not None:
            self.monitor.load_state_dict(self._monitor_state)
            self._monitor_state = None
