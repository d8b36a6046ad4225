"""Lightning callback: measure the lopkit Monitor on a probe every N optimizer steps, log it, checkpoint it.

Usage::

    from lopkit.integrations.lightning import LopkitCallback

    callback = LopkitCallback(probe_x, probe_y, torch.nn.functional.cross_entropy, every=100)
    trainer = lightning.Trainer(callbacks=[callback], max_steps=10_000)
    trainer.fit(module, loader)
    callback.to_dataframe()        # step, layer, metric, value

What it does:

- measures the LightningModule (or its sub-module ``module_attr``, e.g. ``"model"``) on the probe at step 0
  (before training) and whenever ``trainer.global_step`` is a multiple of ``every``, on the global-zero rank
  only (``trainer.is_global_zero``): the other ranks skip the probe, so the cost is paid once;
- logs each measurement through the trainer's loggers (``logger.log_metrics(values, step=global_step)``), under
  ``"{prefix}/{metric}/{layer}"`` keys, at its own cadence whatever ``log_every_n_steps`` is; NaN values
  (e.g. ranks of an all-zero layer) are kept in the rows but not logged;
- saves its history (the rows and the last measured step) in Lightning checkpoints through ``state_dict`` /
  ``load_state_dict``, so a run resumed with ``trainer.fit(..., ckpt_path=...)`` keeps the earlier rows and
  does not measure a step twice.

Needs ``lightning`` (``pip install 'lopkit[lightning]'``); ``pytorch_lightning`` works too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lopkit.diagnostics.monitor import MonitorConfig
from lopkit.integrations.probe import ProbeSchedule

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ModuleNotFoundError as err:  # the older package name
    if err.name not in ("lightning", "lightning.pytorch"):
        raise
    try:
        from pytorch_lightning import Callback, LightningModule, Trainer
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "lopkit.integrations.lightning needs Lightning: pip install 'lopkit[lightning]' (or pip install lightning)",
            name="lightning") from None

__all__ = ["LopkitCallback"]


class LopkitCallback(Callback):
    """Measure the Monitor on a probe every ``every`` steps on rank 0, log the values and checkpoint the history."""

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
        module_attr: str | None = None,
        prefix: str = "lopkit",
        measure_at_start: bool = True,
        keep_rows: bool = True,
    ) -> None:
        """Arguments as :class:`~lopkit.integrations.probe.ProbeSchedule`; ``module_attr`` picks a sub-module."""
        super().__init__()
        self.schedule = ProbeSchedule(probe_inputs, probe_targets, loss_fn, every=every, config=config,
                                      layers=layers, metrics=metrics, activation_types=activation_types,
                                      prefix=prefix, keep_rows=keep_rows)
        self.module_attr = module_attr
        self.measure_at_start = measure_at_start

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint (distinct per ``every`` and ``prefix``)."""
        return self._generate_state_key(every=self.schedule.every, prefix=self.schedule.prefix)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Every measured row so far (``step, layer, metric, value``), restored ones included."""
        return self.schedule.rows

    def to_dataframe(self) -> Any:
        """The measured rows as a pandas DataFrame."""
        return self.schedule.to_dataframe()

    def _model(self, pl_module: LightningModule) -> nn.Module:
        """The module to measure: the LightningModule or its ``module_attr`` sub-module."""
        if self.module_attr is None:
            return pl_module
        model = getattr(pl_module, self.module_attr, None)
        if not isinstance(model, nn.Module):
            raise ValueError(f"LopkitCallback(module_attr={self.module_attr!r}): the LightningModule has no "
                             f"sub-module of that name; pass an attribute holding an nn.Module, or None")
        return model

    def _maybe_measure(self, trainer: Trainer, pl_module: LightningModule) -> list[dict[str, Any]] | None:
        """Measure and log if this step is due and this process is rank 0; the new rows, else None."""
        step = int(trainer.global_step)
        if not trainer.is_global_zero or not self.schedule.due(step):
            return None
        rows = self.schedule.measure(self._model(pl_module), step)
        values = self.schedule.logged_values(rows)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
        return rows

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Measure the model before its first step (step 0), unless resumed or ``measure_at_start=False``."""
        if self.measure_at_start:
            self._maybe_measure(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Measure when ``trainer.global_step`` has reached a multiple of ``every`` (once per step)."""
        self._maybe_measure(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        """The history saved in checkpoints: rows, last measured step, number of measurements."""
        return self.schedule.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the history from a checkpoint."""
        self.schedule.load_state_dict(state_dict)
