"""Cloning runs (seeds, an lr grid) trained as one CloningSeedGroup: rows, states and store equal separate runs."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from lopkit.benchmarks.cloning import CloningBenchmark, CloningSeedGroup, cloning_refusal
from lopkit.mitigations.registry import get_method
from lopkit.runner.execute import execute_run
from lopkit.runner.store import ResultStore
from lopkit.runner.vectorised import execute_group, vectorisation_refusal

SEEDS = [0, 3]
# digits (no download), cloning at step 30 (inside the second piece of the tests' runs), a log every 10 steps
SMALL = {"dataset": "digits", "base_steps": 30, "paired_steps": 40, "log_every": 10, "probe_size": 100,
         "train_size": 600}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _config(**overrides):
    return CloningBenchmark.make_config("smoke", {**SMALL, **overrides})


def _assert_rows_close(expected, actual, rel=1e-5, abs_tol=1e-6):
    """Same rows in the same order; values equal within float32 rounding of another summation order."""
    assert len(actual) == len(expected)
    for want, got in zip(expected, actual):
        assert (got["step"], got["task"], got["layer"], got["metric"]) == (
            want["step"], want["task"], want["layer"], want["metric"])  # fmt: skip
        if math.isnan(want["value"]):
            assert math.isnan(got["value"]), (want, got)
        else:
            assert math.isclose(got["value"], want["value"], rel_tol=rel, abs_tol=abs_tol), (want, got)


def test_refusals_name_what_is_not_vectorised():
    plain = _config()
    assert cloning_refusal([plain, plain]) is None
    assert cloning_refusal([plain, _config(lr=0.05)]) is None  # an lr grid
    assert "model=resnet" in cloning_refusal([_config(model="resnet")])
    assert "variant=dropout" in cloning_refusal([_config(variant="dropout")])
    assert "variant=noisy_sgd" in cloning_refusal([_config(variant="noisy_sgd")])
    assert "adam with norm=batch" in cloning_refusal([_config(variant="adam")])
    assert cloning_refusal([_config(variant="adam", norm="layer")]) is None
    assert "differ in hidden" in cloning_refusal([plain, _config(hidden=(16, 8))])
    assert "method l2" in cloning_refusal([plain, plain], [get_method("l2")])
    assert vectorisation_refusal("cloning", [plain, plain]) is None
    with pytest.raises(ValueError, match="cannot vectorise.*variant=dropout"):
        CloningSeedGroup(CloningBenchmark, [(_config(variant="dropout"), 0), (_config(variant="dropout"), 1)])


CASES = {
    "sgd momentum batchnorm": {"momentum": 0.9},
    "adam layernorm": {"variant": "adam", "norm": "layer"},
    "sgd no norm r2 every 20": {"norm": "none", "r2_every": 20, "r2_definition": "variance_ratio"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_rows_and_weights_equal_separate_runs_in_any_pieces(case):
    config = _config(**CASES[case])
    group = CloningSeedGroup(CloningBenchmark, [(config, seed) for seed in SEEDS])
    rows = group.run(23)  # the bases alone; the clones are made inside the second piece
    for member, more in zip(rows, group.run(10**6)):
        member += more
    assert group.done and group.run(5) == [[], []]
    for seed, member_rows, bench in zip(SEEDS, rows, group.benchmarks):
        separate = CloningBenchmark(config, seed)
        _assert_rows_close(separate.run(separate.total_steps), member_rows)
        for model, alone in ((bench.base, separate.base), (bench.clone, separate.clone)):
            for (name, p), q in zip(model.state_dict().items(), alone.state_dict().values()):
                torch.testing.assert_close(p.double(), q.double(), rtol=1e-4, atol=1e-5, msg=name)
        assert {"clone_loss", "cloning_r2_variance_ratio_forward"} <= {r["metric"] for r in member_rows}
    losses = [[r["value"] for r in member if r["metric"] == "clone_loss"] for member in rows]
    assert losses[0] != losses[1]  # really different seeds


def test_lr_grid_rows_equal_separate_runs():
    members = [(_config(lr=lr, momentum=0.9), seed) for lr, seed in ((0.01, 0), (0.03, 0), (0.02, 3))]
    group = CloningSeedGroup(CloningBenchmark, members)
    rows = group.run(10**6)
    for (config, seed), member_rows in zip(members, rows):
        separate = CloningBenchmark(config, seed)
        _assert_rows_close(separate.run(separate.total_steps), member_rows)


def _reloaded(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("variant", ["sgd", "adam"])
def test_checkpoints_interchange_with_separate_runs(variant):
    config = _config(variant=variant, momentum=0.9, norm="layer")
    expected = {seed: CloningBenchmark(config, seed).run(10**6) for seed in SEEDS}
    for pause in (17, 45):  # before and after the cloning step
        group = CloningSeedGroup(CloningBenchmark, [(config, seed) for seed in SEEDS])
        heads = group.run(pause)
        for seed, head, state in zip(SEEDS, heads, group.state_dicts()):  # group -> separate runs
            alone = CloningBenchmark(config, seed)
            alone.load_state_dict(_reloaded(state))
            _assert_rows_close(expected[seed], head + alone.run(10**6))
        runs = [CloningBenchmark(config, seed) for seed in SEEDS]  # separate runs -> group
        heads = [run.run(pause) for run in runs]
        group = CloningSeedGroup(CloningBenchmark, [(config, seed) for seed in SEEDS])
        group.load_state_dicts([_reloaded(run.state_dict()) for run in runs])
        assert group.step == pause
        for seed, head, tail in zip(SEEDS, heads, group.run(10**6)):
            _assert_rows_close(expected[seed], head + tail)


def _store_rows(store, run_id):
    frame = store.metrics(run_id=run_id)
    return [{"step": int(r.step), "task": int(r.task), "layer": r.layer, "metric": r.metric, "value": float(r.value)}
            for r in frame.itertuples(index=False)]


def test_execute_group_stores_the_separate_runs_rows(tmp_path):
    config = _config(momentum=0.9)
    reference, store = ResultStore(tmp_path / "reference"), ResultStore(tmp_path / "store")
    expected = {seed: execute_run(reference, "cloning", config, seed, progress="never") for seed in SEEDS}
    lines: list[str] = []
    results = execute_group(store, "cloning", [(config, seed) for seed in SEEDS], checkpoint_every=25,
                            progress="never", log=lines.append)
    assert lines == [] and [r.status for r in results] == ["finished"] * 2
    for seed, result in zip(SEEDS, results):
        assert result.run_id == expected[seed].run_id
        _assert_rows_close(_store_rows(reference, result.run_id), _store_rows(store, result.run_id))
