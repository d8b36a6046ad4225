"""The vectorised continual learner (several seeds / an lr grid as one stacked MLP or CNN) against separate runs."""

from __future__ import annotations

import io
import math

import pytest
import torch

from lopkit.benchmarks.continual import (
    ClassSplitBenchmark,
    PermutedBenchmark,
    RandomLabelsBenchmark,
    build_model,
)
from lopkit.benchmarks.vectorised_continual import (
    VectorisedContinual,
    continual_refusal,
    draw_dropout_noise,
    dropout_shapes,
    stacked_forward,
)
from lopkit.data.errors import DatasetNotFoundError
from lopkit.data.fashion_mnist import fashion_mnist_dir
from lopkit.mitigations.registry import get_method
from lopkit.runner.execute import execute_run
from lopkit.runner.store import ResultStore
from lopkit.runner.vectorised import (
    VectorisedRunner,
    execute_group,
    register_vectorised_runner,
    vectorisation_refusal,
    vectorised_runner,
)


def _fashion_mnist_available() -> bool:
    try:
        fashion_mnist_dir()
    except DatasetNotFoundError:
        return False
    return True


needs_data = pytest.mark.skipif(
    not _fashion_mnist_available(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)

FAST = {"monitor_metrics": ("dead_fraction", "effective_rank", "saturated_fraction", "loss")}
REL = 1e-5  # float32 rounding of a different summation order, over ~100 steps


def _config(cls, **overrides):
    return cls.make_config("smoke", {**FAST, **overrides})


def _assert_rows_close(expected, actual):
    """Same rows in the same order; values equal within float tolerance (NaN where the other has NaN)."""
    assert len(actual) == len(expected)
    for want, got in zip(expected, actual):
        assert (got["step"], got["task"], got["layer"], got["metric"]) == (
            want["step"], want["task"], want["layer"], want["metric"])  # fmt: skip
        if isinstance(want["value"], float) and math.isnan(want["value"]):
            assert math.isnan(got["value"]), (want, got)
        else:
            assert math.isclose(got["value"], want["value"], rel_tol=REL, abs_tol=1e-6), (want, got)


# ----------------------------------------------------------------------------- no data needed
@pytest.mark.parametrize("norm", ["none", "layer"])
def test_stacked_forward_equals_each_members_own_forward(norm):
    config = ClassSplitBenchmark.make_config("smoke", {"norm": norm, "activation": "tanh"})
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(build_model(config))
    names = [name for name, _ in models[0].named_parameters()]
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in names}
    if norm == "layer":  # non-trivial affine parameters, different per member
        for n in names:
            if n.startswith("norm"):
                params[n] = params[n] + torch.randn_like(params[n])
        for index, model in enumerate(models):
            for n, p in model.named_parameters():
                p.data = params[n][index].clone()
    inputs = torch.randn(3, 7, 784)
    stacked = stacked_forward(models[0], params, inputs)
    for index, model in enumerate(models):
        torch.testing.assert_close(stacked[index], model(inputs[index]), rtol=1e-5, atol=1e-6)


def _perturbed_members(config, count):
    """``count`` models of ``config`` with distinct weights, affine parameters and running statistics."""
    models = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = build_model(config)
        with torch.no_grad():
            for tensor in model.parameters():
                tensor.add_(0.05 * torch.randn_like(tensor))
            for tensor in (b for b in model.buffers() if b.is_floating_point()):
                tensor.add_(0.3 * torch.rand_like(tensor))  # running_var stays positive
        models.append(model)
    return models


@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_stacked_forward_and_backward_equal_each_members_own(model_kind, norm, affine, training):
    # CNN: one grouped convolution; norm=layer is GroupNorm(1, C) on conv layers and LayerNorm on FC layers;
    # BatchNorm in train mode normalises with batch statistics and updates every member's running statistics
    config = ClassSplitBenchmark.make_config("smoke", {"model": model_kind, "norm": norm, "affine": affine})
    models = _perturbed_members(config, 3)
    for model in models:
        model.train(training)
    names = [name for name, _ in models[0].named_parameters()]
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]).requires_grad_() for n in names}
    buffers = {n: torch.stack([dict(m.named_buffers())[n] for m in models]) for n, _ in models[0].named_buffers()}
    assert (norm == "batch") == bool(buffers)
    inputs = torch.randn(3, 16, 784) if model_kind == "mlp" else torch.randn(3, 16, 1, 28, 28)
    stacked = stacked_forward(models[0], params, inputs, buffers)
    weights = torch.randn(stacked.shape)  # a loss whose output gradient differs per member and sample
    (stacked * weights).sum().backward()
    for index, model in enumerate(models):
        own = model(inputs[index])
        torch.testing.assert_close(stacked[index], own, rtol=1e-5, atol=1e-5)
        (own * weights[index]).sum().backward()
        for name, parameter in model.named_parameters():
            if norm == "batch" and training and name.endswith("bias") and not name.startswith(("norm", "head")):
                continue  # a bias just before BatchNorm: its exact gradient is 0, both hold rounding noise
            scale = parameter.grad.abs().max().item()
            torch.testing.assert_close(params[name].grad[index], parameter.grad, rtol=1e-4, atol=1e-5 * scale)
        for name, buffer in model.named_buffers():  # running statistics: updated alike in train mode only
            torch.testing.assert_close(buffers[name][index], buffer, rtol=1e-5, atol=1e-6)


def test_stacked_dropout_uses_the_masks_each_member_draws():
    config = ClassSplitBenchmark.make_config("smoke", {"dropout": 0.4})
    models = _perturbed_members(config, 2)
    names = [name for name, _ in models[0].named_parameters()]
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in names}
    shapes = dropout_shapes(models[0], 5)
    assert shapes == {"drop1": (5, 32), "drop2": (5, 32)}
    inputs = torch.randn(2, 5, 784)
    noise = []
    for seed in (10, 11):
        torch.manual_seed(seed)
        noise.append(draw_dropout_noise(models[0], shapes, inputs.device, inputs.dtype))
    stacked = stacked_forward(models[0], params, inputs, noise={k: torch.stack([n[k] for n in noise]) for k in shapes})
    for index, (model, seed) in enumerate(zip(models, (10, 11))):
        torch.manual_seed(seed)  # the member's own forward draws its masks from the same generator state
        torch.testing.assert_close(stacked[index], model(inputs[index]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="drop1.*noise"):
        stacked_forward(models[0], params, inputs)
    models[0].eval()  # eval-mode dropout is the identity and needs no masks
    torch.testing.assert_close(stacked_forward(models[0], params, inputs)[0], models[0](inputs[0]))


def test_refusals_name_what_is_not_vectorised():
    plain = _config(ClassSplitBenchmark)
    assert continual_refusal([plain, plain]) is None
    assert continual_refusal([plain, _config(ClassSplitBenchmark, lr=0.01)]) is None  # an lr grid fits
    for vectorised in ({"norm": "batch"}, {"dropout": 0.1}, {"model": "cnn", "norm": "layer", "affine": False}):
        assert continual_refusal([_config(ClassSplitBenchmark, **vectorised)] * 2) is None
    assert "model=resnet is not vectorised" in continual_refusal([_config(ClassSplitBenchmark, model="resnet")])
    assert "differ in width" in continual_refusal([plain, _config(ClassSplitBenchmark, width=16)])
    assert "cbp" in continual_refusal([plain, plain], [get_method("cbp")])
    for reason in (continual_refusal([_config(ClassSplitBenchmark, model="vit")]),
                   continual_refusal([plain], [get_method("cbp")])):  # fmt: skip
        assert "\n" not in reason and "is not vectorised (" in reason  # one line saying why
    assert vectorisation_refusal("class_split", [plain]) == "a single run"
    assert vectorisation_refusal("kws_train", [plain, plain]) == "kws_train has no vectorised learner"
    with pytest.raises(ValueError, match="cannot vectorise.*model=resnet"):
        VectorisedContinual(ClassSplitBenchmark, [(_config(ClassSplitBenchmark, model="resnet"), 0)])


def test_register_vectorised_runner_plugs_in_a_benchmark():
    assert vectorised_runner("class_split").build == "VectorisedContinual"
    runner = VectorisedRunner("lopkit.benchmarks.vectorised_continual", "continual_refusal", "VectorisedContinual")
    register_vectorised_runner("toy_vectorised_test", runner)
    assert vectorised_runner("toy_vectorised_test") is runner
    with pytest.raises(TypeError):
        register_vectorised_runner("toy_vectorised_test", "not a runner")


# ----------------------------------------------------------------------------- against separate runs
CASES = {
    "class_split adam": (ClassSplitBenchmark, {}),
    "permuted layernorm sgd momentum": (
        PermutedBenchmark, {"norm": "layer", "optimizer": "sgd", "momentum": 0.9, "lr": 0.01}),
    "random_labels adam wd reset_optimizer monitor_every": (
        RandomLabelsBenchmark, {"weight_decay": 1e-3, "reset_optimizer": True, "monitor_every": 20}),
    "class_split cnn adam": (ClassSplitBenchmark, {"model": "cnn"}),
    "permuted batchnorm sgd momentum": (
        PermutedBenchmark, {"norm": "batch", "optimizer": "sgd", "momentum": 0.9, "lr": 0.01}),
    "random_labels batchnorm no affine sgd": (
        RandomLabelsBenchmark, {"norm": "batch", "affine": False, "optimizer": "sgd", "lr": 0.05, "monitor_every": 20}),
    "class_split dropout adam": (ClassSplitBenchmark, {"dropout": 0.2}),
    "class_split cnn dropout": pytest.param(
        (ClassSplitBenchmark, {"model": "cnn", "dropout": 0.3}), marks=pytest.mark.slow),
}  # fmt: skip
# Adam with BatchNorm is left out of the full-run comparison: the bias of a layer just before BatchNorm has an
# exact gradient of 0, so it holds rounding noise that Adam scales up to lr-sized steps, and that bias enters the
# running mean the eval-mode rows use. On the smoke MLP, nudging the separate run's first weight by one float32
# ulp moves its rows by up to 0.3 (saturated_fraction) and 1e-2 (effective_rank): no float32 computation in
# another order matches it row by row. test_cnn_norm_rows_track_separate_runs covers it over one task.


@needs_data
@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # torch.backends.mkldnn.flags on a CPU-only build
@pytest.mark.parametrize("norm, overrides", [
    ("layer", {}),  # GroupNorm(1, C) on the conv layers, LayerNorm on the FC layers, Adam
    ("batch", {"optimizer": "sgd", "momentum": 0.9, "lr": 0.01}),  # BatchNorm2d / BatchNorm1d (Adam: see above)
])  # fmt: skip
def test_cnn_norm_rows_track_separate_runs(norm, overrides):
    # A normalised CNN's trajectory amplifies rounding: over the whole smoke run the separate run computed with
    # oneDNN's convolutions turned off (another valid float32 summation order) differs from itself by up to 3e-3
    # (layer) and 3e-2 (batch). So compare the first task (its online bins, task-end evaluations and Monitor rows,
    # BatchNorm in eval mode on the running statistics), within 1e-5 or twice the separate run's own discrepancy.
    config = _config(ClassSplitBenchmark, model="cnn", norm=norm, **overrides)
    steps, seeds = 30, [0, 4]
    group = VectorisedContinual(ClassSplitBenchmark, [(config, seed) for seed in seeds])
    for seed, rows in zip(seeds, group.run(steps)):
        expected = ClassSplitBenchmark(config, seed).run(steps)
        with torch.backends.mkldnn.flags(enabled=False):
            reordered = ClassSplitBenchmark(config, seed).run(steps)
        own = max(abs(a["value"] - b["value"]) / max(abs(a["value"]), 1e-6)
                  for a, b in zip(expected, reordered) if not math.isnan(a["value"]))  # fmt: skip
        tolerance = max(REL, 2 * own)
        assert tolerance < 1e-3  # the first task is not chaotic: a real difference would show
        assert len(rows) == len(expected)
        assert {r["metric"] for r in rows} >= {"online_accuracy", "task_final_train_accuracy", "effective_rank"}
        for want, got in zip(expected, rows):
            assert (got["step"], got["layer"], got["metric"]) == (want["step"], want["layer"], want["metric"])
            if not math.isnan(want["value"]):
                assert math.isclose(got["value"], want["value"], rel_tol=tolerance, abs_tol=1e-6), (want, got)
    if norm == "batch":  # every member's module holds its own running statistics, as its separate run's does
        separate = ClassSplitBenchmark(config, seeds[1])
        separate.run(steps)
        mine = group.benchmarks[1].model.state_dict()
        for name, value in separate.model.state_dict().items():
            if "running" in name or "num_batches" in name:
                scale = value.abs().max().item()  # the running mean holds the pre-BatchNorm biases' rounding noise
                torch.testing.assert_close(mine[name], value, rtol=1e-5, atol=1e-5 * scale)


@needs_data
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_rows_equal_separate_runs(case):
    cls, overrides = case
    config = _config(cls, **overrides)
    seeds = [0, 3, 5]
    group = VectorisedContinual(cls, [(config, seed) for seed in seeds])
    rows = group.run(37)  # two pieces, the first ending inside task 1
    for member, more in zip(rows, group.run(10**6)):
        member += more
    assert group.done and group.run(5) == [[], [], []]
    for seed, member_rows in zip(seeds, rows):
        separate = cls(config, seed)
        _assert_rows_close(separate.run(separate.total_steps), member_rows)
        assert {r["metric"] for r in member_rows} >= {"online_accuracy", "task_final_train_accuracy", "dead_fraction"}


@needs_data
@pytest.mark.parametrize("optimizer, model", [
    ("adam", "mlp"),
    pytest.param("sgd", "mlp", marks=pytest.mark.slow),
    pytest.param("adam", "cnn", marks=pytest.mark.slow),
])  # fmt: skip
def test_lr_grid_rows_equal_separate_runs(optimizer, model):
    # Adam lr 1e-2 is left out: on this smoke model its trajectory is chaotic (nudging the separate run's initial
    # weights by one float32 ulp moves its rows by 5e-2), so no float32 computation in another order matches it
    lrs = [1e-3, 3e-3, 2e-3] if optimizer == "adam" else [0.01, 0.1, 0.05]
    members = [(_config(ClassSplitBenchmark, lr=lr, optimizer=optimizer, model=model), seed)
               for lr, seed in zip(lrs, (0, 0, 1))]  # fmt: skip
    # the CNN at lr 3e-3 is chaotic over the whole smoke run (the separate run computed with oneDNN's convolutions
    # off differs from itself by 1e-2 at the end): its first task (30 steps, with the task-end rows) is compared
    steps = 10**6 if model == "mlp" else 30
    group = VectorisedContinual(ClassSplitBenchmark, members)
    rows = group.run(steps)
    finals = set()
    for (config, seed), member_rows in zip(members, rows):
        separate = ClassSplitBenchmark(config, seed)
        _assert_rows_close(separate.run(steps), member_rows)
        finals.add(round(member_rows[-1]["value"], 6))
    assert len(finals) > 1  # the members really trained differently


def _saved(state) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


@needs_data
@pytest.mark.parametrize("overrides", [
    {},
    pytest.param({"norm": "batch", "optimizer": "sgd", "momentum": 0.9, "lr": 0.01}, id="batchnorm"),  # buffers
    pytest.param({"model": "cnn", "dropout": 0.3}, id="cnn-dropout", marks=pytest.mark.slow),  # the RNG moves on
])  # fmt: skip
def test_checkpoints_interchange_with_separate_runs(overrides):
    config = _config(ClassSplitBenchmark, monitor_every=10, log_every=7, **overrides)
    seeds = [1, 2]
    separate_rows = {seed: ClassSplitBenchmark(config, seed).run(10**6) for seed in seeds}
    # vectorised for 43 steps, then each member continues as a separate run from its state
    group = VectorisedContinual(ClassSplitBenchmark, [(config, seed) for seed in seeds])
    first = group.run(43)
    reference = ClassSplitBenchmark(config, seeds[0])
    reference.run(43)
    reference_size = len(_saved(reference.state_dict()).getvalue())
    for seed, head, state in zip(seeds, first, group.state_dicts()):
        buffer = _saved(state)
        assert len(buffer.getvalue()) < 1.05 * reference_size  # one member's weights, not the whole stack
        alone = ClassSplitBenchmark(config, seed)
        alone.load_state_dict(torch.load(buffer, weights_only=False))
        _assert_rows_close(separate_rows[seed], head + alone.run(10**6))
    # separate runs for 43 steps, then one vectorised learner continues from their states
    runs = [ClassSplitBenchmark(config, seed) for seed in seeds]
    heads = [run.run(43) for run in runs]
    group = VectorisedContinual(ClassSplitBenchmark, [(config, seed) for seed in seeds])
    group.load_state_dicts([run.state_dict() for run in runs])
    assert group.step == 43
    for seed, head, tail in zip(seeds, heads, group.run(10**6)):
        _assert_rows_close(separate_rows[seed], head + tail)
    other = ClassSplitBenchmark(config, 7)
    other.run(10)
    with pytest.raises(ValueError, match="different steps"):
        group.load_state_dicts([runs[0].state_dict(), other.state_dict()])


# ----------------------------------------------------------------------------- into a results store
def _store_rows(store, run_id):
    frame = store.metrics(run_id=run_id)
    return [{"step": int(r.step), "task": int(r.task), "layer": r.layer, "metric": r.metric, "value": float(r.value)}
            for r in frame.itertuples(index=False)]


@needs_data
def test_execute_group_writes_the_runs_separate_runs_would(tmp_path):
    config = _config(RandomLabelsBenchmark)
    seeds = [0, 1, 2]
    separate = ResultStore(tmp_path / "separate")
    expected = {seed: execute_run(separate, "random_labels", config, seed, progress="never") for seed in seeds}
    store = ResultStore(tmp_path / "vectorised")
    done = execute_run(store, "random_labels", config, 2, progress="never")  # one already finished: skipped
    results = execute_group(store, "random_labels", [(config, s) for s in seeds], checkpoint_every=25,
                            progress="never", log=lambda line: pytest.fail(line))
    assert [r.status for r in results] == ["finished", "finished", "skipped"]
    assert results[2].run_id == done.run_id
    for seed, result in zip(seeds, results):
        assert result.run_id == expected[seed].run_id
        _assert_rows_close(_store_rows(separate, result.run_id), _store_rows(store, result.run_id))
        assert store.get_run(result.run_id)["status"] == "finished"
        assert store.load_checkpoint_bytes(result.run_id) is None
    again = execute_group(store, "random_labels", [(config, s) for s in seeds], progress="never")
    assert [r.status for r in again] == ["skipped"] * 3


@needs_data
@pytest.mark.slow
def test_execute_group_resumes_and_hands_a_diverging_member_to_a_separate_run(tmp_path):
    good, bad = _config(ClassSplitBenchmark, optimizer="sgd", lr=0.01), _config(ClassSplitBenchmark, optimizer="sgd", lr=1e12)
    store = ResultStore(tmp_path / "store")
    reference = ResultStore(tmp_path / "reference")
    # runs paused at one step (checkpoints of separate runs) resume together as a group
    lines: list[str] = []
    for seed in (0, 1):
        assert execute_run(store, "class_split", good, seed, progress="never", stop_after_steps=40).status == "paused"
    resumed = execute_group(store, "class_split", [(good, 0), (good, 1)], progress="never", log=lines.append)
    assert [(r.status, r.resumed_from) for r in resumed] == [("finished", 40)] * 2 and lines == []
    for seed, result in zip((0, 1), resumed):
        alone = execute_run(reference, "class_split", good, seed, progress="never")
        _assert_rows_close(_store_rows(reference, alone.run_id), _store_rows(store, result.run_id))
    # runs at different steps run separately, saying why
    execute_run(store, "class_split", good, 3, progress="never", stop_after_steps=10)
    mixed = execute_group(store, "class_split", [(good, 3), (good, 4)], progress="never", log=lines.append)
    assert [r.status for r in mixed] == ["finished", "finished"]
    assert len(lines) == 1 and "different steps" in lines.pop()
    # a member that diverges fails alone (as its separate run fails); the others finish separately
    results = execute_group(store, "class_split", [(good, 2), (bad, 2)], checkpoint_every=20, progress="never",
                            log=lines.append)
    assert len(lines) == 1 and "DivergedError" in lines[0] and "separately" in lines[0]
    assert results[0].status == "finished" and results[1].status == "failed"
    assert "diverged" in results[1].error_line
    alone = execute_run(reference, "class_split", good, 2, progress="never")
    _assert_rows_close(_store_rows(reference, alone.run_id), _store_rows(store, results[0].run_id))


# ----------------------------------------------------------------------------- sweeps
def test_sweep_plans_one_group_per_shared_shape_and_says_why_others_run_separately(tmp_path, capsys):
    from lopkit.runner.sweep import _plan_tasks, parse_sweep

    data = {"experiment": str(tmp_path), "preset": "smoke", "seeds": 3, "runs": [
        {"benchmark": "class_split", "grid": {"lr": [0.001, 0.01]}},  # one group: seeds x lr grid
        {"benchmark": "class_split", "set": {"model": "resnet"}},  # refused: three separate runs
        {"benchmark": "moe_pretrain"},  # no vectorised learner: separate, silently
    ]}  # fmt: skip
    sweep = parse_sweep(data)
    tasks = _plan_tasks(sweep, list(range(len(sweep.runs))), str(tmp_path), 1, 1)
    grouped = [t for t in tasks if t.vectorize_engine == "group"]
    assert [len(t.indices) for t in grouped] == [6]
    assert {sweep.runs[i].overrides_dict["lr"] for i in grouped[0].indices} == {0.001, 0.01}
    assert len(tasks) == 1 + 3 + 3
    err = capsys.readouterr().err
    assert "6 class_split runs (sgd): vectorised" in err
    assert "3 class_split runs (sgd): separate runs: model=resnet is not vectorised" in err
    sweep.vectorize_seeds = False  # --no-vectorize-seeds turns grouping off
    assert all(t.vectorize_engine is None for t in _plan_tasks(sweep, list(range(len(sweep.runs))), None, 1, 1))


@needs_data
def test_sweep_runs_a_group_into_the_store_as_separate_runs(tmp_path):
    from lopkit.runner.sweep import parse_sweep, run_sweep

    data = {"experiment": str(tmp_path / "sweep"), "preset": "smoke", "seeds": 2, "runs": [
        {"benchmark": "random_labels", "grid": {"lr": [0.001, 0.003]}, "set": {"monitor_metrics": ["dead_fraction"]}},
    ]}  # fmt: skip
    sweep = parse_sweep(data)
    outcomes = run_sweep(sweep, "sequential", progress=False)
    assert [o.status for o in outcomes] == ["finished"] * 4
    store, reference = ResultStore(tmp_path / "sweep"), ResultStore(tmp_path / "reference")
    for spec in sweep.runs:
        alone = execute_run(reference, spec.benchmark, spec.make_config(), spec.seed, progress="never")
        assert alone.run_id == spec.run_id()
        _assert_rows_close(_store_rows(reference, alone.run_id), _store_rows(store, alone.run_id))
    assert [o.status for o in run_sweep(sweep, "sequential", progress=False)] == ["skipped"] * 4


# ----------------------------------------------------------------------------- lopkit run
@needs_data
def test_lopkit_run_says_which_path_it_takes(tmp_path, capsys):
    from lopkit.cli import main

    common = ["--preset", "smoke", "--threads", "1", "--no-progress", "--set", "monitor_metrics=dead_fraction"]
    assert main(["run", "random_labels", "--seeds", "2", "--out", str(tmp_path / "a"), *common]) == 0
    out = capsys.readouterr().out
    assert "vectorised: 2 seeds trained as one learner in this process" in out
    assert out.count(": finished at step 90/90") == 2
    runs = ResultStore(tmp_path / "a").runs()
    assert sorted(runs["seed"]) == [0, 1] and set(runs["status"]) == {"finished"}
    assert main(["run", "random_labels", "--seeds", "2", "--out", str(tmp_path / "b"), *common, "--method", "l2"]) == 0
    assert "separate runs: method l2 is not vectorised" in capsys.readouterr().out
    assert main(["run", "random_labels", "--seeds", "2", "--out", str(tmp_path / "a"), *common, "--no-vectorise"]) == 0
    out = capsys.readouterr().out
    assert "separate runs: --no-vectorise" in out and out.count("already finished") == 2
