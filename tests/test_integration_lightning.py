"""LopkitCallback with the real Lightning Trainer on a tiny MLP (CPU, offline, no files left in the repo)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers import Logger  # noqa: E402

from lopkit.diagnostics.monitor import MonitorConfig  # noqa: E402
from lopkit.integrations.lightning import LopkitCallback  # noqa: E402


class RecordingLogger(Logger):
    """A Lightning logger that keeps every ``log_metrics`` call in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))


class TinyModule(pl.LightningModule):
    """A 2-layer ReLU MLP classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_data(seed: int = 0) -> tuple[torch.utils.data.DataLoader, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 6, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    return loader, x[:32], y[:32]


def make_trainer(root, max_steps: int, logger: Logger | None, callback: LopkitCallback) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=logger if logger else False,
                      callbacks=[callback],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(root), num_sanity_val_steps=0)


def test_callback_measures_every_n_steps_and_logs(tmp_path):
    torch.manual_seed(0)
    loader, probe_x, probe_y = make_data()
    callback = LopkitCallback(probe_x, probe_y, nn.functional.cross_entropy, every=5,
                              config=MonitorConfig(rank_max_samples=32))
    logger = RecordingLogger()
    make_trainer(tmp_path, 20, logger, callback).fit(TinyModule(), loader)
    frame = callback.to_dataframe()
    assert sorted(frame["step"].unique()) == [0, 5, 10, 15, 20]
    assert set(frame["layer"]) == {"model.0", "model.1", "model.2", "model"}
    dead = frame[(frame["metric"] == "dead_fraction")]
    assert set(dead["layer"]) == {"model.1"} and dead["value"].between(0, 1).all()
    logged = {step: values for step, values in logger.calls if any(k.startswith("lopkit/") for k in values)}
    assert sorted(logged) == [0, 5, 10, 15, 20]
    for step, values in logged.items():
        assert "lopkit/dead_fraction/model.1" in values and "lopkit/loss/model" in values
        rows = frame[frame["step"] == step]
        loss = rows[(rows["metric"] == "loss")]["value"].item()
        assert values["lopkit/loss/model"] == pytest.approx(loss)
    assert not list(tmp_path.glob("**/*.ckpt"))  # checkpointing off: nothing written


def test_callback_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    loader, probe_x, probe_y = make_data()
    first = LopkitCallback(probe_x, probe_y, nn.functional.cross_entropy, every=5)
    trainer = make_trainer(tmp_path, 10, None, first)
    trainer.fit(TinyModule(), loader)
    path = tmp_path / "ten.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"][first.state_key]
    assert saved["rows"] == first.rows and saved["last_step"] == 10

    second = LopkitCallback(probe_x, probe_y, nn.functional.cross_entropy, every=5)
    resumed = make_trainer(tmp_path, 20, None, second)
    resumed.fit(TinyModule(), loader, ckpt_path=str(path))
    steps = [row["step"] for row in second.rows]
    assert second.rows[:len(first.rows)] == first.rows  # history restored, step 10 not measured again
    assert sorted(set(steps)) == [0, 5, 10, 15, 20] and steps.count(10) == steps.count(0)


def test_callback_does_not_measure_off_rank_zero(tmp_path, monkeypatch):
    monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda self: False))
    loader, probe_x, probe_y = make_data()
    callback = LopkitCallback(probe_x, probe_y, nn.functional.cross_entropy, every=5)
    logger = RecordingLogger()
    trainer = make_trainer(tmp_path, 10, logger, callback)
    trainer.fit(TinyModule(), loader)
    assert trainer.global_step == 10
    assert callback.rows == [] and callback.schedule.monitor is None
    assert not any(k.startswith("lopkit/") for _, values in logger.calls for k in values)


def test_module_attr_and_bad_arguments(tmp_path):
    loader, probe_x, _ = make_data()
    callback = LopkitCallback(probe_x, every=10, module_attr="model")
    make_trainer(tmp_path, 10, None, callback).fit(TinyModule(), loader)
    assert {row["layer"] for row in callback.rows} == {"0", "1", "2"}  # names inside the sub-module
    assert "loss" not in {row["metric"] for row in callback.rows}  # no targets: no gradient metrics
    with pytest.raises(ValueError, match="every must be a positive integer"):
        LopkitCallback(probe_x, every=0)
    with pytest.raises(ValueError, match="both probe_targets and loss_fn"):
        LopkitCallback(probe_x, torch.zeros(3))
    wrong = LopkitCallback(probe_x, every=10, module_attr="nosuch")
    with pytest.raises(ValueError, match="no sub-module of that name"):
        make_trainer(tmp_path, 10, None, wrong).fit(TinyModule(), loader)
