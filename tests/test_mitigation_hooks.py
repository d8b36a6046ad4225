"""Mitigations hooked into the optimizer (``Mitigation.hook``) and benchmarks that refuse methods they cannot apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lopkit as lk
from lopkit.benchmarks.base import check_accepts_methods
from lopkit.benchmarks.registry import benchmark_names, get_benchmark
from lopkit.benchmarks.toy import ToyBenchmark
from lopkit.configs import ConfigError
from lopkit.mitigations.base import Mitigation, MitigationHooks
from lopkit.runner.execute import execute_run, resolve_methods
from lopkit.runner.store import ResultStore

# rates high enough that every method changes the toy's rows within its smoke preset (120 steps, 16 units)
METHODS = {
    "cbp": "cbp:replacement_rate=0.02:maturity=5",
    "noisy_sgd": "noisy_sgd",
    "shrink_perturb": "shrink_perturb",
    "composed": "cbp:replacement_rate=0.02:maturity=5,noisy_sgd,shrink_perturb",
}


def toy_rows(spec: str, optimizer_hooks: bool, chunks: tuple[int, ...] = (10_000,)) -> list[dict]:
    """Rows of the toy smoke run with ``spec``; after each chunk but the last, resume in a fresh benchmark."""
    config = ToyBenchmark.make_config("smoke")
    bench = ToyBenchmark(config, 3, resolve_methods(spec), optimizer_hooks=optimizer_hooks)
    rows: list[dict] = []
    for i, n in enumerate(chunks):
        rows += bench.run(n)
        if i < len(chunks) - 1:
            state = bench.state_dict()
            bench = ToyBenchmark(config, 3, resolve_methods(spec), optimizer_hooks=optimizer_hooks)
            bench.load_state_dict(state)
    assert bench.done
    return rows


@pytest.mark.parametrize("name", sorted(METHODS))
def test_hook_mode_gives_the_rows_of_explicit_calls(name):
    explicit = toy_rows(METHODS[name], optimizer_hooks=False)
    hooked = toy_rows(METHODS[name], optimizer_hooks=True)
    assert hooked == explicit  # bit-identical floats
    assert explicit != toy_rows("sgd", optimizer_hooks=False), f"{name} did not change the rows: the test is void"


def test_hook_mode_resumes_with_the_step_counter_restored():
    spec = METHODS["composed"]
    assert toy_rows(spec, True, chunks=(37, 50, 10_000)) == toy_rows(spec, False)


class Recorder(Mitigation):
    """Records the hook calls it receives."""

    name = "recorder"

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def attach(self, model, optimizer):
        self.calls.append(("attach", -1))

    def before_step(self, model, optimizer, step):
        # the gradient is there and the weights are not yet updated
        self.calls.append(("before", step))

    def after_step(self, model, optimizer, step):
        self.calls.append(("after", step))


def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()


def test_hook_calls_before_and_after_each_step_with_a_counter_and_remove_detaches():
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method = Recorder()
    handle = method.hook(model, optimizer, step=5)
    assert isinstance(handle, MitigationHooks) and handle.attached
    _step(model, optimizer)
    _step(model, optimizer)
    assert method.calls == [("attach", -1), ("before", 5), ("after", 5), ("before", 6), ("after", 6)]
    assert handle.step == 7
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.attached
    _step(model, optimizer)
    assert len(method.calls) == 5


def test_hook_as_context_manager_and_before_step_sees_the_gradient_before_the_update():
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = {}

    class Peek(Mitigation):
        name = "peek"

        def before_step(self, model, optimizer, step):
            seen["before"] = (model.weight.detach().clone(), model.weight.grad.clone())

        def after_step(self, model, optimizer, step):
            seen["after"] = model.weight.detach().clone()

    with Peek().hook(model, optimizer):
        _step(model, optimizer)
    before, grad = seen["before"]
    assert torch.equal(seen["after"], before - 0.1 * grad)
    seen.clear()
    _step(model, optimizer)
    assert seen == {}


def test_hook_rejects_a_bad_step():
    model = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="step"):
        Recorder().hook(model, torch.optim.SGD(model.parameters(), lr=0.1), step=-1)


def test_top_level_build_methods_hook_is_the_readme_short_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    method = lk.build_methods("noisy_sgd")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: only the noise of before_step could move w
    grads = []
    with method.hook(model, optimizer):
        optimizer.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        clean = model[0].weight.grad.clone()
        optimizer.step()
        grads.append(model[0].weight.grad.clone())
    assert not torch.equal(grads[0], clean)  # the noise was added inside optimizer.step()


# ------------------------------------------------------------------------------------ benchmarks refusing methods

def test_seed_system_benchmarks_that_call_no_hook_refuse_methods_and_the_others_accept():
    refusing = {name for name in benchmark_names() if not get_benchmark(name).accepts_methods}
    assert {"moe_pretrain", "moe_finetune"} <= refusing
    assert not refusing & {"toy", "bitflip", "cloning", "class_split", "permuted", "random_labels", "kws_train",
                           "kws_continual"}


def test_check_accepts_methods_refuses_a_method_but_not_sgd():
    cls = get_benchmark("moe_pretrain")
    check_accepts_methods(cls, resolve_methods("sgd"))
    check_accepts_methods(cls, None)
    with pytest.raises(ConfigError, match="moe_pretrain.*cannot apply mitigations.*cbp"):
        check_accepts_methods(cls, resolve_methods("cbp"))
    with pytest.raises(ConfigError, match="cbp\\+l2init"):
        check_accepts_methods(cls, lk.build_methods("cbp,l2init"))


def test_execute_run_refuses_methods_before_writing(tmp_path):
    cls = get_benchmark("moe_pretrain")
    store = ResultStore(tmp_path)
    try:
        with pytest.raises(ConfigError, match="cannot apply mitigations"):
            execute_run(store, cls, cls.make_config("smoke"), 0, ["cbp"], progress="never")
        assert len(store.runs()) == 0
    finally:
        store.close()


def test_cli_run_refuses_method_on_moe_pretrain_with_one_error_line(tmp_path, capsys):
    from lopkit.cli import main

    code = main(["run", "moe_pretrain", "--preset", "smoke", "--method", "cbp", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: benchmark 'moe_pretrain' cannot apply mitigations")
    assert not (tmp_path / "x").exists()


def test_compare_plan_refuses_methods_on_moe_pretrain():
    from lopkit.runner.compare import build_plan

    with pytest.raises(ConfigError, match="cannot apply mitigations"):
        build_plan("moe_pretrain", "sgd,cbp", seeds=1, preset="smoke")
    build_plan("moe_pretrain", "sgd", seeds=1, preset="smoke")


# ------------------------------------------------------------------------ stages get the state they continue passed in

def test_benchmark_modules_do_not_import_the_results_store():
    """No benchmark module (core, moe, kws) imports ``lopkit.runner.store``: the runner or the pipeline reads it."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "lopkit"
    files = [src / "moe" / "train.py", src / "moe" / "evaluate.py", src / "kws" / "train.py",
             src / "kws" / "continual.py", *sorted((src / "benchmarks").glob("*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module != "lopkit.runner.store", f"{path.name} imports the store (line {node.lineno})"
                assert node.module != "lopkit.runner" or "store" not in {a.name for a in node.names}, path.name


def test_kept_state_and_load_kept_state_explain_what_is_missing(tmp_path):
    from lopkit.runner.store import load_kept_state

    with pytest.raises(ConfigError, match="holds no results.sqlite"):
        load_kept_state(tmp_path / "none", "abc")
    config = ToyBenchmark.make_config("smoke")
    with ResultStore(tmp_path / "s") as store:
        kept = execute_run(store, ToyBenchmark, config, 0, progress="never", keep_checkpoint=True)
        dropped = execute_run(store, ToyBenchmark, config, 1, progress="never")
        paused = execute_run(store, ToyBenchmark, config, 2, progress="never", stop_after_steps=5)
        state = store.kept_state(kept.run_id)
        assert state["step"] == kept.step == ToyBenchmark.make_config("smoke").num_tasks * config.steps_per_task
        with pytest.raises(ConfigError, match="not in the store"):
            store.kept_state("nope")
        with pytest.raises(ConfigError, match="status finished.*keep_checkpoint=True"):
            store.kept_state(dropped.run_id)
        with pytest.raises(ConfigError, match="status running"):
            store.kept_state(paused.run_id)
    assert load_kept_state(tmp_path / "s", kept.run_id)["step"] == state["step"]


def test_execute_run_refuses_an_initial_state_for_a_benchmark_that_continues_nothing(tmp_path):
    with ResultStore(tmp_path) as store:
        with pytest.raises(ConfigError, match="does not continue another run"):
            execute_run(store, ToyBenchmark, ToyBenchmark.make_config("smoke"), 0, progress="never", initial_state={})


def test_store_error_is_a_runtime_failure_not_a_config_error():
    """A damaged or read-only store is an I/O failure (issue 14: runtime failures are not ConfigError)."""
    from lopkit.runner.store import StoreError

    assert issubclass(StoreError, RuntimeError) and not issubclass(StoreError, ConfigError)
