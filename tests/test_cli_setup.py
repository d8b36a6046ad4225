"""Set-up errors and shared flags of the training commands (issue 12, defect 6: missing dataset, --threads)."""

from __future__ import annotations

import pytest
import torch

from lopkit.cli import build_parser, main
from lopkit.runner.store import ResultStore

# every command that trains, with the arguments it needs to parse
TRAINING_COMMANDS = [
    ["run", "toy"],
    ["compare", "toy", "--methods", "sgd,l2"],
    ["sweep", "sweep.yaml"],
    ["demo"],
    ["moe", "pretrain"],
    ["moe", "finetune"],
    ["moe", "run"],
    ["kws", "train", "--corpus", "c", "--out", "o"],
    ["kws", "continual", "--out", "o"],
    ["kws", "run", "--out", "o"],
]


@pytest.mark.parametrize("argv", TRAINING_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_every_training_command_accepts_threads(argv):
    args = build_parser().parse_args([*argv, "--threads", "3"])
    assert args.threads == 3 and callable(args.func)
    assert build_parser().parse_args(argv).threads is None  # default: torch's own choice


@pytest.mark.parametrize("argv", [["run", "toy", "--preset", "smoke"], ["compare", "toy", "--methods", "sgd"]])
def test_threads_below_one_is_a_usage_error(tmp_path, capsys, argv):
    code = main([*argv, "--out", str(tmp_path / "x"), "--threads", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "error: --threads must be >= 1, got 0"


def test_run_threads_sets_torch_threads(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        code = main(["run", "toy", "--preset", "smoke", "--seeds", "1", "--set", "num_tasks=1", "steps_per_task=5",
                     "--out", str(tmp_path), "--threads", "2", "--no-progress"])
        assert code == 0 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def no_fashion_mnist(tmp_path, monkeypatch):
    """Point the Fashion-MNIST location at an empty folder, as on a machine without the dataset."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("LOPKIT_FASHION_MNIST_DIR", str(empty))
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    from lopkit.data import fashion_mnist

    fashion_mnist.clear_cache()
    yield empty
    fashion_mnist.clear_cache()


@pytest.mark.parametrize("argv", [
    ["run", "class_split", "--preset", "smoke", "--seeds", "2"],
    ["compare", "permuted", "--methods", "sgd,l2", "--seeds", "2", "--preset", "smoke"],
])  # fmt: skip
def test_a_missing_dataset_is_a_setup_error_with_nothing_stored(tmp_path, capsys, no_fashion_mnist, argv):
    out = tmp_path / "exp"
    code = main([*argv, "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and "Fashion-MNIST" in errors[0], captured.err
    assert "Traceback" not in captured.err and "/None" not in captured.out and "failed" not in captured.out
    if (out / "results.sqlite").exists():
        with ResultStore(out) as store:
            assert len(store.runs()) == 0
