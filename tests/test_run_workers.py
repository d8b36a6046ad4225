"""``lopkit run --workers N``: the seeds split between spawned processes, same rows as one process, resumable."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import registered_test_benchmark

from lopkit.cli import main
from lopkit.runner.run_workers import workers_plan_line
from lopkit.runner.seed_runs import parse_workers, seed_parts, threads_per_worker
from lopkit.runner.store import ResultStore
from lopkit.configs import ConfigError

SRC = Path(__file__).resolve().parents[1] / "src"
TINY_TOY = ["num_tasks=2", "steps_per_task=6", "log_every=3", "width=4", "batch_size=2", "probe_size=8"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Call ``lopkit ARGS`` in this process; return (exit code, stdout, stderr)."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rows_by_seed(out: Path) -> dict[tuple, float]:
    """Every stored metric row keyed by (seed, step, task, layer, metric); NaN as the string 'nan'."""
    with ResultStore(out) as store:
        frame = store.metrics()
    return {(int(r.seed), int(r.step), int(r.task), str(r.layer), str(r.metric)): float(r.value)
            for r in frame.itertuples(index=False)}


def assert_rows_close(got: dict, expected: dict) -> None:
    """Same keys; values equal within float tolerance (NaN where NaN)."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_seed_parts_are_contiguous_and_near_equal():
    assert seed_parts(range(8), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert seed_parts([10, 11, 12, 13, 14, 15, 16], 3) == [[10, 11, 12], [13, 14], [15, 16]]
    assert seed_parts([3, 1, 2], 5) == [[3], [1], [2]]  # never more parts than seeds, order kept
    assert seed_parts([4, 5], 1) == [[4, 5]]
    with pytest.raises(ValueError):
        seed_parts([0], 0)


def test_threads_are_shared_out_between_workers():
    assert threads_per_worker(None, 2) == 1  # --threads not given: one thread per worker
    assert threads_per_worker(8, 2) == 4 and threads_per_worker(3, 2) == 1 and threads_per_worker(1, 4) == 1


def test_parse_workers_and_the_plan_line():
    assert parse_workers("3") == 3 and parse_workers(" 1 ") == 1
    for bad in ("0", "-2", "two", "2.5", ""):
        with pytest.raises(ConfigError, match="--workers"):
            parse_workers(bad)
    assert workers_plan_line([[0, 1, 2, 3], [4, 5, 6, 7]], None, 1) == (
        "workers: 8 seeds as 2 workers x 4-seed vectorised groups, 1 thread each")
    assert workers_plan_line([[0, 1, 2], [3, 4]], None, 2, finished=3) == (
        "workers: 5 seeds as 2 workers x 3- and 2-seed vectorised groups, 2 threads each (3 more already finished)")
    assert workers_plan_line([[0, 1], [2, 3]], "--no-vectorise", 1) == (
        "workers: 4 seeds as 2 workers x 2 seeds one after the other (separate runs: --no-vectorise), 1 thread each")
    assert workers_plan_line([[0], [1]], None, 1) == "workers: 2 seeds as 2 workers x 1 seed, 1 thread each"


def test_help_explains_workers_with_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert "--workers N" in text and "--seeds 8 --workers 2 --threads 1" in text


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1.5"])
def test_bad_workers_gives_one_error_line_and_exit_2(capsys, tmp_path, value):
    out = tmp_path / "exp"
    code, stdout, stderr = run_cli(capsys, "run", "toy", "--workers", value, "--out", str(out), "--no-progress")
    assert code == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --workers"), stderr
    assert not out.exists()


def test_more_workers_than_seeds_is_capped_with_a_note(capsys, tmp_path):
    out = tmp_path / "exp"
    code, stdout, stderr = run_cli(capsys, "run", "toy", "--preset", "smoke", "--seed-list", "5", "--set", *TINY_TOY,
                                   "--workers", "3", "--out", str(out), "--no-progress")
    assert code == 0, stderr
    assert "note: --workers 3 is more than the 1 seed; using 1 worker (one per seed)" in stdout
    assert "workers:" not in stdout  # one seed, one worker: this process, as without --workers
    with ResultStore(out) as store:
        runs = store.runs()
    assert runs["seed"].tolist() == [5] and runs["status"].tolist() == ["finished"]
    assert runs["pid"].tolist() == [os.getpid()]


def test_two_workers_give_the_rows_of_one_process_and_a_finished_store_is_not_rerun(capsys, tmp_path):
    common = ["run", "random_labels", "--preset", "smoke", "--seeds", "4", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    code, stdout, stderr = run_cli(capsys, *common, "--out", str(one))
    assert code == 0, stderr
    code, stdout, stderr = run_cli(capsys, *common, "--workers", "2", "--threads", "2", "--out", str(two))
    assert code == 0, stderr
    assert "workers: 4 seeds as 2 workers x 2-seed vectorised groups, 1 thread each" in stdout
    assert [line.split(" in ")[0] for line in stdout.splitlines() if line.startswith("seed ")] == [
        f"seed {s}: finished at step 90/90" for s in range(4)]
    assert_rows_close(rows_by_seed(two), rows_by_seed(one))
    with ResultStore(one) as store:
        ids_one = sorted(store.runs()[["seed", "run_id"]].values.tolist())
    with ResultStore(two) as store:
        runs = store.runs()
    assert sorted(runs[["seed", "run_id"]].values.tolist()) == ids_one  # the same run ids, so each path resumes the other
    pids = dict(zip(runs["seed"], runs["pid"]))
    assert pids[0] == pids[1] != pids[2] == pids[3] and os.getpid() not in pids.values()  # 2 parts, 2 processes

    code, stdout, stderr = run_cli(capsys, *common, "--workers", "2", "--out", str(two))
    assert code == 0, stderr
    assert stdout.count("already finished") == 4 and "workers:" not in stdout  # no process started


@pytest.fixture
def fail_seed_benchmark():
    """Register the test-only ``toy_fail_seed`` benchmark (tests/run_worker_faults.py) for one test."""
    yield from registered_test_benchmark("run_worker_faults", "toy_fail_seed")


def test_a_failing_worker_is_reported_and_the_other_results_kept(fail_seed_benchmark, capsys, tmp_path):
    out = tmp_path / "exp"
    code, stdout, stderr = run_cli(capsys, "run", fail_seed_benchmark, "--preset", "smoke", "--seeds", "4", "--set",
                                   *TINY_TOY, "fail_seed=2", "--workers", "2", "--out", str(out), "--no-progress")
    assert code == 1
    assert "workers: 4 seeds as 2 workers x 2 seeds one after the other (separate runs: " in stdout
    assert "error: seed 2 failed: RuntimeError: planned failure of seed 2 at step 5" in stderr
    assert "seed 3: finished at step 12/12" in stdout and "seed 0: finished" in stdout
    with ResultStore(out) as store:
        runs = store.runs().set_index("seed")
    assert runs["status"].to_dict() == {0: "finished", 1: "finished", 2: "failed", 3: "finished"}
    assert "Traceback" in runs.loc[2, "error"] and runs.loc[2, "step"] == 5  # its commits before the error are kept


def _checkpoint_steps(path: Path) -> list[int]:
    """Steps of the checkpoints committed so far (empty while the store does not exist yet)."""
    import sqlite3

    if not path.exists():
        return []
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as conn:
            return [int(r[0]) for r in conn.execute("SELECT step FROM runs")]
    except sqlite3.Error:
        return []


@pytest.mark.slow
def test_ctrl_c_stops_the_workers_and_the_same_command_resumes_to_the_clean_rows(capsys, tmp_path):
    out, clean = tmp_path / "exp", tmp_path / "clean"
    args = ["run", "toy", "--preset", "smoke", "--seeds", "4", "--checkpoint-every", "4", "--no-progress"]
    slow = ["--set", *TINY_TOY, "num_tasks=10", "step_sleep=0.1"]  # 60 steps of 0.1 s; the rows do not change
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen([sys.executable, "-m", "lopkit.cli", *args, *slow, "--workers", "2", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        steps = _checkpoint_steps(out / "results.sqlite")
        if len(steps) == 4 and min(steps) >= 4:  # both workers have committed a checkpoint
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupt: the running runs are saving a checkpoint" in stderr and "Traceback" not in stderr
    assert "to resume, run the same command again: lopkit run toy" in stderr and "--workers 2" in stderr
    with ResultStore(out) as store:
        runs = store.runs()
    assert set(runs["status"]) == {"interrupted"} and (runs["step"] < 60).all() and (runs["step"] >= 4).all()

    code, stdout, stderr = run_cli(capsys, *args, *slow, "--workers", "2", "--out", str(out))
    assert code == 0, stderr
    assert stdout.count("finished at step 60/60") == 4
    code, _, stderr = run_cli(capsys, *args, "--set", *TINY_TOY, "num_tasks=10", "--out", str(clean))
    assert code == 0, stderr
    assert_rows_close(rows_by_seed(out), rows_by_seed(clean))


@pytest.mark.slow
def test_a_killed_worker_says_to_rerun_the_same_command(kill_benchmark, capsys, tmp_path):
    out = tmp_path / "exp"
    code, _, stderr = run_cli(capsys, "run", kill_benchmark, "--preset", "smoke", "--seeds", "2", "--set", *TINY_TOY,
                              "kill_at_step=5", "--workers", "2", "--out", str(out), "--no-progress")
    assert code == 1
    for seed in (0, 1):
        line = next(line for line in stderr.splitlines() if line.startswith(f"error: seed {seed} failed:"))
        assert "worker process died" in line and "run the same command again" in line, line
        assert "sweep" not in line, line
