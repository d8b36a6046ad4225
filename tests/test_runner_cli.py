"""``lopkit run`` / ``lopkit list``: exit codes, one-line errors, stored config, seeds and help text (in-process)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lopkit.benchmarks.toy import ToyBenchmark, ToyConfig
from lopkit.cli import main
from lopkit.configs import ConfigError, config_to_dict
from lopkit.runner.cli import field_docs, resolve_seeds
from lopkit.runner.store import ResultStore

TINY = ["--set", "num_tasks=2", "steps_per_task=6", "log_every=3", "width=4", "batch_size=2", "probe_size=8"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Call ``lopkit ARGS`` in this process; return (exit code, stdout, stderr)."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["toy", "--set", "bogus_key=1"], "unknown config key 'bogus_key'"),
        (["toy", "--set", "width=abc"], "width: expected an integer, got 'abc'"),
        (["toy", "--set", "lr=fast"], "lr: expected a number"),
        (["toy", "--set", "width=0"], "width must be >= 1"),
        (["toy", "--set", "lr=-1"], "lr must be a positive"),
        (["toy", "--set", "width"], "--set expects key=value"),
        (["no_such_benchmark"], "unknown benchmark 'no_such_benchmark'; available:"),
        (["toy", "--preset", "huge"], "no preset 'huge'"),
        (["toy", "--method", "bogus_method"], "bogus_method"),
        (["toy", "--seeds", "0"], "--seeds must be >= 1"),
        (["toy", "--seed-list", "1,1"], "distinct"),
        (["toy", "--seed-list", "a,b"], "comma-separated integers"),
        (["toy", "--seed-offset", "-3"], "--seed-offset must be >= 0"),
        (["toy", "--checkpoint-every", "0"], "--checkpoint-every must be >= 1"),
    ],
)
def test_bad_input_gives_one_error_line_and_exit_2(capsys, tmp_path, args, expected):
    out = tmp_path / "exp"
    code, stdout, stderr = run_cli(capsys, "run", *args, "--out", str(out), "--no-progress")
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0]
    assert "Traceback" not in stderr and stdout == ""
    assert not out.exists()  # nothing is created before the input is valid


def test_unknown_benchmark_error_lists_the_available_ones(capsys, tmp_path):
    code, _, stderr = run_cli(capsys, "run", "nope", "--out", str(tmp_path))
    assert code == 2 and "toy" in stderr


def test_run_stores_the_resolved_config_and_seeds_then_skips(capsys, tmp_path):
    out = tmp_path / "exp"
    code, stdout, stderr = run_cli(capsys, "run", "toy", "--preset", "smoke", "--seeds", "2", "--seed-offset", "3",
                                   *TINY, "lr=0.02", "--out", str(out), "--no-progress")
    assert code == 0, stderr
    assert str(out) in stdout and f"lopkit report {out}" in stdout
    assert stderr == ""  # no progress bar when asked, nothing else on stderr
    store = ResultStore(out)
    runs = store.runs()
    assert runs["seed"].tolist() == [3, 4] and set(runs["status"]) == {"finished"}
    assert set(runs["preset"]) == {"smoke"} and set(runs["method"]) == {"sgd"} and set(runs["benchmark"]) == {"toy"}
    expected = ToyBenchmark.make_config(
        "smoke", {"num_tasks": 2, "steps_per_task": 6, "log_every": 3, "width": 4, "batch_size": 2, "probe_size": 8,
                  "lr": 0.02})
    for text in runs["config_json"]:
        assert json.loads(text) == config_to_dict(expected)
    per_seed = store.metrics().groupby("seed")["metric"].count().to_dict()
    assert per_seed == {3: 6, 4: 6}  # per seed: loss at steps 3, 6, 9, 12 and task_final_loss at 6, 12
    store.close()

    code, stdout, _ = run_cli(capsys, "run", "toy", "--preset", "smoke", "--seed-list", "3,4", *TINY, "lr=0.02",
                              "--out", str(out), "--no-progress")
    assert code == 0 and stdout.count("already finished") == 2


def test_a_diverging_run_exits_1_with_its_error(capsys, tmp_path):
    code, stdout, stderr = run_cli(capsys, "run", "toy", "--seeds", "1", *TINY, "lr=1e6", "--out", str(tmp_path),
                                   "--no-progress")
    assert code == 1
    assert "seed 0: failed" in stdout
    assert stderr.startswith("error: seed 0 failed: toy diverged at step ") and "lower lr (now 1e+06)" in stderr
    store = ResultStore(tmp_path)
    assert store.runs()["status"].tolist() == ["failed"] and "DivergedError" in store.runs()["error"][0]
    store.close()


def test_list_shows_benchmarks_presets_and_field_defaults(capsys):
    code, stdout, _ = run_cli(capsys, "list")
    assert code == 0
    assert "toy: " in stdout and ToyBenchmark.description in stdout
    for preset, values in ToyBenchmark.presets.items():
        assert f"    {preset}: " in stdout
        for key, value in values.items():
            assert f"{key}={value}" in stdout
    for field in dataclasses.fields(ToyConfig):
        assert f"    {field.name}: " in stdout and f"= {field.default!r}" in stdout
    assert "SGD step size." in stdout  # the field's docstring
    assert "methods (" in stdout and "sgd" in stdout
    code, only, _ = run_cli(capsys, "list", "toy")
    assert code == 0 and only.count("presets:") == 1
    code, _, stderr = run_cli(capsys, "list", "nope")
    assert code == 2 and stderr.startswith("error: unknown benchmark 'nope'")


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("BENCHMARK", "--preset", "--seeds N", "--seed-list", "--seed-offset", "--set KEY=VALUE",
                   "--method", "--out DIR", "--checkpoint-every", "--no-progress", "exit codes", "lopkit list"):
        assert option in text, option
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "run" in top and "list" in top


def test_seed_resolution_and_field_docs():
    assert resolve_seeds(None, None, 0) == [0, 1, 2, 3, 4]  # five seeds by default (spec section 8, item 12)
    assert resolve_seeds(3, None, 40) == [40, 41, 42]
    assert resolve_seeds(None, "0,2", 10) == [10, 12]
    with pytest.raises(ConfigError):
        resolve_seeds(None, "", 0)
    docs = field_docs(ToyConfig)
    assert docs["lr"] == "SGD step size." and set(docs) == {f.name for f in dataclasses.fields(ToyConfig)}
