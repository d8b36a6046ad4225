"""Tests for lopkit.benchmarks.continual: masked CE, task protocol, chunk independence, exact resume, configs."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from lopkit.benchmarks.continual import (
    ClassSplitBenchmark,
    PermutedBenchmark,
    RandomLabelsBenchmark,
    balanced_subset,
    masked_accuracy_count,
    masked_cross_entropy,
)
from lopkit.configs import ConfigError
from lopkit.data.errors import DatasetNotFoundError
from lopkit.data.fashion_mnist import fashion_mnist_dir, load_fashion_mnist
from lopkit.data.tasks import class_split_tasks
from lopkit.mitigations.base import Mitigation


def _fashion_mnist_available() -> bool:
    try:
        fashion_mnist_dir()
    except DatasetNotFoundError:
        return False
    return True


needs_data = pytest.mark.skipif(
    not _fashion_mnist_available(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)

# Fast smoke variants: few Monitor metrics keep each run well under a second.
FAST = {"monitor_metrics": ("dead_fraction", "effective_rank", "saturated_fraction", "loss")}


def _make(cls, overrides=None, seed=0, method=None):
    config = cls.make_config("smoke", {**FAST, **(overrides or {})})
    return cls(config, seed, method)


# ----------------------------------------------------------------------------- pure functions (no data)
def test_masked_cross_entropy_matches_numpy_and_ignores_inactive_logits():
    torch.manual_seed(0)
    logits = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[2, 7]] = True
    targets = torch.tensor([2, 7, 7, 2, 2, 7])
    loss = masked_cross_entropy(logits, targets, mask)
    z = logits.detach().numpy()[:, [2, 7]]
    local = np.array([0, 1, 1, 0, 0, 1])
    log_probs = z - np.log(np.exp(z).sum(1, keepdims=True))
    assert math.isclose(loss.item(), -log_probs[np.arange(6), local].mean(), rel_tol=1e-12)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.count_nonzero(grad[:, ~mask]) == 0  # inactive classes get no gradient
    assert torch.count_nonzero(grad[:, mask]) == 12
    # changing inactive logits changes nothing
    shifted = logits.detach().clone()
    shifted[:, ~mask] += 100.0
    assert math.isclose(masked_cross_entropy(shifted, targets, mask).item(), loss.item(), rel_tol=1e-12)


def test_masked_accuracy_argmax_over_active_classes_only():
    logits = torch.tensor([[5.0, 1.0, 2.0], [0.0, 3.0, 1.0], [9.0, -1.0, -2.0]])
    mask = torch.tensor([False, True, True])
    # argmax over classes {1, 2}: row0 -> 2, row1 -> 1, row2 -> 1
    assert masked_accuracy_count(logits, torch.tensor([2, 1, 2]), mask) == 2
    assert masked_accuracy_count(logits, torch.tensor([0, 1, 0])) == 3  # unmasked
    with pytest.raises(ValueError, match="no class"):
        masked_cross_entropy(logits, torch.tensor([1, 1, 1]), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        masked_cross_entropy(logits, torch.tensor([1, 1, 1]), torch.ones(4, dtype=torch.bool))


def test_balanced_subset_counts_per_class():
    labels = torch.tensor([0] * 7 + [1] * 3 + [2] * 10)
    picked = balanced_subset(labels, 4, torch.Generator().manual_seed(0))
    counts = np.bincount(labels[picked].numpy(), minlength=3)
    assert counts.tolist() == [4, 3, 4]
    assert torch.equal(picked, picked.sort().values) and picked.unique().numel() == picked.numel()


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"norm": "group"}, "norm"),
        ({"model": "rnn"}, "model"),
        ({"dropout": 1.0}, "dropout"),
        ({"classes_per_task": 1}, "classes_per_task"),
        ({"classes_per_task": 11}, "classes_per_task"),
        ({"lr": 0.0}, "lr"),
        ({"lr": "nan"}, "lr"),
        ({"steps_per_task": 0}, "steps_per_task"),
        ({"epochs_per_task": -1.0}, "epochs_per_task"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"monitor_metrics": ("dead_fraction", "deadness")}, "monitor_metrics"),
        ({"probe_split": "val"}, "probe_split"),
        ({"norm": "batch", "batch_size": 1}, "batch_size"),
        ({"depth": 0}, "depth"),
        ({"channels": (4, 4, 4, 4, 4)}, "conv"),
        ({"log_every": 0}, "log_every"),
        ({"widht": 3}, "unknown config key"),
        ({"width": "wide"}, "width"),
        ({"device": "toaster"}, "device"),
    ],
)
def test_bad_class_split_config_values_raise_config_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        ClassSplitBenchmark.make_config("smoke", overrides)


def test_bad_values_of_other_benchmarks_and_presets():
    with pytest.raises(ConfigError, match="num_samples"):
        RandomLabelsBenchmark.make_config("smoke", {"num_samples": 100_000})
    with pytest.raises(ConfigError, match="probe_split"):
        RandomLabelsBenchmark.make_config("smoke", {"probe_split": "test"})
    with pytest.raises(ConfigError, match="classes_per_task"):
        PermutedBenchmark.make_config("smoke", {"classes_per_task": 2})  # not a permuted option
    with pytest.raises(ConfigError, match="preset"):
        PermutedBenchmark.make_config("huge")
    for cls in (ClassSplitBenchmark, PermutedBenchmark, RandomLabelsBenchmark):
        for preset in ("smoke", "default", "paper"):
            cls.make_config(preset)  # every preset is valid
    assert ClassSplitBenchmark.make_config("paper").epochs_per_task == 500.0
    # the paper-analogue presets use the paper's optimiser (Adam, lr 1e-3) and its 5 x 128 MLP
    for cls, preset in ((RandomLabelsBenchmark, "e1"), (ClassSplitBenchmark, "e1_5way"), (ClassSplitBenchmark, "paper")):
        config = cls.make_config(preset)
        assert (config.optimizer, config.lr, config.width, config.depth, config.norm) == ("adam", 1e-3, 128, 5, "none")
    assert ClassSplitBenchmark.make_config("e1_5way").classes_per_task == 5
    assert ClassSplitBenchmark.make_config("default").reset_head is True


@needs_data
def test_data_dependent_config_errors_at_construction():
    with pytest.raises(ConfigError, match="batch_size"):
        _make(ClassSplitBenchmark, {"batch_size": 500})  # 2 classes x 100 images < 500
    with pytest.raises(ConfigError, match="seed"):
        _make(ClassSplitBenchmark, seed=-1)


# ----------------------------------------------------------------------------- protocol
class Recorder(Mitigation):
    """Records hook calls and what the model looks like at each task start."""

    name = "recorder"

    def __init__(self):
        self.calls: list[str] = []
        self.head_zero_at_start: list[bool] = []
        self.optimizer_state_at_start: list[int] = []
        self.steps: list[int] = []

    def prepare_model(self, model):
        self.calls.append("prepare_model")
        return model

    def attach(self, model, optimizer):
        self.calls.append("attach")

    def on_task_start(self, model, optimizer, task):
        self.calls.append(f"task{task}")
        head = model.head
        self.head_zero_at_start.append(bool(head.weight.abs().sum() == 0 and head.bias.abs().sum() == 0))
        self.optimizer_state_at_start.append(len(optimizer.state))

    def before_step(self, model, optimizer, step):
        self.steps.append(step)

    def after_step(self, model, optimizer, step):
        assert self.steps[-1] == step


@needs_data
def test_class_split_tasks_head_reset_optimizer_kept_and_hooks_called():
    recorder = Recorder()
    bench = _make(ClassSplitBenchmark, {"num_tasks": 6}, seed=3, method=recorder)
    expected = class_split_tasks(10, 2, 6, seed=3)
    assert [spec.classes for spec in bench.tasks] == [task.classes for task in expected]
    for spec in bench.tasks:
        labels = spec.train_y[spec.train_indices]
        assert set(labels.tolist()) == set(spec.classes)
        assert labels.numel() == 200  # max_train_per_class=100, two classes
        assert set(spec.test_y[spec.test_indices].tolist()) == set(spec.classes)
        assert spec.class_mask.nonzero().flatten().tolist() == sorted(spec.classes)
    bench.run(bench.total_steps)
    assert recorder.calls == ["prepare_model", "attach"] + [f"task{t}" for t in range(6)]
    assert recorder.head_zero_at_start == [True] * 6
    assert recorder.optimizer_state_at_start[0] == 0 and min(recorder.optimizer_state_at_start[1:]) > 0  # Adam kept
    assert recorder.steps == list(range(bench.total_steps))


@needs_data
def test_masked_loss_leaves_inactive_head_rows_at_zero_during_first_task():
    bench = _make(ClassSplitBenchmark, {"monitor": False})
    bench.run(bench._steps_per_task[0] - 1)  # stay inside task 0 (fresh Adam, head zeroed)
    active = sorted(bench.tasks[0].classes)
    inactive = [c for c in range(10) if c not in active]
    head = bench.model.head
    assert torch.count_nonzero(head.weight[inactive]) == 0 and torch.count_nonzero(head.bias[inactive]) == 0
    assert torch.count_nonzero(head.weight[active]) > 0


@needs_data
def test_task_test_accuracy_matches_independent_evaluation():
    bench = _make(ClassSplitBenchmark, {"num_tasks": 2, "monitor": False})
    rows = bench.run(bench.total_steps)
    reported = [r["value"] for r in rows if r["metric"] == "task_test_accuracy" and r["task"] == 1]
    x, y = load_fashion_mnist("test", standardize=True)
    classes = sorted(bench.tasks[1].classes)
    chosen = bench.tasks[1].test_indices
    x_task, y_task = bench.tasks[1].test_x[chosen], bench.tasks[1].test_y[chosen]
    assert set(y_task.tolist()) == set(classes) and x_task.shape[1] == x.shape[1]
    bench.model.eval()
    with torch.no_grad():
        logits = bench.model(x_task).numpy()
    predicted = np.array(classes)[logits[:, classes].argmax(1)]
    assert reported == [pytest.approx((predicted == y_task.numpy()).mean(), abs=1e-12)]


@needs_data
def test_online_bins_close_at_task_ends_and_average_to_task_accuracy():
    bench = _make(ClassSplitBenchmark, {"num_tasks": 2, "log_every": 7, "monitor": False})
    rows = bench.run(bench.total_steps)
    bins = [r for r in rows if r["metric"] == "online_accuracy"]
    assert [r["step"] for r in bins] == [7, 14, 21, 28, 30, 37, 44, 51, 58, 60]
    for task, start in ((0, 0), (1, 30)):
        task_bins = [r for r in bins if r["task"] == task]
        edges = [start] + [r["step"] for r in task_bins]
        widths = np.diff(edges)  # all batches are full, so a bin's weight is its step count
        mean = float(np.dot(widths, [r["value"] for r in task_bins]) / widths.sum())
        (reported,) = [r["value"] for r in rows if r["metric"] == "task_online_accuracy" and r["task"] == task]
        assert reported == pytest.approx(mean, abs=1e-12)


@needs_data
def test_monitor_measures_at_task_starts_ends_and_every_k_steps():
    bench = _make(ClassSplitBenchmark, {"num_tasks": 2, "monitor_every": 20})
    rows = bench.run(bench.total_steps)
    measured = sorted({(r["step"], r["task"]) for r in rows if r["layer"] == "act1" and r["metric"] == "dead_fraction"})
    assert measured == [(0, 0), (20, 0), (30, 0), (30, 1), (40, 1), (60, 1)]
    probe_losses = [r for r in rows if r["layer"] == "model" and r["metric"] == "loss"]
    assert len(probe_losses) == 6 and all(math.isfinite(r["value"]) for r in probe_losses)


@needs_data
def test_epochs_per_task_sets_the_step_count():
    bench = _make(ClassSplitBenchmark, {"epochs_per_task": 1.5, "monitor": False})
    # 200 samples per task, batch 32, full batches only: 6 per epoch -> ceil(1.5 * 6) = 9 steps per task
    assert bench.total_steps == 3 * 9


# ----------------------------------------------------------------------------- resumability
def _rows_in_chunks(bench, chunk):
    rows = []
    while not bench.done:
        rows += bench.run(chunk)
        torch.rand(3)  # other code using the global RNG between chunks must not matter
    return rows


@needs_data
@pytest.mark.parametrize("cls", [ClassSplitBenchmark, PermutedBenchmark])
def test_rows_do_not_depend_on_chunking(cls):
    overrides = {"dropout": 0.2, "monitor_every": 20, "log_every": 7, "norm": "batch"}
    whole = _make(cls, overrides)
    rows_whole = whole.run(whole.total_steps)
    assert whole.done and whole.run(5) == []
    rows_chunked = _rows_in_chunks(_make(cls, overrides), 11)
    assert rows_chunked == rows_whole
    assert len({(r["metric"]) for r in rows_whole}) > 5


@needs_data
def test_state_dict_round_trip_mid_task_reproduces_remaining_rows():
    overrides = {"dropout": 0.2, "monitor_every": 10, "log_every": 7}
    first = _make(ClassSplitBenchmark, overrides, seed=5)
    first.run(43)  # inside task 1
    assert first.step_in_task == 13
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    rest_first = first.run(first.total_steps)
    second = _make(ClassSplitBenchmark, overrides, seed=5)
    torch.rand(10)  # a fresh process would have a different global RNG state
    buffer.seek(0)
    second.load_state_dict(torch.load(buffer, weights_only=False))
    assert second.step == 43 and second.task == 1 and second.progress()["task"] == 1
    rest_second = second.run(second.total_steps)
    assert rest_second == rest_first
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)


@needs_data
def test_state_dict_is_a_snapshot_and_rejects_other_runs():
    bench = _make(RandomLabelsBenchmark, {"monitor": False})
    bench.run(5)
    state = bench.state_dict()
    weight = state["model"]["fc1.weight"].clone()
    bench.run(5)
    assert torch.equal(state["model"]["fc1.weight"], weight)  # later training does not alter the snapshot
    with pytest.raises(ValueError, match="seed"):
        _make(RandomLabelsBenchmark, {"monitor": False}, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="config"):
        _make(RandomLabelsBenchmark, {"monitor": False, "lr": 0.01}).load_state_dict(state)


# ----------------------------------------------------------------------------- smoke runs and guards
MONITOR_METRICS = {"dead_fraction", "effective_rank", "saturated_fraction", "loss"}


@needs_data
@pytest.mark.parametrize(
    "cls, model, task_metrics",
    [
        (ClassSplitBenchmark, "mlp", {"task_test_accuracy", "task_final_train_accuracy"}),
        (ClassSplitBenchmark, "cnn", {"task_test_accuracy", "task_final_train_accuracy"}),
        (PermutedBenchmark, "mlp", {"task_test_accuracy", "task_final_train_accuracy"}),
        (RandomLabelsBenchmark, "mlp", {"task_final_train_accuracy"}),
    ],
)
def test_smoke_runs_emit_expected_metrics(cls, model, task_metrics):
    bench = _make(cls, {"model": model})
    rows = bench.run(bench.total_steps)
    metrics = {r["metric"] for r in rows}
    base = {"online_accuracy", "online_loss", "task_online_accuracy", "task_online_loss"}
    if cls is ClassSplitBenchmark:  # masked tasks also report the paper's unmasked online accuracy
        base |= {"online_accuracy_unmasked", "task_online_accuracy_unmasked"}
    assert metrics == base | task_metrics | MONITOR_METRICS
    assert all(set(r) == {"step", "task", "layer", "metric", "value"} for r in rows)
    layers = {r["layer"] for r in rows if r["metric"] == "dead_fraction"}
    assert layers == {"act1", "act2"} if model == "mlp" else layers == {"act1", "act2", "act3", "act4"}
    per_task = [r for r in rows if r["metric"] == "task_final_train_accuracy"]
    assert [r["task"] for r in per_task] == [0, 1, 2] and all(0.0 <= r["value"] <= 1.0 for r in per_task)
    progress = bench.progress()
    assert progress["task"] == 2 and 0.0 <= progress["online_accuracy"] <= 1.0 and progress["loss"] > 0


@needs_data
def test_permuted_and_random_label_tasks_differ_per_task():
    permuted = _make(PermutedBenchmark, {"first_task_identity": True, "monitor": False})
    perms = [spec.permutation for spec in permuted.tasks]
    assert torch.equal(perms[0], torch.arange(784)) and not torch.equal(perms[1], perms[2])
    assert all(spec.class_mask is None for spec in permuted.tasks)
    labels = _make(RandomLabelsBenchmark, {"monitor": False})
    assert labels.tasks[0].train_x is labels.tasks[1].train_x  # same images ...
    assert (labels.tasks[0].train_y != labels.tasks[1].train_y).float().mean() > 0.5  # ... new labels
    assert labels.tasks[0].train_x.shape[0] == 128


@needs_data
def test_runs_in_one_process_share_one_read_only_copy_of_the_split():
    overrides = {"monitor": False, "max_train_per_class": None, "max_test_per_class": None}
    first, second = _make(PermutedBenchmark, overrides, seed=0), _make(PermutedBenchmark, overrides, seed=1)
    assert first.tasks[0].train_x is second.tasks[0].train_x and first.tasks[0].test_x is second.tasks[0].test_x
    x, y = load_fashion_mnist("train", standardize=first.config.standardize)  # a private copy: the same values
    assert torch.equal(first.tasks[0].train_x, x) and torch.equal(first.tasks[0].train_y, y)
    first.run(5)
    second.run(5)  # training reads the shared tensors and writes nothing into them
    assert torch.equal(first.tasks[0].train_x, x)


class NaNLoss(Mitigation):
    """A broken regulariser whose loss term turns non-finite after a few steps."""

    name = "nan"

    def __init__(self):
        self.calls = 0

    def loss_term(self, model):
        self.calls += 1
        return torch.tensor(float("nan") if self.calls > 35 else 0.0)


@needs_data
def test_non_finite_loss_raises_floating_point_error_naming_step_and_task():
    bench = _make(ClassSplitBenchmark, {"monitor": False}, method=NaNLoss())
    with pytest.raises(FloatingPointError, match=r"step 35 \(task 1"):
        bench.run(bench.total_steps)


@needs_data
def test_unmasked_online_accuracy_scores_the_training_minibatches_by_argmax_over_all_logits(monkeypatch):
    import lopkit.benchmarks.continual as continual

    seen = []  # (logits, targets, mask) of every training step, recorded from the benchmark's own scoring call
    original = continual.masked_accuracy_count

    def recording(logits, targets, class_mask=None):
        if class_mask is not None:
            seen.append((logits.clone(), targets.clone()))
        return original(logits, targets, class_mask)

    monkeypatch.setattr(continual, "masked_accuracy_count", recording)
    bench = _make(ClassSplitBenchmark, {"num_tasks": 2, "log_every": 7, "monitor": False})
    rows = bench.run(bench.total_steps)
    steps = bench._steps_per_task[0]
    train_calls = [seen[i] for i in range(len(seen)) if seen[i][0].shape[0] == bench.config.batch_size]
    assert len(train_calls) == bench.total_steps
    for task in (0, 1):
        logits = torch.cat([c[0] for c in train_calls[task * steps : (task + 1) * steps]])
        targets = torch.cat([c[1] for c in train_calls[task * steps : (task + 1) * steps]])
        expected_unmasked = int((logits.argmax(1) == targets).sum()) / targets.numel()
        (reported,) = [r["value"] for r in rows if r["metric"] == "task_online_accuracy_unmasked" and r["task"] == task]
        assert reported == pytest.approx(expected_unmasked, abs=1e-12)
        (masked,) = [r["value"] for r in rows if r["metric"] == "task_online_accuracy" and r["task"] == task]
        assert reported <= masked  # right over all logits implies right over the active ones
    bins = [r for r in rows if r["metric"] == "online_accuracy_unmasked"]
    assert [r["step"] for r in bins] == [r["step"] for r in rows if r["metric"] == "online_accuracy"]
    unmasked_free = _make(RandomLabelsBenchmark, {"num_tasks": 1, "monitor": False})
    assert not [r for r in unmasked_free.run(unmasked_free.total_steps) if "unmasked" in r["metric"]]
