"""Tests of sweeps: parsing/validation, the sequential, local (process pool) and Ray backends, crash isolation,
Ctrl-C + restart, and the seed-vectorised bitflip fast path. Rows are checked against direct benchmark runs."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lopkit.benchmarks.bitflip import BitFlipBenchmark
from lopkit.benchmarks.toy import ToyBenchmark
from lopkit.runner.store import ResultStore
from lopkit.runner.sweep import SweepError, _plan_tasks, format_summary, load_sweep, parse_sweep, run_sweep
from lopkit.runner.sweep_cli import main as sweep_main

TINY_TOY = {"num_tasks": 2, "steps_per_task": 10, "log_every": 5, "probe_size": 16}
HAS_RAY = importlib.util.find_spec("ray") is not None


def toy_sweep(experiment: Path, seeds=(0, 1), methods=("sgd", "l2init"), extra=None) -> dict:
    """A small toy sweep mapping: one entry, ``methods`` x ``seeds`` runs."""
    return {
        "experiment": str(experiment),
        "preset": "smoke",
        "seeds": list(seeds),
        "vectorize_seeds": False,  # separate runs: their rows equal direct runs bit for bit (ToySeedGroup's: to rounding)
        "runs": [{"benchmark": "toy", "methods": list(methods), "set": {**TINY_TOY, **(extra or {})}}],
    }


def rows_by_run(experiment: Path) -> dict[tuple[str, str, int], list[tuple]]:
    """Every stored metric row keyed by (benchmark, method, seed) (run ids ignored, NaN made comparable)."""
    with ResultStore(experiment) as store:
        frame = store.metrics()
    result: dict[tuple[str, str, int], list[tuple]] = {}
    for r in frame.itertuples(index=False):
        value = "nan" if math.isnan(r.value) else r.value
        result.setdefault((r.benchmark, r.method, int(r.seed)), []).append((r.step, r.task, r.layer, r.metric, value))
    return result


def statuses(experiment: Path) -> dict[tuple[str, int], str]:
    """Status of every run in the store keyed by (method, seed)."""
    with ResultStore(experiment) as store:
        frame = store.runs()
    return {(r.method, int(r.seed)): r.status for r in frame.itertuples(index=False)}


def direct_toy_rows(seed: int, overrides: dict, methods=()) -> list[tuple]:
    """Rows of one toy run driven directly (no runner, no store), in the same tuple form."""
    from lopkit.runner.execute import resolve_methods

    config = ToyBenchmark.make_config("smoke", {**TINY_TOY, **overrides})
    bench = ToyBenchmark(config, seed, resolve_methods(methods))
    return [(r["step"], r["task"], r["layer"], r["metric"], r["value"]) for r in bench.run(bench.total_steps)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """A clean sequential sweep of 2 methods x 2 seeds (the rows every backend must reproduce)."""
    experiment = tmp_path_factory.mktemp("reference")
    outcomes = run_sweep(parse_sweep(toy_sweep(experiment)), "sequential", progress=False)
    assert [o.status for o in outcomes] == ["finished"] * 4
    return rows_by_run(experiment)


# ------------------------------------------------------------------------------------------------ parsing


def test_expansion_order_and_counts(tmp_path):
    data = {
        "experiment": str(tmp_path),
        "preset": "smoke",
        "seeds": 2,
        "runs": [
            {"benchmark": "toy", "methods": ["sgd", "cbp:replacement_rate=1e-3", "l2init,shrink_perturb"],
             "grid": {"width": [4, 8], "lr": 0.01}, "set": {"num_tasks": 2}},
            {"benchmark": "bitflip", "seeds": [7], "preset": "default", "grid": {"width": [5, 10, 50]}},
        ],
    }
    sweep = parse_sweep(data)
    assert len(sweep.runs) == 2 * 3 * 2 + 3 * 1 * 1
    first = sweep.runs[0]
    assert (first.benchmark, first.overrides_dict, first.method_label, first.seed) == (
        "toy", {"num_tasks": 2, "width": 4, "lr": 0.01}, "sgd", 0)
    assert [s.seed for s in sweep.runs[:2]] == [0, 1]
    assert sweep.runs[4].method_label == "l2init+shrink_perturb"
    assert sweep.runs[6].overrides_dict["width"] == 8
    assert [(s.preset, s.overrides_dict["width"], s.seed) for s in sweep.runs[12:]] == [
        ("default", 5, 7), ("default", 10, 7), ("default", 50, 7)]
    config = sweep.runs[0].make_config()
    assert (config.width, config.lr, config.num_tasks, config.steps_per_task) == (4, 0.01, 2, 40)


def test_every_problem_is_reported_at_once(tmp_path):
    data = {
        "experiment": str(tmp_path),
        "seeds": [0, 0],
        "colour": "blue",
        "runs": [
            {"benchmark": "toy", "methods": ["nosuchmethod", "cbp:nosuchparam=1"], "grid": {"width": [4, -1]},
             "set": {"widht": 3}},
            {"benchmark": "nosuchbench"},
            {"benchmark": "toy", "grid": {"lr": [0.1]}, "set": {"lr": 0.2}, "extra": 1},
            {"benchmark": "toy", "preset": "huge"},
        ],
    }
    with pytest.raises(SweepError) as info:
        parse_sweep(data, source="bad.yaml")
    text = str(info.value)
    for fragment in ["seeds must be distinct", "'colour'", "nosuchmethod", "nosuchparam", "'widht'",
                     "nosuchbench", "both in 'set' and in 'grid'", "'extra'", "'huge'"]:
        assert fragment in text, fragment
    assert len(info.value.problems) >= 9 and text.startswith("bad.yaml has")


def test_bad_config_value_and_duplicate_runs(tmp_path):
    data = toy_sweep(tmp_path, extra=None)
    data["runs"][0]["grid"] = {"width": [4, 0]}  # width 0 fails ToyConfig.validate
    # same config as the width=4 sgd runs ("none" and "sgd" both mean no mitigation)
    data["runs"].append({"benchmark": "toy", "methods": ["none"], "set": {**TINY_TOY, "width": 4}})
    with pytest.raises(SweepError) as info:
        parse_sweep(data)
    text = str(info.value)
    assert "width must be >= 1" in text
    assert "appears twice" in text


def test_cli_exit_codes_for_bad_file_and_dry_run(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: x\nruns:\n  - benchmark: nope\n  - benchmark: toy\n    methods: [zzz]\n")
    assert sweep_main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and "nope" in err and "zzz" in err
    assert sweep_main([str(tmp_path / "missing.yaml")]) == 2
    good = tmp_path / "good.yaml"
    good.write_text(f"experiment: {tmp_path / 'out'}\npreset: smoke\nseeds: 3\nruns:\n  - benchmark: toy\n")
    assert sweep_main([str(good), "--dry-run"]) == 0
    assert "3 runs (3 to do)" in capsys.readouterr().out


def test_cli_lists_every_problem_of_every_entry_on_its_own_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "experiment: x\npreset: smoke\nruns:\n"
        "  - benchmark: nope\n    methods: [zzz]\n"                       # unknown benchmark AND method
        "  - benchmark: toy\n    preset: huge\n    methods: [yyy]\n"     # unknown preset AND method
        "  - benchmark: toy\n    set: {widht: 3, width: abc}\n"            # two bad keys in one 'set'
        "    grid: {num_tasks: [], steps_per_task: []}\n"                  # two empty grid lists
        "  - benchmark: toy\n    grid: {width: [4, x], lr: [y]}\n"         # two bad grid values
    )
    assert sweep_main([str(bad)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"error: {bad} has 10 problems:", lines
    assert len(lines) == 11 and all(line.startswith("  - ") for line in lines[1:]), lines
    text = "\n".join(lines)
    for fragment in ["runs[0].benchmark: unknown benchmark 'nope'", "runs[0].methods[0]: zzz",
                     "runs[1] (toy).preset: no preset 'huge'", "runs[1] (toy).methods[0]: yyy",
                     "runs[2] (toy).set.widht: unknown config key", "runs[2] (toy).set.width: width: expected an integer",
                     "runs[2] (toy).grid.num_tasks: the list of values is empty",
                     "runs[2] (toy).grid.steps_per_task: the list of values is empty",
                     "runs[3] (toy).grid.width=x:", "runs[3] (toy).grid.lr=y:"]:
        assert fragment in text, fragment


def test_vectorised_groups_are_planned_only_for_seed_groups(tmp_path):
    data = {
        "experiment": str(tmp_path), "preset": "smoke", "seeds": 4, "vectorize_seeds": True,
        "runs": [{"benchmark": "bitflip", "methods": ["sgd", "l2init"], "grid": {"width": [5, 10]}},
                 {"benchmark": "toy"}],
    }
    sweep = parse_sweep(data)
    tasks = _plan_tasks(sweep, list(range(len(sweep.runs))), str(tmp_path), parallelism=1, threads=1)
    vectorised = [t for t in tasks if t.vectorize_engine is not None]
    # bitflip + sgd: the fast path, one group of 4 seeds per width; bitflip + l2init (a lean kernel): one seed group
    # per width; toy: one group of its 4 seeds
    assert sorted(len(t.indices) for t in vectorised) == [4, 4, 4, 4, 4]
    assert sorted(t.vectorize_engine for t in vectorised) == ["group"] * 3 + ["lean"] * 2
    assert all({sweep.runs[i].overrides_dict.get("width") for i in t.indices}.__len__() == 1 for t in vectorised)
    assert sum(len(t.indices) for t in tasks) == len(sweep.runs) == 4 * 4 + 4
    # with idle workers, groups are split so that every worker has work
    spread = _plan_tasks(sweep, [i for i, s in enumerate(sweep.runs) if s.benchmark == "bitflip"
                                 and s.method_label == "sgd"], None, parallelism=4, threads=1)
    assert sorted(len(t.indices) for t in spread) == [2, 2, 2, 2]


# ------------------------------------------------------------------------------------------------ backends


def test_sequential_rows_equal_direct_runs_and_rerun_skips(reference, tmp_path):
    assert sorted(reference) == [("toy", "l2init", 0), ("toy", "l2init", 1), ("toy", "sgd", 0), ("toy", "sgd", 1)]
    for (_, method, seed), rows in reference.items():
        direct = direct_toy_rows(seed, {}, [] if method == "sgd" else [method])
        assert rows == [(s, t, layer, m, "nan" if math.isnan(v) else v) for s, t, layer, m, v in direct]
    experiment = tmp_path / "again"
    sweep = parse_sweep(toy_sweep(experiment, seeds=[0]))
    assert [o.status for o in run_sweep(sweep, "sequential", progress=False)] == ["finished", "finished"]
    assert [o.status for o in run_sweep(sweep, "sequential", progress=False)] == ["skipped", "skipped"]


def test_local_backend_matches_sequential_and_isolates_a_crash(reference, tmp_path):
    experiment = tmp_path / "local"
    data = toy_sweep(experiment)
    data["runs"].append({"benchmark": "toy", "seeds": [0], "set": {**TINY_TOY, "lr": 1e4}})  # diverges at once
    outcomes = run_sweep(parse_sweep(data), "local", max_workers=2, progress=False)
    assert [o.status for o in outcomes] == ["finished"] * 4 + ["failed"]
    assert "lower lr" in outcomes[-1].error_line and "DivergedError" in outcomes[-1].error
    rows = rows_by_run(experiment)
    assert {k: v for k, v in rows.items()} == reference  # the crashed run committed no rows
    with ResultStore(experiment) as store:
        runs = store.runs()
    failed = runs[runs["status"] == "failed"]
    assert len(failed) == 1 and "Traceback" in failed.iloc[0]["error"] and "lower lr" in failed.iloc[0]["error"]
    summary = format_summary(outcomes)
    assert "5 runs: 4 finished, 1 failed" in summary and "diverged" in summary


def kill_sweep(experiment: Path) -> dict:
    """2 methods x 2 seeds of toy_kill that finish, and one run (l2init seed 0) whose process kills itself at step 10."""
    return {
        "experiment": str(experiment), "preset": "smoke", "seeds": [0, 1], "checkpoint_every": 5,
        "runs": [{"benchmark": "toy_kill", "methods": ["sgd", "l2init"], "set": TINY_TOY},
                 {"benchmark": "toy_kill", "methods": ["l2init"], "seeds": [0], "set": {**TINY_TOY, "kill_at_step": 10}}],
    }


def check_only_the_killed_run_failed(experiment: Path, outcomes) -> None:
    """The run that SIGKILLs itself is failed with the cause and its rows up to the kill; all others finished."""
    assert [o.status for o in outcomes] == ["finished"] * 4 + ["failed"], format_summary(outcomes)
    killed = outcomes[-1]
    assert "worker process died" in killed.error_line and "rerun the sweep" in killed.error_line, killed.error
    with ResultStore(experiment) as store:
        runs = store.runs()
        metrics = store.metrics()
    assert sorted(runs["status"]) == ["failed"] + ["finished"] * 4
    failed = runs[runs["status"] == "failed"].iloc[0]
    assert "worker process died" in failed["error"] and int(failed["step"]) == 10
    assert json.loads(failed["config_json"])["kill_at_step"] == 10
    for run in runs[runs["status"] == "finished"].itertuples():  # the other runs: exactly the toy's rows
        got = metrics[metrics["run_id"] == run.run_id]
        rows = [(r.step, r.task, r.layer, r.metric, "nan" if math.isnan(r.value) else r.value)
                for r in got.itertuples(index=False)]
        expected = direct_toy_rows(int(run.seed), {}, [] if run.method == "sgd" else [run.method])
        assert rows == [(st, t, la, m, "nan" if math.isnan(v) else v) for st, t, la, m, v in expected]
    kept = metrics[metrics["run_id"] == failed["run_id"]]
    assert len(kept) and kept["step"].max() <= 10  # the rows committed before the kill are kept


def test_local_sweep_survives_a_worker_killed_by_sigkill(kill_benchmark, tmp_path, capfd):
    experiment = tmp_path / "killed"
    outcomes = run_sweep(parse_sweep(kill_sweep(experiment)), "local", max_workers=2, progress=False)
    check_only_the_killed_run_failed(experiment, outcomes)
    assert "signal 9 / SIGKILL" in outcomes[-1].error_line and "each of its 2 attempts" in outcomes[-1].error_line
    err = capfd.readouterr().err
    assert "running it again on a fresh worker" in err and "recorded as failed, the sweep goes on" in err


def test_driver_store_mode_ships_rows_back(reference, tmp_path):
    # what the ray backend does on a multi-node cluster, exercised here in-process
    experiment = tmp_path / "driver"
    data = toy_sweep(experiment)
    data["runs"].append({"benchmark": "toy", "seeds": [0], "set": {**TINY_TOY, "lr": 1e4}})
    outcomes = run_sweep(parse_sweep(data), "sequential", store_mode="driver", progress=False)
    assert [o.status for o in outcomes] == ["finished"] * 4 + ["failed"]
    assert rows_by_run(experiment) == reference
    with ResultStore(experiment) as store:
        runs = store.runs()
    assert sorted(runs["status"]) == ["failed"] + ["finished"] * 4
    assert "DivergedError" in runs.loc[runs["status"] == "failed", "error"].iloc[0]
    assert [o.status for o in run_sweep(parse_sweep(data), "sequential", store_mode="driver", progress=False)] == [
        "skipped"] * 4 + ["failed"]


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_then_restart_resumes_to_the_clean_rows(reference, tmp_path):
    experiment = tmp_path / "interrupted"
    # step_sleep makes each run last ~2 s; it does not change the rows (only the run ids)
    data = toy_sweep(experiment, extra={"step_sleep": 0.1})
    data["checkpoint_every"] = 4
    sweep_file = tmp_path / "sweep.yaml"
    import yaml

    sweep_file.write_text(yaml.safe_dump(data))
    command = [sys.executable, "-m", "lopkit.runner.sweep_cli", str(sweep_file), "--backend", "local",
               "--max-workers", "2", "--no-progress"]
    # SIGINT as in a terminal: a pytest started in the background by a non-interactive shell ignores SIGINT, and
    # a child inherits that, so without the reset its Python would never raise KeyboardInterrupt
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               preexec_fn=_default_sigint)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:  # until one run finished and one is mid-way
        if (experiment / "results.sqlite").exists():
            with ResultStore(experiment) as store:
                runs = store.runs()
            total = runs["total_steps"].astype(float).fillna(0)
            mid_way = (runs["status"] == "running") & (runs["step"] > 0) & (2 * runs["step"] <= total)
            if (runs["status"] == "finished").any() and mid_way.any():
                break
        time.sleep(0.1)
    if process.poll() is not None:
        pytest.fail(f"the sweep ended before a run was caught mid-way:\n{process.communicate()[0].decode()}")
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in a terminal signals the foreground process group
    output = process.communicate(timeout=120)[0].decode()
    assert process.returncode == 130, output
    before = statuses(experiment)
    finished_before = {k for k, v in before.items() if v == "finished"}
    assert 1 <= len(finished_before) < 4, before
    with ResultStore(experiment) as store:
        runs = store.runs()
    assert (runs.loc[runs["status"] != "finished", "step"] > 0).any(), "no run was caught mid-way"

    outcomes = run_sweep(load_sweep(sweep_file), "local", max_workers=2, progress=False)
    by_key = {(o.spec.method_label, o.spec.seed): o.status for o in outcomes}
    assert {k for k, v in by_key.items() if v == "skipped"} == finished_before
    assert set(by_key.values()) <= {"skipped", "finished"}
    assert rows_by_run(experiment) == reference


@pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install 'lopkit[ray]')")
def test_ray_backend_on_a_local_two_cpu_ray(reference, tmp_path, capfd):
    import ray

    assert not ray.is_initialized()
    experiment = tmp_path / "ray"
    # pytest's file-descriptor capture, inherited by Ray's processes, slows Ray start-up from ~15 s to ~215 s here
    with capfd.disabled():
        outcomes = run_sweep(parse_sweep(toy_sweep(experiment)), "ray", num_cpus=2, progress=False)
    assert [o.status for o in outcomes] == ["finished"] * 4, format_summary(outcomes)
    assert rows_by_run(experiment) == reference
    assert not ray.is_initialized()  # the sweep shut down the Ray it started


@pytest.mark.slow
@pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install 'lopkit[ray]')")
def test_ray_sweep_survives_a_worker_killed_by_sigkill(kill_benchmark, tmp_path, capfd, monkeypatch):
    import ray

    assert not ray.is_initialized()
    tests_dir = str(Path(__file__).resolve().parent)  # Ray's workers import sweep_faults from here
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in [tests_dir, os.environ.get("PYTHONPATH", "")] if p))
    experiment = tmp_path / "ray_killed"
    with capfd.disabled():  # see test_ray_backend_on_a_local_two_cpu_ray
        outcomes = run_sweep(parse_sweep(kill_sweep(experiment)), "ray", num_cpus=2, progress=False)
    check_only_the_killed_run_failed(experiment, outcomes)
    assert "the Ray worker crashed or was killed" in outcomes[-1].error_line
    assert not ray.is_initialized()


def test_ray_missing_gives_the_install_hint(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(RuntimeError, match=r"pip install 'lopkit\[ray\]'"):
        run_sweep(parse_sweep(toy_sweep(tmp_path)), "ray", progress=False)


# ------------------------------------------------------------------------------------------------ fast path


def test_vectorised_bitflip_seeds_write_the_rows_of_separate_runs(tmp_path):
    overrides = {"width": 8, "num_steps": 600, "flip_period": 200, "bin_size": 100, "monitor_every": 300,
                 "block_size": 256}
    data = {"experiment": str(tmp_path / "vec"), "preset": "smoke", "seeds": 3, "vectorize_seeds": True,
            "runs": [{"benchmark": "bitflip", "set": overrides}]}
    outcomes = run_sweep(parse_sweep(data), "sequential", progress=False)
    assert [o.status for o in outcomes] == ["finished"] * 3
    rows = rows_by_run(tmp_path / "vec")
    config = BitFlipBenchmark.make_config("smoke", overrides)
    for seed in range(3):
        direct = BitFlipBenchmark(config, seed).run(config.num_steps)
        stored = rows[("bitflip", "sgd", seed)]
        assert [(r["step"], r["task"], r["layer"], r["metric"]) for r in direct] == [s[:4] for s in stored]
        for r, s in zip(direct, stored):
            if math.isnan(r["value"]):
                assert s[4] == "nan"
            else:
                assert math.isclose(r["value"], s[4], rel_tol=1e-4, abs_tol=1e-6), (r, s)
    # the same runs are "finished" for a non-vectorised rerun (same run ids as separate runs)
    data["vectorize_seeds"] = False
    assert [o.status for o in run_sweep(parse_sweep(data), "sequential", progress=False)] == ["skipped"] * 3


def test_example_sweeps_are_valid():
    root = Path(__file__).resolve().parents[1] / "examples" / "sweeps"
    files = sorted(root.glob("*.yaml"))
    assert len(files) >= 2
    for path in files:
        assert load_sweep(path).runs, path
