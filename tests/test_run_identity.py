"""Run ids survive config fields added later: a store written before a field existed keeps its ids and resumes."""

from __future__ import annotations

import dataclasses

import pytest

from lopkit.benchmarks.base import BenchmarkConfig, get_benchmark
from lopkit.benchmarks.registry import benchmark_names
from lopkit.configs import config_to_dict, run_identity
from lopkit.runner.execute import execute_run
from lopkit.runner.store import ResultStore, make_run_id, run_id_candidates


def _config_classes() -> list[type[BenchmarkConfig]]:
    """The config class of every registered benchmark (plug-ins included)."""
    return [get_benchmark(name).Config for name in benchmark_names()]


@pytest.mark.parametrize("config_cls", _config_classes(), ids=lambda c: c.__name__)
def test_neutral_fields_are_real_fields_with_defaults(config_cls):
    """A name in run_id_neutral that is not a field with a default would silently keep it in the id."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for name in config_cls.run_id_neutral:
        assert name in fields, f"{config_cls.__name__}.run_id_neutral names {name!r}, which is not a field"
        assert fields[name].default is not dataclasses.MISSING, f"{config_cls.__name__}.{name} has no plain default"


def test_typed_config_hashes_like_a_store_written_before_the_field():
    """bitflip's ``device`` and ``flip_mode`` came later: a stored config without them has the same id."""
    bench = get_benchmark("bitflip")
    config = bench.make_config("smoke")
    older = {k: v for k, v in config_to_dict(config).items() if k not in ("device", "flip_mode")}
    assert make_run_id("bitflip", "sgd", config, 0) == make_run_id("bitflip", "sgd", older, 0)
    assert "device" not in run_identity(config) and "width" in run_identity(config)


def test_a_non_default_value_of_a_neutral_field_changes_the_id():
    bench = get_benchmark("bitflip")
    config = bench.make_config("smoke")
    other = bench.make_config("smoke", {"flip_mode": "redraw"})
    assert make_run_id("bitflip", "sgd", other, 0) != make_run_id("bitflip", "sgd", config, 0)
    assert run_identity(other)["flip_mode"] == "redraw"


def test_ordinary_fields_stay_in_the_id():
    bench = get_benchmark("bitflip")
    config = bench.make_config("smoke")
    assert make_run_id("bitflip", "sgd", bench.make_config("smoke", {"lr": 0.02}), 0) != make_run_id(
        "bitflip", "sgd", config, 0)


def test_a_run_stored_before_the_field_existed_is_skipped_not_rerun(tmp_path):
    """End to end: finish a run, rewrite its stored config as an older lopkit wrote it, run again: skipped."""
    bench = get_benchmark("toy")
    config = bench.make_config("smoke")
    with ResultStore(tmp_path) as store:
        first = execute_run(store, bench, config, 0, progress="never")
        assert first.status == "finished"
        older = {k: v for k, v in config_to_dict(config).items() if k not in type(config).run_id_neutral}
        legacy_id = make_run_id(bench.name, "sgd", older, 0)
        assert legacy_id == first.run_id  # what an older lopkit computed is what this one computes
        again = execute_run(store, bench, config, 0, progress="never")
        assert again.status == "skipped" and again.run_id == first.run_id


def test_a_store_written_while_the_field_was_hashed_resumes_too(tmp_path):
    """Runs stored with every field in the id (lopkit of early Dec 2026) are found and skipped, not rerun."""
    bench = get_benchmark("bitflip")
    config = bench.make_config("smoke", {"num_steps": 500, "monitor_every": 0, "bin_size": 250})
    full_id = make_run_id(bench.name, "sgd", config_to_dict(config), 0)  # the old scheme: all fields hashed
    assert full_id != make_run_id(bench.name, "sgd", config, 0)
    assert full_id in run_id_candidates(bench.name, "sgd", config, 0)
    with ResultStore(tmp_path) as store:
        store.start_run(bench.name, "sgd", config_to_dict(config), 0, run_id=full_id)
        store.set_total_steps(full_id, 500)
        store.commit_chunk(full_id, [], None, 500)
        store.finish_run(full_id)
        assert store.resolve_run_id(bench.name, "sgd", config, 0) == full_id
        again = execute_run(store, bench, config, 0, progress="never")
        assert again.status == "skipped" and again.run_id == full_id
        assert len(store.runs()) == 1
        other_seed = execute_run(store, bench, config, 1, progress="never")  # a new run gets the current id
        assert other_seed.run_id == make_run_id(bench.name, "sgd", config, 1)
