"""One method-spec grammar (with aliases) and one seeds grammar, shared by run, compare, sweep and the seed systems."""

from __future__ import annotations

import argparse

import pytest

from lopkit.cli import main
from lopkit.configs import ConfigError
from lopkit.mitigations.perturbation import ShrinkPerturb
from lopkit.mitigations.registry import (
    METHOD_ALIASES,
    available_methods,
    build_methods,
    canonical_spec,
    get_method,
    parse_method_spec,
    split_method_specs,
)
from lopkit.runner.cli import resolve_seeds
from lopkit.runner.cli_common import parse_seeds
from lopkit.runner.compare import build_plan, parse_method_list
from lopkit.runner.execute import method_label, split_method_names
from lopkit.runner.store import ResultStore

TINY = ["--set", "num_tasks=2", "steps_per_task=6", "log_every=3", "width=4", "batch_size=2", "probe_size=8"]
TINY_DICT = {"num_tasks": 2, "steps_per_task": 6, "log_every": 3, "width": 4, "batch_size": 2, "probe_size": 8}


# ----------------------------------------------------------------------------------------------- methods


def test_split_method_specs_resolves_aliases_and_keeps_exponents():
    assert split_method_specs(["CBP:replacement_rate=1e+4, SNP:sigma=0.1", "l2_init+ln"]) == [
        "cbp:replacement_rate=1e+4", "shrink_perturb:sigma=0.1", "l2init", "layernorm"]
    assert split_method_specs(None) == [] and split_method_specs(" , + ") == []
    assert canonical_spec(" Shrink_And_Perturb : sigma=0.1") == "shrink_perturb:sigma=0.1"
    with pytest.raises(ConfigError, match="must be strings"):
        split_method_specs([3])


def test_every_alias_points_to_a_registered_method():
    registered = set(available_methods())
    assert {target for target in METHOD_ALIASES.values()} <= registered
    assert not set(METHOD_ALIASES) & registered  # an alias never hides a registered name


def test_aliases_build_the_registered_method():
    assert isinstance(get_method("SNP"), ShrinkPerturb)
    assert [name for name, _ in parse_method_spec("snp,cbp+l2_init")] == ["shrink_perturb", "cbp", "l2init"]
    assert type(build_methods("snp")) is ShrinkPerturb
    with pytest.raises(ConfigError, match="unknown method 'nosuch'"):
        build_methods("snp,nosuch")


def test_runner_uses_the_registry_grammar():
    assert split_method_names("snp+l2_init") == ["shrink_perturb", "l2init"]
    assert method_label(["snp"]) == method_label("shrink_perturb") == "shrink_perturb"
    entries = parse_method_list("sgd,snp:sigma=0.01,cbp:replacement_rate=1e+4+l2init")
    assert [e.specs for e in entries] == [(), ("shrink_perturb:sigma=0.01",), ("cbp:replacement_rate=1e+4", "l2init")]


def test_run_accepts_an_alias_and_stores_the_same_run_as_compare(capsys, tmp_path):
    out = tmp_path / "exp"
    code = main(["run", "toy", "--preset", "smoke", "--seeds", "1", *TINY, "--method", "snp", "--out", str(out),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    with ResultStore(out) as store:
        runs = store.runs()
    assert runs["method"].tolist() == ["shrink_perturb"]
    plan = build_plan("toy", "snp", 1, "smoke", TINY_DICT)
    assert plan.run_ids == runs["run_id"].tolist()


def test_run_rejects_a_bad_alias_hyper_parameter_with_one_line(capsys, tmp_path):
    code = main(["run", "toy", "--method", "snp:nosuchparam=1", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "nosuchparam" in err


def test_kws_continual_rejects_an_unknown_method_before_any_stage(capsys, tmp_path):
    code = main(["kws", "continual", "--preset", "smoke", "--out", str(tmp_path / "kws"), "--method", "nosuch"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown method 'nosuch'" in err and not (tmp_path / "kws").exists()


# ------------------------------------------------------------------------------------------------- seeds


@pytest.mark.parametrize(("value", "expected"), [
    (3, [0, 1, 2]), ("3", [0, 1, 2]), ("4,7", [4, 7]), ("10-12", [10, 11, 12]), ("0-2,7", [0, 1, 2, 7]),
    ([5, 1], [5, 1]), (" 2 , 9 ", [2, 9]),
])
def test_parse_seeds_grammar(value, expected):
    assert parse_seeds(value) == expected


@pytest.mark.parametrize(("value", "message"), [
    ("0", "--seeds must be >= 1"), (0, "must be >= 1"), ("1,1", "distinct"), ("0-2,1", "distinct"),
    ("a-b", "comma-separated integers"), ("x", "comma-separated integers"), ("", "gives no seed"),
    ("5-3", "gives no seed"), ("1,-2", "non-negative"), (True, "expects a count"), ([1, True], "non-negative integers"),
    (2.5, "expects a count"),
])
def test_parse_seeds_errors_name_the_option(value, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_seeds(value, "--seeds")
    assert "--seeds" in str(info.value)


def test_seed_list_reads_a_lone_integer_as_one_seed():
    assert parse_seeds("3", "--seed-list", single_is_count=False) == [3]
    assert resolve_seeds(None, "3", 10) == [13]
    assert resolve_seeds("0-2", None, 10) == [10, 11, 12]
    assert resolve_seeds(None, None, 0) == [0, 1, 2, 3, 4]


def test_run_accepts_a_seed_range(capsys, tmp_path):
    out = tmp_path / "exp"
    code = main(["run", "toy", "--preset", "smoke", "--seeds", "2-3", *TINY, "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    with ResultStore(out) as store:
        assert sorted(store.runs()["seed"]) == [2, 3]


def test_moe_cli_reads_the_same_seeds_grammar():
    from lopkit.moe.cli import _seeds

    assert _seeds(argparse.Namespace(seeds="1-3", seed_list=None)) == [1, 2, 3]
    assert _seeds(argparse.Namespace(seeds="2", seed_list=None)) == [0, 1]
    assert _seeds(argparse.Namespace(seeds="1", seed_list="4")) == [4]
    with pytest.raises(ConfigError, match="--seeds must be >= 1"):
        _seeds(argparse.Namespace(seeds="0", seed_list=None))


def test_sweep_file_seeds_use_the_same_grammar(tmp_path):
    from lopkit.runner.sweep import SweepError, parse_sweep

    data = {"experiment": str(tmp_path), "preset": "smoke", "seeds": "0-2",
            "runs": [{"benchmark": "toy", "methods": ["snp"], "set": TINY_DICT, "seeds": "4,6"}]}
    sweep = parse_sweep(data)
    assert sorted(spec.seed for spec in sweep.runs) == [4, 6]
    assert {spec.method_label for spec in sweep.runs} == {"shrink_perturb"}
    data["runs"][0]["seeds"] = "1,1"
    with pytest.raises(SweepError, match="seeds must be distinct"):
        parse_sweep(data)


def test_list_shows_the_aliases(capsys):
    assert main(["list", "toy"]) == 0
    out = capsys.readouterr().out
    assert "snp=shrink_perturb" in out and "shrink_perturb" in out.split("methods (")[1].splitlines()[0]
