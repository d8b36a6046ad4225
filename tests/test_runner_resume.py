"""Resumable execution: killed (SIGKILL), interrupted (SIGINT) or paused runs end with exactly the uninterrupted rows."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lopkit.benchmarks.toy import ToyBenchmark, ToyConfig
from lopkit.configs import ConfigError, build_config
from lopkit.mitigations.base import Mitigation
from lopkit.runner.execute import execute_run, method_label, resolve_methods
from lopkit.runner.store import ResultStore

# two tasks of 12 steps with bins of 5: partial bins at task ends exercise the accumulator kept in the state
SMALL = {"num_tasks": 2, "steps_per_task": 12, "log_every": 5, "width": 8, "batch_size": 4, "probe_size": 16}


def row_tuples(frame) -> list[tuple]:
    """Metric rows as sorted (step, task, layer, metric, value) tuples, for exact comparison."""
    return sorted(zip(frame["step"], frame["task"], frame["layer"], frame["metric"], frame["value"]))


def reference_rows(config: ToyConfig, seed: int = 0) -> list[tuple]:
    """Rows of one uninterrupted toy run, straight from the benchmark (no runner, no store)."""
    benchmark = ToyBenchmark(config, seed)
    rows = benchmark.run(benchmark.total_steps)
    return sorted((r["step"], r["task"], r["layer"], r["metric"], r["value"]) for r in rows)


def small_config(**overrides) -> ToyConfig:
    return build_config(ToyConfig, SMALL, overrides)


# ------------------------------------------------------------------------------------------- toy benchmark


def test_toy_rows_follow_the_documented_schedule():
    config = small_config()
    rows = ToyBenchmark(config, 0).run(10_000)
    loss_steps = [(r["step"], r["task"]) for r in rows if r["metric"] == "loss"]
    assert loss_steps == [(5, 0), (10, 0), (12, 0), (17, 1), (22, 1), (24, 1)]
    finals = [(r["step"], r["task"]) for r in rows if r["metric"] == "task_final_loss"]
    assert finals == [(12, 0), (24, 1)]
    assert all(r["layer"] == "model" and set(r) == {"step", "task", "layer", "metric", "value"} for r in rows)


def test_toy_is_deterministic_and_chunking_does_not_change_rows():
    config = small_config()
    one_go = reference_rows(config)
    assert reference_rows(config) == one_go
    assert reference_rows(config, seed=1) != one_go
    for sizes in ([1] * 24, [7, 1, 16], [3, 100]):
        benchmark, rows = ToyBenchmark(config, 0), []
        for size in sizes:
            rows += benchmark.run(size)
        assert sorted((r["step"], r["task"], r["layer"], r["metric"], r["value"]) for r in rows) == one_go
    assert benchmark.done and benchmark.run(5) == []


def test_toy_learns_within_a_task_and_the_loss_matches_an_independent_computation():
    config = build_config(ToyConfig, {"num_tasks": 2, "steps_per_task": 200, "log_every": 50})
    benchmark = ToyBenchmark(config, 0)
    rows = benchmark.run(200)
    losses = [r["value"] for r in rows if r["metric"] == "loss"]
    assert losses[-1] < 0.7 * losses[0]  # SGD makes progress on the first teacher
    # task_final_loss equals the MSE of the model on the task's probe batch, recomputed here
    from lopkit.benchmarks.toy import _PROBE_KEY, teacher_targets, toy_teacher
    from lopkit.data.seeding import seeded_generator

    inputs = torch.randn(config.probe_size, config.input_dim, generator=seeded_generator(0, _PROBE_KEY, 0))
    w1, b1 = benchmark.model[0].weight.detach(), benchmark.model[0].bias.detach()
    w2, b2 = benchmark.model[2].weight.detach(), benchmark.model[2].bias.detach()
    prediction = torch.relu(inputs @ w1.T + b1) @ w2.T + b2
    hidden, output = toy_teacher(config, 0, 0)
    target = (torch.relu(inputs @ hidden.T) @ output / hidden.shape[0] ** 0.5).unsqueeze(1)
    assert torch.allclose(target, teacher_targets((hidden, output), inputs))
    final = [r["value"] for r in rows if r["metric"] == "task_final_loss"][0]
    assert final == pytest.approx(((prediction - target) ** 2).mean().item(), rel=1e-5)


class RecordingMitigation(Mitigation):
    """Logs every hook call so the test can check the toy calls them in the documented order."""

    name = "recording"

    def __init__(self):
        self.calls: list[tuple] = []

    def prepare_model(self, model):
        self.calls.append(("prepare_model",))
        return model

    def attach(self, model, optimizer):
        self.calls.append(("attach",))

    def on_task_start(self, model, optimizer, task):
        self.calls.append(("on_task_start", task))

    def loss_term(self, model):
        self.calls.append(("loss_term",))
        return None

    def before_step(self, model, optimizer, step):
        self.calls.append(("before_step", step))

    def after_step(self, model, optimizer, step):
        self.calls.append(("after_step", step))


def test_toy_calls_every_mitigation_hook_in_order():
    method = RecordingMitigation()
    benchmark = ToyBenchmark(small_config(), 0, method)
    benchmark.run(24)
    calls = method.calls
    assert calls[:2] == [("prepare_model",), ("attach",)]
    expected = []
    for step in range(24):
        if step % 12 == 0:
            expected.append(("on_task_start", step // 12))
        expected += [("loss_term",), ("before_step", step), ("after_step", step)]
    assert calls[2:] == expected


# ------------------------------------------------------------------------------------------ execute_run


def test_execute_run_matches_the_benchmark_and_skips_finished_runs(tmp_path):
    config = small_config()
    store = ResultStore(tmp_path)
    result = execute_run(store, ToyBenchmark, config, 0, checkpoint_every=5, progress=False, preset="smoke")
    assert (result.status, result.step, result.total_steps) == ("finished", 24, 24)
    assert row_tuples(store.metrics()) == reference_rows(config)
    run = store.get_run(result.run_id)
    assert run["status"] == "finished" and run["preset"] == "smoke" and run["method"] == "sgd"
    assert store.load_checkpoint(result.run_id) is None
    again = execute_run(store, "toy", config, 0, ["none"], progress=False)  # "none" is the same baseline run
    assert again.status == "skipped" and again.run_id == result.run_id
    assert len(store.metrics()) == len(reference_rows(config))
    store.close()


def test_resuming_from_every_possible_checkpoint_gives_identical_rows(tmp_path):
    config = small_config()
    expected = reference_rows(config)
    store = ResultStore(tmp_path)
    for stop in range(1, 24):
        paused = execute_run(store, ToyBenchmark, config, 0, checkpoint_every=1000, progress=False, stop_after_steps=stop)
        assert (paused.status, paused.step) == ("paused", stop)
        assert store.load_checkpoint(paused.run_id)[0] == stop
        assert row_tuples(store.metrics()) == [r for r in expected if r[0] <= stop]
        finished = execute_run(store, ToyBenchmark, config, 0, checkpoint_every=3, progress=False)
        assert (finished.status, finished.resumed_from) == ("finished", stop)
        assert row_tuples(store.metrics()) == expected, f"resume from step {stop}"
        store.delete_run(finished.run_id)
    store.close()


def test_checkpoint_interval_does_not_change_rows(tmp_path):
    config = small_config()
    for every in (1, 7, 24):
        store = ResultStore(tmp_path / f"every{every}")
        execute_run(store, ToyBenchmark, config, 0, checkpoint_every=every, progress=False)
        assert row_tuples(store.metrics()) == reference_rows(config)
        store.close()


class DivergingToy(ToyBenchmark):
    """The toy whose weights are poisoned with NaN once step 14 is reached, so its own NaN check fires."""

    def run(self, n_steps):
        rows = super().run(n_steps)
        if self.step >= 14:
            with torch.no_grad():
                self.model[0].weight.fill_(float("nan"))
        return rows


def test_nan_loss_marks_the_run_failed_and_keeps_committed_rows(tmp_path):
    config = small_config()
    store = ResultStore(tmp_path)
    result = execute_run(store, DivergingToy, config, 0, checkpoint_every=4, progress=False, raise_on_error=False)
    assert result.status == "failed"
    assert "DivergedError" in result.error
    pattern = r"toy diverged at step 1[4-9] \(task 1\): the training loss became nan; lower lr"
    assert re.match(pattern, result.error_line)
    run = store.get_run(result.run_id)
    assert run["status"] == "failed" and "lower lr" in run["error"]
    # rows committed before the failure are kept: everything up to the last checkpoint before the NaN
    committed = run["step"]
    assert 14 <= committed < 24
    assert row_tuples(store.metrics()) == [r for r in reference_rows(config) if r[0] <= committed]
    with pytest.raises(FloatingPointError, match="lower lr"):
        execute_run(store, DivergingToy, config, 0, checkpoint_every=4, progress=False)
    assert store.get_run(result.run_id)["status"] == "failed"
    store.close()


def test_methods_resolve_and_unknown_names_fail_before_writing(tmp_path):
    assert resolve_methods(["sgd", "none"]) == [] and resolve_methods(None) == []
    assert method_label([]) == method_label(["SGD"]) == method_label("none,sgd") == "sgd"
    with pytest.raises(ConfigError, match="bogus_method"):
        resolve_methods(["bogus_method"])
    store = ResultStore(tmp_path)
    with pytest.raises(ConfigError, match="bogus_method"):
        execute_run(store, ToyBenchmark, small_config(), 0, ["sgd,bogus_method"], progress=False)
    with pytest.raises(ConfigError, match="checkpoint_every"):
        execute_run(store, ToyBenchmark, small_config(), 0, checkpoint_every=0, progress=False)
    assert store.runs().empty
    store.close()


# -------------------------------------------------------------------------------- killed CLI processes

CLI_SET = ["num_tasks=3", "steps_per_task=40", "log_every=10", "width=8", "batch_size=4", "probe_size=16",
           "step_sleep=0.008"]


def cli_command(out: Path) -> list[str]:
    """``python -m lopkit.cli run toy ...`` with a slowed-down toy (~1 s of training) checkpointing every 10 steps."""
    return [sys.executable, "-m", "lopkit.cli", "run", "toy", "--preset", "smoke", "--seeds", "1", "--set", *CLI_SET,
            "--checkpoint-every", "10", "--no-progress", "--out", str(out)]


def checkpoint_step(db: Path) -> int | None:
    """The step of the (single) checkpoint in the store, read by a separate connection; None if none yet."""
    with contextlib.suppress(sqlite3.OperationalError), contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
        row = conn.execute("SELECT step FROM checkpoints").fetchone()
        return None if row is None else int(row[0])
    return None


def start_and_signal_after_checkpoint(out: Path, sig: int, after_step: int) -> tuple[subprocess.Popen, int]:
    """Start the CLI and send ``sig`` as soon as a checkpoint beyond ``after_step`` is committed."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LOPKIT_PROGRESS", None)
    process = subprocess.Popen(cli_command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        step = checkpoint_step(out / "results.sqlite")
        if step is not None and step > after_step:
            process.send_signal(sig)
            return process, step
        time.sleep(0.005)
    output = process.communicate(timeout=30)
    raise AssertionError(f"no new checkpoint before the process ended: {output}")


def test_cli_run_killed_and_interrupted_then_resumed_gives_exact_rows(tmp_path, capsys):
    out = tmp_path / "exp"
    config = ToyBenchmark.make_config("smoke", dict(item.split("=") for item in CLI_SET))
    expected = reference_rows(config)

    # 1) Ctrl-C after the first checkpoint: graceful stop, exit 130, a hint to resume
    process, _ = start_and_signal_after_checkpoint(out, signal.SIGINT, after_step=0)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "to resume, run the same command again" in stderr and "Traceback" not in stderr
    store = ResultStore(out)
    (run,) = store.runs().to_dict("records")
    interrupted_at = run["step"]
    # stored as 'running', shown as 'interrupted' since its process is gone
    assert run["stored_status"] == "running" and run["status"] == "interrupted" and 10 <= interrupted_at < 120
    assert row_tuples(store.metrics()) == [r for r in expected if r[0] <= interrupted_at]
    store.close()

    # 2) rerun, then SIGKILL after it committed a later checkpoint (no chance to clean up)
    process, killed_after = start_and_signal_after_checkpoint(out, signal.SIGKILL, after_step=interrupted_at)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    store = ResultStore(out)
    (run,) = store.runs().to_dict("records")
    assert run["status"] == "interrupted" and killed_after <= run["step"] < 120, "the run finished before it was killed"
    assert row_tuples(store.metrics()) == [r for r in expected if r[0] <= run["step"]]
    store.close()

    # 3) rerun the same command to the end (in this process, to save a Python start-up): exactly the
    #    uninterrupted rows, none missing, none twice
    from lopkit.cli import main

    assert main(cli_command(out)[3:]) == 0
    printed = capsys.readouterr().out
    assert f"resumed from step {run['step']}" in printed and "lopkit report" in printed
    store = ResultStore(out)
    (run,) = store.runs().to_dict("records")
    assert run["status"] == "finished" and run["step"] == 120
    assert row_tuples(store.metrics()) == expected
    store.close()


def test_keep_checkpoint_leaves_the_final_state_in_the_store(tmp_path):
    """A later stage (fine-tuning, evaluation) reads the trained weights of a finished run from the store."""
    config = small_config()
    store = ResultStore(tmp_path)
    kept = execute_run(store, ToyBenchmark, config, 0, progress="never", keep_checkpoint=True)
    dropped = execute_run(store, ToyBenchmark, config, 1, progress="never")
    assert kept.status == dropped.status == "finished"
    assert store.load_checkpoint(dropped.run_id) is None
    step, state = store.load_checkpoint(kept.run_id)
    reference = ToyBenchmark(config, 0)
    reference.run(reference.total_steps)
    assert step == reference.total_steps == state["step"]
    restored = ToyBenchmark(config, 0)
    restored.load_state_dict(state)
    for (name, want), got in zip(reference.model.state_dict().items(), restored.model.state_dict().values()):
        assert torch.equal(want, got), name


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("cbp+l2init", ["cbp", "l2init"]),
        ("CBP, l2init", ["cbp", "l2init"]),
        ("l2:weight_decay=1e+4+redo", ["l2:weight_decay=1e+4", "redo"]),
        ("noisy_sgd:std=2E+3", ["noisy_sgd:std=2E+3"]),
        (["shrink_perturb:shrink=0.9", "redo+cbp"], ["shrink_perturb:shrink=0.9", "redo", "cbp"]),
    ],
)
def test_method_specs_split_on_plus_and_comma_but_not_inside_exponents(spec, expected):
    from lopkit.runner.execute import split_method_names

    assert split_method_names(spec) == expected


def test_execute_run_takes_an_already_resolved_run_id_and_refuses_a_foreign_one(tmp_path):
    torch.set_num_threads(1)
    config = ToyBenchmark.make_config("smoke")
    with ResultStore(tmp_path) as store:
        run_id = store.resolve_run_id("toy", "sgd", config, 0)
        other = store.resolve_run_id("toy", "sgd", config, 1)
        with pytest.raises(ValueError, match="is not an id of this toy sgd run"):
            execute_run(store, ToyBenchmark, config, 0, progress=False, run_id=other)
        assert store.runs().empty  # refused before anything is written
        result = execute_run(store, ToyBenchmark, config, 0, progress=False, run_id=run_id)
        assert result.status == "finished" and result.run_id == run_id
        assert list(store.runs()["run_id"]) == [run_id]
