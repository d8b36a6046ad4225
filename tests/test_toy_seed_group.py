"""Toy runs (seeds, an lr grid) trained as one ToySeedGroup: rows, states and store equal separate runs."""

from __future__ import annotations

import io
import math

import pytest
import torch

from lopkit.benchmarks.toy import ToyBenchmark, ToySeedGroup, toy_refusal
from lopkit.mitigations.registry import get_method
from lopkit.runner.execute import execute_run
from lopkit.runner.store import ResultStore
from lopkit.runner.vectorised import execute_group, vectorisation_refusal

SEEDS = [0, 3, 5]


def _config(**overrides):
    return ToyBenchmark.make_config("smoke", {"log_every": 7, **overrides})


def _assert_rows_close(expected, actual, rel=1e-5, abs_tol=1e-7):
    """Same rows in the same order; values equal within float32 rounding of another summation order."""
    assert len(actual) == len(expected)
    for want, got in zip(expected, actual):
        assert (got["step"], got["task"], got["layer"], got["metric"]) == (
            want["step"], want["task"], want["layer"], want["metric"])  # fmt: skip
        assert math.isclose(got["value"], want["value"], rel_tol=rel, abs_tol=abs_tol), (want, got)


def test_refusals_name_what_is_not_vectorised():
    plain = _config()
    assert toy_refusal([plain, plain]) is None
    assert toy_refusal([plain, _config(lr=0.01)]) is None  # an lr grid shares every shape
    assert toy_refusal([plain, plain], [get_method("sgd")] if get_method("sgd") else []) is None
    assert "differ in width" in toy_refusal([plain, _config(width=8)])
    assert "method l2" in toy_refusal([plain, plain], [get_method("l2")])
    assert vectorisation_refusal("toy", [plain, plain]) is None
    assert vectorisation_refusal("toy", [plain]) == "a single run"
    with pytest.raises(ValueError, match="cannot vectorise.*differ in num_tasks"):
        ToySeedGroup(ToyBenchmark, [(plain, 0), (_config(num_tasks=2), 1)])


def test_rows_and_weights_equal_separate_runs_in_any_pieces():
    config = _config()
    group = ToySeedGroup(ToyBenchmark, [(config, seed) for seed in SEEDS])
    rows = group.run(45)  # ends inside task 1, mid-bin
    for member, more in zip(rows, group.run(10**6)):
        member += more
    assert group.done and group.run(5) == [[], [], []]
    finals = set()
    for seed, member_rows, bench in zip(SEEDS, rows, group.benchmarks):
        separate = ToyBenchmark(config, seed)
        _assert_rows_close(separate.run(separate.total_steps), member_rows)
        for p, q in zip(bench.model.parameters(), separate.model.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(bench.data_generator.get_state(), separate.data_generator.get_state())
        assert {r["metric"] for r in member_rows} == {"loss", "task_final_loss"}
        finals.add(member_rows[-1]["value"])
    assert len(finals) == len(SEEDS)  # really different seeds


def test_lr_grid_rows_equal_separate_runs():
    members = [(_config(lr=lr), seed) for lr, seed in ((0.05, 0), (0.02, 0), (0.1, 1))]
    group = ToySeedGroup(ToyBenchmark, members)
    rows = group.run(10**6)
    for (config, seed), member_rows in zip(members, rows):
        separate = ToyBenchmark(config, seed)
        _assert_rows_close(separate.run(separate.total_steps), member_rows)
    assert rows[0][-1]["value"] != rows[1][-1]["value"]  # same seed, other lr: trained differently


def _reloaded(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_checkpoints_interchange_with_separate_runs():
    config = _config()
    expected = {seed: ToyBenchmark(config, seed).run(10**6) for seed in SEEDS}
    group = ToySeedGroup(ToyBenchmark, [(config, seed) for seed in SEEDS])
    heads = group.run(53)
    for seed, head, state in zip(SEEDS, heads, group.state_dicts()):  # group -> separate runs
        alone = ToyBenchmark(config, seed)
        alone.load_state_dict(_reloaded(state))
        _assert_rows_close(expected[seed], head + alone.run(10**6))
    runs = [ToyBenchmark(config, seed) for seed in SEEDS]  # separate runs -> group
    heads = [run.run(31) for run in runs]
    group = ToySeedGroup(ToyBenchmark, [(config, seed) for seed in SEEDS])
    group.load_state_dicts([_reloaded(run.state_dict()) for run in runs])
    assert group.step == 31
    for seed, head, tail in zip(SEEDS, heads, group.run(10**6)):
        _assert_rows_close(expected[seed], head + tail)
    ahead = ToyBenchmark(config, 9)
    ahead.run(5)
    with pytest.raises(ValueError, match="different steps"):
        group.load_state_dicts([runs[0].state_dict(), runs[1].state_dict(), ahead.state_dict()])


def _store_rows(store, run_id):
    frame = store.metrics(run_id=run_id)
    return [{"step": int(r.step), "task": int(r.task), "layer": r.layer, "metric": r.metric, "value": float(r.value)}
            for r in frame.itertuples(index=False)]


def test_execute_group_resumes_paused_runs_and_stores_the_separate_runs_rows(tmp_path):
    config = _config()
    reference, store = ResultStore(tmp_path / "reference"), ResultStore(tmp_path / "store")
    expected = {seed: execute_run(reference, "toy", config, seed, progress="never") for seed in SEEDS}
    for seed in SEEDS:  # paused separate runs at one step resume as one group
        assert execute_run(store, "toy", config, seed, progress="never", stop_after_steps=40).status == "paused"
    lines: list[str] = []
    results = execute_group(store, "toy", [(config, seed) for seed in SEEDS], checkpoint_every=25,
                            progress="never", log=lines.append)
    assert lines == [] and [(r.status, r.resumed_from) for r in results] == [("finished", 40)] * 3
    for seed, result in zip(SEEDS, results):
        assert result.run_id == expected[seed].run_id
        _assert_rows_close(_store_rows(reference, result.run_id), _store_rows(store, result.run_id))
    # a member that diverges fails alone, as its separate run fails; the other finishes
    bad = _config(lr=1e6)
    results = execute_group(store, "toy", [(config, 7), (bad, 7)], progress="never", log=lines.append)
    assert len(lines) == 1 and "DivergedError" in lines[0]
    assert [r.status for r in results] == ["finished", "failed"]


def test_lopkit_run_toy_seeds_is_vectorised(tmp_path, capsys):
    from lopkit.cli import main

    common = ["--preset", "smoke", "--threads", "1", "--no-progress", "--out", str(tmp_path / "a")]
    assert main(["run", "toy", "--seeds", "3", *common]) == 0
    out = capsys.readouterr().out
    assert "vectorised: 3 seeds trained as one learner in this process" in out
    assert out.count(": finished at step 120/120") == 3
    assert main(["run", "toy", "--seeds", "2", "--method", "l2", *common]) == 0
    assert "separate runs: method l2 is not vectorised for toy" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_group_on_cuda_equals_separate_cuda_runs():
    config = _config(device="cuda")
    group = ToySeedGroup(ToyBenchmark, [(config, seed) for seed in SEEDS])
    assert all(p.is_cuda for p in group.params.values())
    for seed, member_rows in zip(SEEDS, group.run(10**6)):
        separate = ToyBenchmark(config, seed)
        _assert_rows_close(separate.run(separate.total_steps), member_rows, rel=1e-4, abs_tol=1e-6)
