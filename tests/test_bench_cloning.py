"""Tests of the cloning benchmark (E2): exact clones under SGD/Adam, escape under noise/dropout, resumability."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from lopkit.benchmarks.base import BENCHMARKS, ROW_KEYS
from lopkit.benchmarks.cloning import (
    CloningBenchmark,
    activation_layer_names,
    add_relative_gradient_noise_,
    module_kind,
    noise_scale,
)
from lopkit.diagnostics.cloning import cloning_r2
from lopkit.theory.invariance import probe_clone_tensors
from lopkit.configs import ConfigError
from lopkit.data.errors import DatasetNotFoundError
from lopkit.mitigations.base import Mitigation

# Tiny runs on scikit-learn's digits (always available offline): 64 inputs, 2 x 16 hidden units.
TINY = {
    "dataset": "digits", "train_size": 1000, "hidden": (16, 16), "batch_size": 32, "base_steps": 60,
    "paired_steps": 90, "log_every": 30, "probe_size": 200,
}  # fmt: skip


def make(overrides: dict | None = None, seed: int = 0, method=None) -> CloningBenchmark:
    """A tiny cloning benchmark (well under a second)."""
    return CloningBenchmark(CloningBenchmark.make_config("smoke", {**TINY, **(overrides or {})}), seed, method)


def run_all(bench: CloningBenchmark, chunks: tuple[int, ...] = ()) -> list[dict]:
    """Rows of the chunks, then of the rest of the run."""
    rows: list[dict] = []
    for n in chunks:
        rows += bench.run(n)
    while not bench.done:
        rows += bench.run(10_000)
    return rows


def values(rows: list[dict], metric: str, layer: str | None = None) -> list[float]:
    """Values of one metric (optionally of one layer), in row order."""
    return [r["value"] for r in rows if r["metric"] == metric and (layer is None or r["layer"] == layer)]


FWD = {d: f"cloning_r2_{d}_forward" for d in ("std_ratio_barriers", "variance_ratio")}
BWD = {d: f"cloning_r2_{d}_backward" for d in ("std_ratio_barriers", "variance_ratio")}
ALL_R2 = (*FWD.values(), *BWD.values())
HIDDEN_MODULES = {"fc1", "norm1", "act1", "fc2", "norm2", "act2"}


def test_registered_with_presets():
    assert BENCHMARKS["cloning"] is CloningBenchmark
    for preset in ("smoke", "default", "paper"):
        config = CloningBenchmark.make_config(preset)
        assert config.variant == "sgd" and config.factor == 2 and config.norm == "batch"
        assert config.r2_definition == "both"
    # the authors' code's momentum (fidelity_notes E2) in the presets that stand for their runs
    assert CloningBenchmark.make_config("default").momentum == 0.9
    assert CloningBenchmark.make_config("paper").momentum == 0.9
    assert CloningBenchmark.make_config("default").paired_steps >= 100_000
    assert CloningBenchmark.make_config("paper").hidden == (128,) * 5
    assert CloningBenchmark.make_config("smoke", {"variant": "adam"}).step_size == 1e-3
    assert CloningBenchmark.make_config("smoke", {"variant": "noisy_sgd"}).step_size == 1e-2


@pytest.mark.parametrize("variant", ["sgd", "adam"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sgd_and_adam_keep_exact_clones(variant, dtype):
    bench = make({"variant": variant, "dtype": dtype, "momentum": 0.9 if variant == "sgd" else 0.0})
    rows = run_all(bench)
    r2 = [v for metric in ALL_R2 for v in values(rows, metric)]
    assert len(r2) == 2 * 2 * 6 * 4  # 2 definitions x forward/backward x 6 hidden modules x 4 logs after cloning
    assert all(abs(v - 1.0) <= 1e-6 for v in r2), min(r2)
    # Independent check on the weights: interleaved clone pairs have identical incoming rows.
    for name in ("fc1", "fc2"):
        weight = dict(bench.clone.named_modules())[name].weight
        torch.testing.assert_close(weight[0::2], weight[1::2], rtol=0, atol=1e-6)


def test_r2_row_schedule_and_schema():
    rows = run_all(make())
    assert all(tuple(r) == ROW_KEYS and r["task"] == 0 for r in rows)
    for metric in ALL_R2:
        r2_steps = sorted({r["step"] for r in rows if r["metric"] == metric})
        assert r2_steps == [60, 90, 120, 150]  # cloning step, then every log_every, the last step
        assert {r["layer"] for r in rows if r["metric"] == metric} == HIDDEN_MODULES  # every hidden module
    base_steps = [r["step"] for r in rows if r["metric"] == "base_loss"]
    assert base_steps == [30, 60, 90, 120, 150]
    assert [r["step"] for r in rows if r["metric"] == "clone_loss"] == [90, 120, 150]
    assert {"base_effective_rank", "clone_effective_rank", "base_probe_loss", "clone_probe_loss"} <= {
        r["metric"] for r in rows
    }


def test_clone_starts_with_the_base_function():
    rows = run_all(make())
    at_clone = {(r["layer"], r["metric"]): r["value"] for r in rows if r["step"] == 60}
    assert math.isclose(at_clone[("model", "base_probe_loss")], at_clone[("model", "clone_probe_loss")], rel_tol=1e-5)
    # Duplicated units leave the Shannon effective rank unchanged (singular values all scale by sqrt(2)).
    assert math.isclose(
        at_clone[("act1", "base_effective_rank")], at_clone[("act1", "clone_effective_rank")], rel_tol=1e-4
    )


@pytest.mark.parametrize("variant", ["noisy_sgd", "dropout"])
def test_noise_and_dropout_break_the_clones(variant):
    rows = run_all(make({"variant": variant}))
    for metric in ALL_R2:
        assert values(rows, metric, "act1")[0] == 1.0  # at the cloning step, before any update
        # Exact clones give R^2 == 1.0 to the last bit (see the sgd/adam test); 90 steps already leave it clearly.
        assert max(values(rows, metric, "act1")[-1], values(rows, metric, "fc2")[-1]) < 1.0 - 1e-6, metric


def test_zero_noise_keeps_clones_and_single_noisy_step_breaks_them():
    quiet = run_all(make({"variant": "noisy_sgd", "noise_sigma0": 0.0}))
    assert all(v == 1.0 for v in values(quiet, FWD["variance_ratio"]))
    single = run_all(make({"variant": "noisy_sgd", "noise_decay": 0.0}))
    assert min(values(single, FWD["variance_ratio"])) < 1.0 - 1e-9


def test_dropout_variant_trains_the_base_with_dropout_too():
    bench = make({"variant": "dropout", "dropout_p": 0.3})
    drops = [m for m in bench.base.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 2 and all(m.p == 0.3 for m in drops)
    assert not any(isinstance(m, nn.Dropout) for m in make().base.modules())


def test_noise_scale_schedule():
    assert noise_scale(0.01, 0.999, 0) == 0.01
    assert math.isclose(noise_scale(0.01, 0.999, 1000), 0.01 * 0.999**1000)
    assert noise_scale(0.05, 0.0, 0) == 0.05 and noise_scale(0.05, 0.0, 1) == 0.0
    assert noise_scale(0.02, 1.0, 10**6) == 0.02


def test_relative_gradient_noise_statistics():
    param = nn.Parameter(torch.zeros(200_000, dtype=torch.float64))
    grad = torch.randn(200_000, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3.0
    param.grad = grad.clone()
    add_relative_gradient_noise_([param], 0.01, torch.Generator().manual_seed(2))
    noise = param.grad - grad
    expected_std = 0.01 * float(grad.norm())
    assert abs(float(noise.std()) / expected_std - 1.0) < 0.01
    assert abs(float(noise.mean())) < 4 * expected_std / math.sqrt(200_000)
    untouched = nn.Parameter(torch.zeros(3))
    add_relative_gradient_noise_([untouched], 0.5, torch.Generator())  # no grad: nothing to do
    assert untouched.grad is None


def test_chunking_and_resume_are_exact():
    overrides = {"variant": "dropout"}
    expected = run_all(make(overrides, seed=2))
    chunked = run_all(make(overrides, seed=2), (1, 59, 0, 1, 44))
    assert chunked == expected
    for stop in (40, 60, 97):  # before, exactly at and after the cloning step
        first = make(overrides, seed=2)
        rows = first.run(stop)
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)
        buffer.seek(0)
        resumed = make(overrides, seed=2)
        resumed.load_state_dict(torch.load(buffer, weights_only=False))
        assert rows + run_all(resumed) == expected, stop


def test_noisy_resume_is_exact():
    expected = run_all(make({"variant": "noisy_sgd"}, seed=1))
    first = make({"variant": "noisy_sgd"}, seed=1)
    rows = first.run(75)
    resumed = make({"variant": "noisy_sgd"}, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert rows + run_all(resumed) == expected


class Recorder(Mitigation):
    """Records which model each hook sees and the step indices."""

    name = "recorder"

    def __init__(self):
        self.calls: list[tuple[str, int, int]] = []

    def attach(self, model, optimizer):
        self.calls.append(("attach", -1, model.fc1.out_features))

    def on_task_start(self, model, optimizer, task):
        self.calls.append(("task", task, model.fc1.out_features))

    def before_step(self, model, optimizer, step):
        self.calls.append(("before", step, model.fc1.out_features))

    def after_step(self, model, optimizer, step):
        self.calls.append(("after", step, model.fc1.out_features))


def test_method_hooks_act_on_the_clone_only():
    recorder = Recorder()
    run_all(make({"base_steps": 10, "paired_steps": 5, "log_every": 5}, method=recorder))
    assert recorder.calls[:2] == [("attach", -1, 32), ("task", 0, 32)]
    assert [c[1] for c in recorder.calls if c[0] == "before"] == [0, 1, 2, 3, 4]
    assert all(width == 32 for *_, width in recorder.calls)


def test_activation_layer_names():
    assert activation_layer_names(make().base) == ["act1", "act2"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"variant": "sgd_noisy"},
        {"factor": 1},
        {"dropout_p": 1.0},
        {"noise_decay": 1.5},
        {"probe_size": 5000},
        {"hidden": ()},
        {"lr": 0.0},
        {"momentum": 1.0},
        {"norm": "group"},
        {"base_steps": 0},
        {"variant_name": "sgd"},
        {"r2_definition": "std_ratio"},
        {"r2_every": 45},
    ],
)
def test_bad_config_raises_config_error(overrides):
    with pytest.raises(ConfigError):
        CloningBenchmark.make_config("smoke", {**TINY, **overrides})


def test_fashion_mnist_smoke_keeps_clones_exact():
    try:
        overrides = {"train_size": 600, "base_steps": 20, "paired_steps": 20, "log_every": 20, "probe_size": 128}
        bench = CloningBenchmark(CloningBenchmark.make_config("smoke", overrides), 0)
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    rows = run_all(bench)
    assert bench.base.fc1.in_features == 784 and bench.clone.fc1.out_features == 64
    assert all(v == 1.0 for metric in ALL_R2 for v in values(rows, metric))


@pytest.mark.parametrize("definition", ["std_ratio_barriers", "variance_ratio"])
def test_r2_definition_is_selectable_and_labelled(definition):
    bench = make({"variant": "noisy_sgd", "r2_definition": definition})
    rows = run_all(bench)
    r2_metrics = {r["metric"] for r in rows if r["metric"].startswith("cloning_r2")}
    assert r2_metrics == {FWD[definition], BWD[definition]}
    # the logged values are the chosen definition on the clone's probe tensors (recomputed on the final clone)
    _, tensors = probe_clone_tensors(bench.clone, bench.partition, bench.probe_x, bench.probe_y)
    last = {r["layer"]: r["value"] for r in rows if r["metric"] == FWD[definition] and r["step"] == bench.total_steps}
    for name, (output, _) in tensors.items():
        assert last[name] == pytest.approx(cloning_r2(output, bench.partition[name], definition=definition), rel=1e-9)
    # same seed with both definitions: identical values for this definition (measuring does not perturb training)
    both = run_all(make({"variant": "noisy_sgd", "r2_definition": "both"}))
    assert values(both, FWD[definition]) == values(rows, FWD[definition])
    assert values(both, FWD["std_ratio_barriers"]) != values(both, FWD["variance_ratio"])


def test_r2_every_thins_the_measurements():
    rows = run_all(make({"variant": "noisy_sgd", "log_every": 10, "r2_every": 40}))
    r2_steps = sorted({r["step"] for r in rows if r["metric"] == FWD["variance_ratio"]})
    assert r2_steps == [60, 80, 120, 150]  # cloning step, multiples of 40, the last step
    assert len({r["step"] for r in rows if r["metric"] == "clone_loss"}) == 9  # the other logs stay


def test_momentum_is_honoured():
    plain = make({"variant": "noisy_sgd", "momentum": 0.0})
    heavy = make({"variant": "noisy_sgd", "momentum": 0.9})
    plain_rows, heavy_rows = run_all(plain), run_all(heavy)
    for bench, momentum in ((plain, 0.0), (heavy, 0.9)):
        for optimizer in (bench.base_optimizer, bench.clone_optimizer):
            assert all(group["momentum"] == momentum for group in optimizer.param_groups)
    assert any(bool(s) and "momentum_buffer" in s for s in heavy.clone_optimizer.state.values())
    # the trajectory changes: same seed, same minibatches and noise draws, different losses from the first log on
    assert values(plain_rows, "base_loss")[0] != values(heavy_rows, "base_loss")[0]
    assert values(plain_rows, "clone_loss")[-1] != values(heavy_rows, "clone_loss")[-1]
    assert values(make({"variant": "noisy_sgd", "momentum": 0.9}).run(10_000), "base_loss") == values(
        heavy_rows, "base_loss"
    )  # and it is deterministic


def test_module_kind():
    kinds = {name: module_kind(name) for name in ("fc1", "norm12", "act3", "drop2", "head", "fcx", "flatten")}
    assert kinds == {
        "fc1": "linear", "norm12": "norm", "act3": "activation", "drop2": "dropout", "head": "other",
        "fcx": "other", "flatten": "other",
    }  # fmt: skip
    dropout_rows = run_all(make({"variant": "dropout"}))
    layers = {r["layer"] for r in dropout_rows if r["metric"] == FWD["variance_ratio"]}
    assert {module_kind(name) for name in layers} == {"linear", "norm", "activation", "dropout"}
