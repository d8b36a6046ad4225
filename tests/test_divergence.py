"""A diverged run is a failure, never a success with NaN rows (issue 12, defect 3)."""

from __future__ import annotations

import math

import pytest
import torch

from lopkit.benchmarks.base import DivergedError, check_finite_loss
from lopkit.benchmarks.registry import benchmark_specs
from lopkit.benchmarks.bitflip import BitFlipBenchmark
from lopkit.benchmarks.toy import ToyBenchmark
from lopkit.cli import main
from lopkit.runner.execute import execute_run
from lopkit.runner.store import ResultStore

HUGE_LR = "1e30"  # overflows float32 within a step or two whatever the optimizer (Adam's step is ~lr)


def core_benchmarks() -> list[str]:
    """Every registered benchmark of the core (the seed systems under lopkit.moe / lopkit.kws excluded)."""
    specs = benchmark_specs()  # name -> "module:Class", without importing the seed systems
    return sorted(n for n, spec in specs.items() if spec.startswith("lopkit.benchmarks."))


def test_the_core_benchmarks_are_the_expected_ones():
    assert {"bitflip", "class_split", "permuted", "random_labels", "cloning", "toy"} <= set(core_benchmarks())


@pytest.mark.parametrize(
    "name, method", [(n, "sgd") for n in core_benchmarks()] + [("bitflip", "l2")]  # l2: bitflip's autograd engine
)
def test_a_huge_lr_fails_the_run_with_one_line_and_stores_no_nan(tmp_path, capsys, name, method):
    torch.set_num_threads(1)
    code = main(["run", name, "--preset", "smoke", "--seeds", "1", "--set", f"lr={HUGE_LR}", "--method", method,
                 "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"{name} diverged at step " in lines[0] and "lower lr (now 1e+30)" in lines[0], err
    store = ResultStore(tmp_path)
    runs = store.runs()
    assert list(runs["status"]) == ["failed"]
    assert "diverged at step" in runs["error"].iloc[0].strip().splitlines()[-1]
    assert not any(math.isinf(v) for v in store.metrics()["value"])
    store.close()


class PoisonedBitFlip(BitFlipBenchmark):
    """Bitflip whose output weights are blown up once step 1200 is passed, so training diverges there."""

    def run(self, n_steps):
        rows = super().run(n_steps)
        if self.step >= 1200:
            with torch.no_grad():
                for param in self.model.parameters():
                    param.fill_(1e30)
        return rows


def test_rows_before_the_divergence_are_kept_and_the_step_is_named(tmp_path):
    config = BitFlipBenchmark.make_config("smoke")
    reference = BitFlipBenchmark(config, 0)
    expected = sorted((r["step"], r["metric"], r["layer"], r["value"]) for r in reference.run(reference.total_steps))
    store = ResultStore(tmp_path)
    result = execute_run(store, PoisonedBitFlip, config, 0, checkpoint_every=250, progress=False, raise_on_error=False)
    assert result.status == "failed"
    diverged_at = int(result.error_line.split("diverged at step ")[1].split(":")[0])
    assert diverged_at >= 1200 and "lower lr" in result.error_line
    run = store.get_run(result.run_id)
    assert run["status"] == "failed" and 1000 <= run["step"] <= diverged_at
    frame = store.metrics()
    got = sorted(zip(frame["step"], frame["metric"], frame["layer"], frame["value"]))
    kept = [r for r in expected if r[0] <= run["step"]]
    assert len(got) == len(kept) and len(kept) > 0
    for a, b in zip(got, kept):
        assert a[:3] == b[:3] and (a[3] == b[3] or (a[3] != a[3] and b[3] != b[3]))
    store.close()


def test_check_finite_loss_names_the_benchmark_step_and_lr():
    check_finite_loss("toy", torch.tensor(1.5), 3, 0.1)
    with pytest.raises(DivergedError, match=r"^toy diverged at step 7 \(task 1\): the training loss became nan; "
                                            r"lower lr \(now 0.1\)") as info:
        check_finite_loss("toy", torch.tensor(float("nan")), 7, 0.1, "task 1")
    assert info.value.step == 7 and isinstance(info.value, FloatingPointError)
    with pytest.raises(DivergedError, match="became inf"):
        check_finite_loss("bitflip", float("inf"), 0)


DIVERGE_AT = 95  # a step of the toy smoke preset (3 tasks x 40 steps, a row every 10 steps)


class PoisonedToy(ToyBenchmark):
    """Toy whose weights are blown up right before step ``DIVERGE_AT``, so that step's loss is infinite."""

    def _train_step(self):
        if self.step == DIVERGE_AT:
            with torch.no_grad():
                for param in self.model.parameters():
                    param.fill_(1e30)
        return super()._train_step()


def _row_keys(rows):
    return sorted((int(r["step"]), int(r["task"]), str(r["layer"]), str(r["metric"]), float(r["value"])) for r in rows)


@pytest.mark.parametrize("checkpoint_every", [1000, 30, 7])  # 1000: nothing committed before the divergence
def test_a_diverged_run_keeps_every_row_up_to_the_divergence_and_resumes_cleanly(tmp_path, checkpoint_every):
    torch.set_num_threads(1)
    config = ToyBenchmark.make_config("smoke")
    reference = ToyBenchmark(config, 0)
    before = _row_keys(reference.run(DIVERGE_AT))  # the rows of the finite steps 0 .. DIVERGE_AT - 1
    assert before and max(r[0] for r in before) < DIVERGE_AT
    with ResultStore(tmp_path) as store:
        result = execute_run(store, PoisonedToy, config, 0, checkpoint_every=checkpoint_every, progress=False,
                             commit_seconds=1e9, raise_on_error=False)
        assert result.status == "failed" and f"toy diverged at step {DIVERGE_AT}" in result.error_line
        run = store.get_run(result.run_id)
        assert run["status"] == "failed" and f"toy diverged at step {DIVERGE_AT}" in run["error"]
        assert run["step"] == DIVERGE_AT and result.step == DIVERGE_AT
        frame = store.metrics(run_id=result.run_id)
        got = _row_keys(dict(zip(frame.columns, values)) for values in frame.itertuples(index=False))
        assert got == before  # every row before the divergence (the last logged one included), nothing more
        # the kept checkpoint is the state at the divergence step: resuming without the poison ends exactly like
        # an uninterrupted run (no row lost, none written twice)
        resumed = execute_run(store, ToyBenchmark, config, 0, checkpoint_every=checkpoint_every, progress=False)
        assert resumed.status == "finished" and resumed.resumed_from == DIVERGE_AT
        frame = store.metrics(run_id=result.run_id)
        got = _row_keys(dict(zip(frame.columns, values)) for values in frame.itertuples(index=False))
    full = ToyBenchmark(config, 0)
    assert got == _row_keys(full.run(full.total_steps))


def test_lopkit_run_with_a_too_large_lr_stores_every_row_before_the_divergence(tmp_path, capsys):
    torch.set_num_threads(1)
    overrides = ["--set", "lr=0.5", "--set", "log_every=1"]  # diverges after a few logged steps
    code = main(["run", "toy", "--preset", "smoke", "--seeds", "1", *overrides, "--out", str(tmp_path),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    diverged_at = int(line.split("diverged at step ")[1].split(" ")[0].rstrip(":"))
    reference = ToyBenchmark(ToyBenchmark.make_config("smoke", {"lr": 0.5, "log_every": 1}), 0)
    with pytest.raises(DivergedError) as info:
        reference.run(reference.total_steps)
    assert info.value.step == diverged_at  # the same trajectory
    reference = ToyBenchmark(ToyBenchmark.make_config("smoke", {"lr": 0.5, "log_every": 1}), 0)
    expected = _row_keys(reference.run(diverged_at))
    assert len({r[0] for r in expected}) == diverged_at >= 2  # log_every=1: a logged step per finite step
    with ResultStore(tmp_path) as store:
        runs = store.runs()
        assert list(runs["status"]) == ["failed"] and f"diverged at step {diverged_at}" in runs["error"].iloc[0]
        frame = store.metrics()
    assert _row_keys(dict(zip(frame.columns, values)) for values in frame.itertuples(index=False)) == expected
