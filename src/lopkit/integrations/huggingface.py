"""Hugging Face ``transformers.Trainer`` callback: the lopkit Monitor on a probe every N steps, logged, checkpointed.

Usage::

    from lopkit.integrations.huggingface import LopkitTrainerCallback

    probe = {"input_ids": ids, "attention_mask": mask}             # passed to model(**probe)
    callback = LopkitTrainerCallback(probe, labels, lambda out, y: F.cross_entropy(out.logits, y), every=50)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    callback.attach(trainer)        # = trainer.add_callback(callback), and logs go through trainer.log
    trainer.train()
    callback.to_dataframe()         # step, layer, metric, value

What it does:

- measures the model at step 0 (``on_train_begin``, unless resumed) and whenever ``state.global_step`` is a
  multiple of ``every`` (``on_step_end``), in the main process only (``state.is_world_process_zero``);
- logs ``"{prefix}/{metric}/{layer}"`` values through ``Trainer.log`` (so every reporting integration,
  ``state.log_history`` and the console see them) when attached with :meth:`LopkitTrainerCallback.attach`;
  passed as ``Trainer(callbacks=[callback])`` instead, the values go to ``state.log_history`` only (a callback
  is not handed the Trainer);
- writes its history to ``lopkit_monitor.json`` in every checkpoint folder the Trainer saves (``on_save``) and
  reads it back when training resumes from ``OUTPUT_DIR/checkpoint-STEP`` (``trainer.train(
  resume_from_checkpoint=...)``); :meth:`state_dict` / :meth:`load_state_dict` do the same by hand.

Transformer activations are ``(batch, tokens, features)``, so without a ``config`` the Monitor reads the last
axis as units (``MonitorConfig(channels_last=True)``). Hugging Face's activation classes (``GELUActivation``,
``NewGELUActivation``, ...) are monitored by default, like torch's.

Needs ``transformers`` (``pip install 'lopkit[hf]'``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lopkit.diagnostics.monitor import MonitorConfig
from lopkit.integrations.probe import ProbeSchedule

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ModuleNotFoundError as err:
    if err.name != "transformers":
        raise
    raise ModuleNotFoundError("lopkit.integrations.huggingface needs transformers: pip install 'lopkit[hf]'",
                              name="transformers") from None

__all__ = ["STATE_FILE", "LopkitTrainerCallback"]

#: File written in each checkpoint folder with the callback's history.
STATE_FILE = "lopkit_monitor.json"


class LopkitTrainerCallback(TrainerCallback):
    """Measure the Monitor on a probe every ``every`` steps in the main process, log it and checkpoint the history."""

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
        measure_at_start: bool = True,
        keep_rows: bool = True,
    ) -> None:
        """Arguments as :class:`~lopkit.integrations.probe.ProbeSchedule` (default config: ``channels_last=True``)."""
        self.schedule = ProbeSchedule(probe_inputs, probe_targets, loss_fn, every=every,
                                      config=config if config is not None else MonitorConfig(channels_last=True),
                                      layers=layers, metrics=metrics, activation_types=activation_types,
                                      prefix=prefix, keep_rows=keep_rows)
        self.measure_at_start = measure_at_start
        self.trainer: Any = None

    def attach(self, trainer: Any) -> LopkitTrainerCallback:
        """Add this callback to ``trainer`` and log through ``trainer.log``; returns the callback."""
        trainer.add_callback(self)
        self.trainer = trainer
        return self

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Every measured row so far (``step, layer, metric, value``), restored ones included."""
        return self.schedule.rows

    def to_dataframe(self) -> Any:
        """The measured rows as a pandas DataFrame."""
        return self.schedule.to_dataframe()

    def state_dict(self) -> dict[str, Any]:
        """The history (JSON-safe): rows, last measured step, number of measurements."""
        return self.schedule.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.schedule.load_state_dict(state)

    # ------------------------------------------------------------------------------------------- events

    def _maybe_measure(self, state: TrainerState, model: nn.Module | None) -> None:
        """Measure and log if this step is due and this is the main process."""
        step = int(state.global_step)
        if model is None or not state.is_world_process_zero or not self.schedule.due(step):
            return
        values = self.schedule.logged_values(self.schedule.measure(model, step))
        if self.trainer is not None:
            self.trainer.log(dict(values))
        else:
            state.log_history.append({**values, "step": step})

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        """Reload the history when resuming from ``OUTPUT_DIR/checkpoint-STEP``; measure step 0 of a new run."""
        if state.global_step > 0:
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
            if saved.is_file():
                self.load_state_dict(json.loads(saved.read_text()))
        if self.measure_at_start:
            self._maybe_measure(state, model)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> None:
        """Measure when ``state.global_step`` is a multiple of ``every`` (once per step)."""
        self._maybe_measure(state, model)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Write the history next to the checkpoint the Trainer has just saved (main process only)."""
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            tmp = folder / (STATE_FILE + ".tmp")
            tmp.write_text(json.dumps(self.state_dict()))
            os.replace(tmp, folder / STATE_FILE)
