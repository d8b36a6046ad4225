"""Tests for ``lopkit demo``: tidy rows, diagnosis text, and the files the command writes (tiny settings)."""

from __future__ import annotations

import csv
import math

import pytest

from lopkit.cli import main
from lopkit.data.errors import DatasetNotFoundError
from lopkit.data.fashion_mnist import fashion_mnist_dir
from lopkit.demo import CSV_COLUMNS, diagnose, series, tidy_rows, trap_summary, window_drop, write_csv


def _fashion_mnist_available() -> bool:
    try:
        fashion_mnist_dir()
    except DatasetNotFoundError:
        return False
    return True


needs_data = pytest.mark.skipif(
    not _fashion_mnist_available(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)

TINY = ["--tasks", "2", "--steps", "4", "--samples", "128", "--jobs", "1"]


def _benchmark_rows() -> list[dict]:
    """Rows as the random_labels benchmark emits them: per-task accuracies, Monitor rows at task start and end."""
    rows = []
    for task, (start, end) in enumerate(((0, 10), (10, 20))):
        rows.append({"step": end, "task": task, "layer": "model", "metric": "task_online_accuracy", "value": 0.6 - 0.2 * task})
        rows.append({"step": end, "task": task, "layer": "model", "metric": "task_final_train_accuracy", "value": 0.9 - 0.3 * task})
        rows.append({"step": end, "task": task, "layer": "model", "metric": "online_accuracy", "value": 0.5})  # a bin
        for layer, dead in (("act1", 0.1 + 0.5 * task), ("act2", 0.3)):
            rows.append({"step": start, "task": task, "layer": layer, "metric": "dead_fraction", "value": 0.99})
            rows.append({"step": end, "task": task, "layer": layer, "metric": "dead_fraction", "value": dead})
            rows.append({"step": end, "task": task, "layer": layer, "metric": "effective_rank", "value": 40.0 - 20 * task})
        rows.append({"step": end, "task": task, "layer": "fc1", "metric": "dead_fraction", "value": 0.7})  # not act*
    return rows


def test_tidy_rows_keep_task_end_values_per_layer_and_their_mean():
    rows = tidy_rows("plain MLP", _benchmark_rows())
    assert all(set(r) == set(CSV_COLUMNS) for r in rows)
    assert series(rows, "plain MLP", "online_accuracy") == [0.6, pytest.approx(0.4)]
    assert series(rows, "plain MLP", "final_train_accuracy") == [0.9, pytest.approx(0.6)]
    assert series(rows, "plain MLP", "dead_fraction:act1") == [0.1, 0.6]  # the task-end value, not the start's 0.99
    assert series(rows, "plain MLP", "dead_fraction") == [pytest.approx(0.2), pytest.approx(0.45)]  # mean of act1, act2
    assert series(rows, "plain MLP", "effective_rank:act2") == [40.0, 20.0]
    assert not [r for r in rows if "fc1" in r["metric"]]  # only the hidden ReLU outputs are summarised


def test_window_drop_and_diagnosis_text():
    assert window_drop([0.8, 0.7, 0.6, 0.4, 0.3, 0.2]) == pytest.approx(0.7 - 0.3)
    assert window_drop([0.5, 0.3]) == pytest.approx(0.2)
    assert math.isnan(window_drop([]))
    rows = tidy_rows("plain MLP", _benchmark_rows())
    lines = diagnose(rows, "plain MLP")
    assert lines == [
        "fc1/act1: 60 % dead units (task 0: 10 %), effective rank 40 -> 20",
        "fc2/act2: 30 % dead units (task 0: 30 %), effective rank 40 -> 20",
    ]
    assert "fc1 (act1) ends with 60 % dead units" in trap_summary(rows, "plain MLP")


def test_write_csv_has_exactly_the_tidy_columns(tmp_path):
    path = tmp_path / "sub" / "demo_metrics.csv"
    write_csv([{"method": "m", "task": 0, "metric": "online_accuracy", "value": 0.5, "extra": 1}], path)
    with path.open() as handle:
        assert handle.readline().strip() == "method,task,metric,value"
        assert handle.readline().strip() == "m,0,online_accuracy,0.5"


@needs_data
def test_demo_writes_the_tidy_csv_and_the_png(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", *TINY, "--methods", "none,batchnorm", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    with (out / "demo_metrics.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert {r["method"] for r in rows} == {"plain MLP", "+ BatchNorm"}
    assert {r["task"] for r in rows} == {"0", "1"}
    metrics = {r["metric"] for r in rows}
    layers = [f"act{i}" for i in range(1, 6)]  # the e1 preset's 5 hidden layers, readable names
    expected = {"online_accuracy", "final_train_accuracy", "dead_fraction", "effective_rank"}
    expected |= {f"{m}:{layer}" for m in ("dead_fraction", "effective_rank") for layer in layers}
    assert metrics == expected
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in rows if r["metric"] in ("online_accuracy", "dead_fraction"))
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "online training accuracy per task" in printed and "fc3/act3:" in printed and "the trap:" in printed


def test_demo_bad_arguments_give_one_error_line_and_write_nothing(tmp_path, capsys):
    for args, message in (
        (["--methods", "nonsense"], "unknown method 'nonsense'"),
        (["--tasks", "1"], "--tasks must be >= 2"),
        (["--samples", "64"], "--samples must be >= 128"),
    ):
        code = main(["demo", *args, "--out", str(tmp_path / "demo")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "demo").exists()
