"""LopkitTrainerCallback with the real transformers Trainer on a tiny random BERT (CPU, offline, no downloads)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from lopkit.diagnostics.monitor import Monitor, MonitorConfig  # noqa: E402
from lopkit.integrations.huggingface import STATE_FILE, LopkitTrainerCallback  # noqa: E402

VOCAB, TOKENS = 40, 10


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=TOKENS, num_labels=2)
    return BertForSequenceClassification(config)


def dataset(n: int = 48, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, TOKENS), generator=generator)
    labels = (ids[:, 0] < VOCAB // 2).long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(TOKENS, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def probe() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    rows = dataset(16, seed=1)
    inputs = {key: torch.stack([r[key] for r in rows]) for key in ("input_ids", "attention_mask")}
    return inputs, torch.stack([r["labels"] for r in rows])


def loss_fn(output, labels):
    return nn.functional.cross_entropy(output.logits, labels)


def training_args(out, max_steps: int, **extra) -> TrainingArguments:
    options = {"save_strategy": "no", **extra}
    return TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8,
                             learning_rate=1e-3, report_to="none", logging_steps=1000, use_cpu=True,
                             disable_tqdm=True, seed=0, **options)


def lopkit_logs(history: list[dict]) -> dict[int, dict]:
    return {entry["step"]: entry for entry in history if any(k.startswith("lopkit/") for k in entry)}


def test_monitor_finds_hugging_face_gelu_activations():
    monitor = Monitor(tiny_bert(), config=MonitorConfig(channels_last=True))
    kinds = {layer.name: (type(layer.module).__name__, layer.kind) for layer in monitor.layers}
    act = "bert.encoder.layer.0.intermediate.intermediate_act_fn"
    assert kinds[act] == ("GELUActivation", "activation")
    rows = monitor.measure(*probe(), loss_fn)
    by_metric = {r["metric"]: r["value"] for r in rows if r["layer"] == act}
    assert {"dead_fraction", "frozen_fraction", "saturated_fraction", "effective_rank"} <= set(by_metric)
    assert 1.0 <= by_metric["effective_rank"] <= 32.0  # units = the 32 intermediate features (last axis)


def test_callback_measures_and_logs_through_the_trainer(tmp_path):
    inputs, labels = probe()
    callback = LopkitTrainerCallback(inputs, labels, loss_fn, every=5)
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, 20), train_dataset=dataset())
    callback.attach(trainer)
    trainer.train()
    frame = callback.to_dataframe()
    assert sorted(frame["step"].unique()) == [0, 5, 10, 15, 20]
    act = "bert.encoder.layer.1.intermediate.intermediate_act_fn"
    assert {"dead_fraction", "loss"} <= set(frame["metric"]) and act in set(frame["layer"])
    logged = lopkit_logs(trainer.state.log_history)
    assert sorted(logged) == [0, 5, 10, 15, 20]
    for step, entry in logged.items():
        loss = frame[(frame["step"] == step) & (frame["metric"] == "loss")]["value"].item()
        assert entry["lopkit/loss/model"] == pytest.approx(loss) and f"lopkit/dead_fraction/{act}" in entry
    assert not list(tmp_path.glob("checkpoint-*"))


def test_callback_without_attach_logs_to_the_history(tmp_path):
    inputs, _ = probe()
    callback = LopkitTrainerCallback(inputs, every=10, measure_at_start=False)
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, 10), train_dataset=dataset(),
                      callbacks=[callback])
    trainer.train()
    assert sorted(lopkit_logs(trainer.state.log_history)) == [10]
    assert "loss" not in set(callback.to_dataframe()["metric"])  # no targets: no gradient metrics


def test_callback_history_round_trips_through_a_checkpoint(tmp_path):
    inputs, labels = probe()
    first = LopkitTrainerCallback(inputs, labels, loss_fn, every=5)
    args = training_args(tmp_path, 10, save_strategy="steps", save_steps=10)
    first.attach(Trainer(model=tiny_bert(), args=args, train_dataset=dataset())).trainer.train()
    saved = json.loads((tmp_path / "checkpoint-10" / STATE_FILE).read_text())
    assert saved["last_step"] == 10 and len(saved["rows"]) == len(first.rows)
    assert [r["value"] for r in saved["rows"]] == pytest.approx([r["value"] for r in first.rows], nan_ok=True)

    second = LopkitTrainerCallback(inputs, labels, loss_fn, every=5)
    resumed = Trainer(model=tiny_bert(), args=training_args(tmp_path, 20), train_dataset=dataset())
    second.attach(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-10"))
    steps = [row["step"] for row in second.rows]
    assert sorted(set(steps)) == [0, 5, 10, 15, 20] and steps.count(10) == steps.count(0)
    assert [r["step"] for r in second.rows[:len(first.rows)]] == [r["step"] for r in first.rows]


def test_callback_measures_only_in_the_main_process(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "is_world_process_zero", lambda self: False)
    inputs, labels = probe()
    callback = LopkitTrainerCallback(inputs, labels, loss_fn, every=5)
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, 10), train_dataset=dataset())
    callback.attach(trainer)
    trainer.train()
    assert trainer.state.global_step == 10 and not trainer.state.is_world_process_zero
    assert callback.rows == [] and callback.schedule.monitor is None
    assert lopkit_logs(trainer.state.log_history) == {}
