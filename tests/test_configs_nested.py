"""Nested typed config keys (``monitor.every=500``, ``optim.lr=0.01``): same validation and error style as flat keys."""

from __future__ import annotations

import json

import pytest

from lopkit.benchmarks.registry import get_benchmark
from lopkit.cli import main
from lopkit.configs import ConfigError, config_to_dict, nested_keys, resolve_key
from lopkit.runner.store import ResultStore
from lopkit.runner.sweep import SweepError, parse_sweep


def test_dotted_keys_set_the_same_fields_as_flat_keys():
    cls = get_benchmark("class_split")
    dotted = cls.make_config("smoke", {"monitor.every": "7", "optim.lr": "0.2", "optim.name": "adam",
                                       "optim.reset": "true", "monitor.enabled": "false"})
    flat = cls.make_config("smoke", {"monitor_every": "7", "lr": "0.2", "optimizer": "adam",
                                     "reset_optimizer": "true", "monitor": "false"})
    assert config_to_dict(dotted) == config_to_dict(flat)
    assert (dotted.monitor_every, dotted.lr, dotted.optimizer, dotted.monitor) == (7, 0.2, "adam", False)


def test_groups_follow_the_config_fields():
    assert nested_keys(get_benchmark("toy").Config) == {"optim.lr": "lr"}
    bitflip = nested_keys(get_benchmark("bitflip").Config)
    assert bitflip["monitor.every"] == "monitor_every" and "monitor.enabled" not in bitflip
    assert resolve_key(get_benchmark("class_split").Config, "optim.weight_decay") == "weight_decay"


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"monitor.evry": 3}, "unknown config key 'monitor.evry' for ClassSplitConfig. Did you mean monitor.every?"),
    ({"optim.lrr": 3}, "Did you mean optim.lr?"),
    ({"optimizer.lr": 3}, "no group 'optimizer'; its groups are monitor, optim"),
    ({"optim.lr": "fast"}, "optim.lr: expected a number, got 'fast'"),
    ({"monitor.every": 1.5}, "monitor.every: expected int"),
    ({"lr": 0.1, "optim.lr": 0.2}, "lr and optim.lr both set ClassSplitConfig.lr; give only one of them"),
    ({"optim.lr": -1.0}, "lr"),  # the config's own validation still runs
])
def test_bad_dotted_keys_say_what_is_wrong(overrides, expected):
    with pytest.raises(ConfigError) as info:
        get_benchmark("class_split").make_config("smoke", overrides)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_flat_only_config_names_its_groups():
    with pytest.raises(ConfigError, match="no group 'monitor'; its groups are optim"):
        get_benchmark("toy").make_config("smoke", {"monitor.every": 3})


@pytest.mark.parametrize(("pair", "expected"), [
    ("optim.lrr=1", "Did you mean optim.lr?"),
    ("monitor.every=2", "no group 'monitor'"),
    ("optim.lr=fast", "optim.lr: expected a number"),
])
def test_cli_gives_one_error_line_for_a_bad_dotted_key(capsys, tmp_path, pair, expected):
    out = tmp_path / "exp"
    code = main(["run", "toy", "--set", pair, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert not out.exists()


def test_cli_runs_with_a_dotted_key(capsys, tmp_path):
    out = tmp_path / "exp"
    code = main(["run", "toy", "--preset", "smoke", "--seeds", "1", "--set", "optim.lr=0.03", "num_tasks=1",
                 "steps_per_task=4", "log_every=2", "width=4", "batch_size=2", "probe_size=8", "--out", str(out),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    with ResultStore(out) as store:
        configs = [json.loads(text) for text in store.runs()["config_json"]]
    assert [c["lr"] for c in configs] == [0.03] and "optim.lr" not in configs[0]  # stored flat, as before


def test_sweeps_take_dotted_keys_and_report_bad_ones(tmp_path):
    good = parse_sweep({"experiment": str(tmp_path / "a"), "preset": "smoke",
                        "runs": [{"benchmark": "class_split", "set": {"monitor.every": 5},
                                  "grid": {"optim.lr": [0.1, 0.2]}}]})
    assert sorted(spec.make_config().lr for spec in good.runs) == [0.1, 0.2]
    assert {spec.make_config().monitor_every for spec in good.runs} == {5}
    with pytest.raises(SweepError) as info:
        parse_sweep({"experiment": str(tmp_path / "b"), "preset": "smoke",
                     "runs": [{"benchmark": "class_split", "set": {"monitor.evry": 5, "optim.lr": "x"}}]})
    text = "\n".join(info.value.problems)
    assert "runs[0] (class_split).set.monitor.evry: unknown config key 'monitor.evry'" in text
    assert "runs[0] (class_split).set.optim.lr: optim.lr: expected a number" in text
