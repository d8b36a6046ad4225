"""Tests for lopkit.diagnostics.monitor.Monitor: layer selection, invariance of the model, metric plumbing."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from lopkit.diagnostics.cloning import cloning_r2
from lopkit.diagnostics.errors import LopkitWarning
from lopkit.diagnostics.monitor import METRIC_NAMES, Monitor, MonitorConfig
from lopkit.diagnostics.similarity import duplicate_clusters, duplicate_fraction, duplicate_unit_mask


def make_mlp(width: int = 16, inplace: bool = False, seed: int = 0) -> nn.Sequential:
    """Small ReLU MLP 8 -> width -> width -> 3."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, width),
        nn.ReLU(inplace=inplace),
        nn.Linear(width, width),
        nn.ReLU(inplace=inplace),
        nn.Linear(width, 3),
    )


def make_cnn(seed: int = 0) -> nn.Sequential:
    """Small CNN with BatchNorm on 3x8x8 inputs, 2 classes."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 2),
    )


def probe_mlp(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed probe batch for make_mlp."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def probe_cnn(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed probe batch for make_cnn."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 2, (n,), generator=g)


def values(rows: list[dict], layer: str, metric: str) -> float:
    """The single value of (layer, metric) in rows."""
    found = [r["value"] for r in rows if r["layer"] == layer and r["metric"] == metric]
    assert len(found) == 1, f"expected one row for {layer}/{metric}, got {found}"
    return found[0]


def all_hooks_empty(model: nn.Module) -> bool:
    """True when no module of the model carries forward or forward-pre hooks."""
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------------- config
def test_config_defaults_and_validation() -> None:
    cfg = MonitorConfig()
    assert cfg.every == 100 and cfg.dead_threshold == 1e-7 and cfg.dead_sample_fraction == 0.95
    assert cfg.saturation_ratio == 1e-4 and cfg.frozen_eps == 0.01 and cfg.duplicate_threshold == 0.95
    assert cfg.rank_max_samples == 1024 and cfg.hessian is False
    for bad in (dict(every=0), dict(every=2.5), dict(dead_sample_fraction=1.5), dict(frozen_eps=-1.0),
                dict(rank_max_samples=0), dict(duplicate_threshold=2.0), dict(hessian="yes"),
                dict(saturation_ratio=float("nan"))):
        with pytest.raises(ValueError, match="MonitorConfig"):
            MonitorConfig(**bad)


# ---------------------------------------------------------------------------- layer selection
def test_default_layer_selection_mlp_and_cnn() -> None:
    assert [layer.name for layer in Monitor(make_mlp()).layers] == ["0", "1", "2", "3", "4"]
    cnn_monitor = Monitor(make_cnn())
    assert [layer.name for layer in cnn_monitor.layers] == ["0", "2", "3", "4", "7"]
    kinds = [layer.kind for layer in cnn_monitor.layers]
    assert kinds == ["parametric", "activation", "parametric", "activation", "parametric"]


def test_layers_by_name_and_type() -> None:
    model = make_cnn()
    monitor = Monitor(model, layers=["1", nn.ReLU])
    assert [layer.name for layer in monitor.layers] == ["1", "2", "4"]
    rows = monitor.measure(probe_cnn()[0])
    assert {r["layer"] for r in rows} == {"1", "2", "4"}


def test_unknown_layer_lists_available_names() -> None:
    with pytest.raises(ValueError, match=r"'nope'.*available.*'0'.*'4'"):
        Monitor(make_mlp(), layers=["nope"])


def test_no_monitorable_layer() -> None:
    with pytest.raises(ValueError, match="layers="):
        Monitor(nn.Sequential(nn.Flatten(), nn.Dropout()))


def test_unknown_metric_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="valid names.*dead_fraction"):
        Monitor(make_mlp(), metrics=["dead_fraction", "bogus"])


def test_metric_subset_only() -> None:
    monitor = Monitor(make_mlp(), metrics=["dead_fraction", "weight_norm"])
    rows = monitor.measure(probe_mlp()[0])
    assert {(r["layer"], r["metric"]) for r in rows} == {
        ("1", "dead_fraction"), ("3", "dead_fraction"), ("0", "weight_norm"), ("2", "weight_norm"), ("4", "weight_norm")
    }


# ---------------------------------------------------------------------------- plain loop + tidy rows
def test_plain_training_loop_with_maybe_measure() -> None:
    model = make_mlp()
    x_probe, y_probe = probe_mlp()
    monitor = Monitor(model, config=MonitorConfig(every=10, slow_every=1))  # every metric at every measurement
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(3)
    for step in range(25):  # hand-written SGD (torch.optim's first step imports torch._dynamo: seconds)
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        model.zero_grad()
        loss_fn(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad
        out = monitor.maybe_measure(x_probe, y_probe, loss_fn, step=step)
        assert (out is None) == (step % 10 != 0)
    frame = monitor.to_dataframe()
    assert list(frame.columns) == ["step", "layer", "metric", "value"]
    assert sorted(frame["step"].unique().tolist()) == [0, 10, 20]
    assert frame["value"].map(type).eq(float).all()
    assert set(frame["metric"]) <= set(METRIC_NAMES)
    expected_relu = {"dead_fraction", "dormant_fraction", "frozen_fraction", "saturated_fraction", "duplicate_fraction",
                     "effective_rank", "stable_rank", "correlation_rank", "numerical_rank"}
    assert set(frame.loc[frame["layer"] == "1", "metric"]) == expected_relu
    expected_linear = {"duplicate_fraction", "effective_rank", "stable_rank", "correlation_rank", "numerical_rank",
                       "weight_norm", "gradient_norm"}
    assert set(frame.loc[frame["layer"] == "0", "metric"]) == expected_linear
    assert set(frame.loc[frame["layer"] == "model", "metric"]) == {"loss"}
    # summary: layers x metrics of the latest step; format_table mentions every layer
    table = monitor.summary()
    assert list(table.index) == ["0", "1", "2", "3", "4", "model"]
    last = [r for r in monitor.rows if r["step"] == 20]
    assert table.loc["1", "dead_fraction"] == values(last, "1", "dead_fraction")
    assert table.shape == (6, len({r["metric"] for r in last}))
    assert table.loc["model", "loss"] == frame.query("step == 20 and metric == 'loss'")["value"].item()
    text = monitor.format_table()
    assert "step 20" in text and "dead_fraction" in text and "\nmodel" in text
    assert monitor.latest()["model/loss"] == table.loc["model", "loss"]
    assert monitor.summary(step=0).shape == table.shape
    with pytest.raises(ValueError, match="measured steps"):
        monitor.summary(step=5)
    monitor.reset()
    assert monitor.rows == [] and monitor.to_dataframe().empty


def test_step_counter_when_step_is_none() -> None:
    monitor = Monitor(make_mlp(), metrics=["dead_fraction"])
    x = probe_mlp()[0]
    assert {r["step"] for r in monitor.measure(x)} == {0}
    assert {r["step"] for r in monitor.measure(x)} == {1}
    assert {r["step"] for r in monitor.measure(x, step=50)} == {50}


def test_loss_metrics_need_loss() -> None:
    monitor = Monitor(make_mlp())
    x, y = probe_mlp()
    no_loss = {r["metric"] for r in monitor.measure(x)}
    assert not no_loss & {"loss", "saturated_fraction", "gradient_norm"}
    with pytest.raises(ValueError, match="both probe_targets and loss_fn"):
        monitor.measure(x, y)


# ---------------------------------------------------------------------------- invariance of the model
def make_bn_mlp(seed: int = 0) -> nn.Sequential:
    """MLP with BatchNorm1d and Dropout (cheap double backward, so the Hessian can run in tests)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(192, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2)
    )


@pytest.mark.parametrize("with_loss", [False, True])
@pytest.mark.parametrize("make_model", [make_cnn, make_bn_mlp])
def test_measure_leaves_model_untouched(with_loss: bool, make_model) -> None:
    model = make_model()
    x, y = probe_cnn()
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    loss_fn(model(x * 2 + 1), y).backward()  # populate .grad and BN running stats
    model[-2].eval()  # a mixed train/eval state must be restored exactly
    model[1].weight.grad = None  # and a None grad must stay None
    state = copy.deepcopy(model.state_dict())
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    # the Hessian (double backward) is slow for CPU convs, so it runs on the MLP only
    hessian = make_model is make_bn_mlp
    monitor = Monitor(model, config=MonitorConfig(hessian=hessian, hessian_iterations=5))
    rows = monitor.measure(x, y if with_loss else None, loss_fn if with_loss else None)
    assert rows
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for name, p in model.named_parameters():
        if grads[name] is None:
            assert p.grad is None, name
        else:
            assert torch.equal(p.grad, grads[name]), name
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all_hooks_empty(model)
    assert any(r["metric"] == "hessian_top_eigenvalue" for r in rows) == (with_loss and hessian)


def test_hooks_removed_and_mode_restored_when_forward_fails() -> None:
    model = make_mlp()
    model.train()
    with pytest.raises(RuntimeError):
        Monitor(model).measure(torch.randn(4, 5))  # wrong input width
    assert all_hooks_empty(model)
    assert all(m.training for m in model.modules())


def test_measure_inside_no_grad_still_gets_gradient_metrics() -> None:
    model = make_mlp()
    x, y = probe_mlp()
    with torch.no_grad():
        rows = Monitor(model).measure(x, y, nn.CrossEntropyLoss())
    assert math.isfinite(values(rows, "0", "gradient_norm"))


# ---------------------------------------------------------------------------- metric values vs independent computations
def test_dead_unit_counts_exactly_one() -> None:
    width = 16
    model = make_mlp(width)
    with torch.no_grad():
        model[0].bias[5] = -1e3  # unit 5 of the first hidden layer can never fire
    x, y = probe_mlp(128)
    quiet = MonitorConfig(warn_constant_units=False, warnings="error")  # the dead unit is expected; nothing else
    rows = Monitor(model, config=quiet).measure(x, y, nn.CrossEntropyLoss())
    # independent count with numpy
    h = np.maximum(x.numpy() @ model[0].weight.detach().numpy().T + model[0].bias.detach().numpy(), 0.0)
    dead = ((np.abs(h) < 1e-7).mean(axis=0) > 0.95).sum()
    assert dead == 1
    assert values(rows, "1", "dead_fraction") == 1 / width
    assert values(rows, "1", "frozen_fraction") == 1 / width  # ReLU: f'(z) = 0 exactly where dead


def test_norms_and_loss_match_independent_backward() -> None:
    model = make_mlp()
    x, y = probe_mlp()
    loss_fn = nn.CrossEntropyLoss()
    rows = Monitor(model).measure(x, y, loss_fn)
    twin = copy.deepcopy(model)
    loss = loss_fn(twin(x), y)
    loss.backward()
    assert values(rows, "model", "loss") == pytest.approx(loss.item(), rel=1e-6)
    for name in ("0", "2", "4"):
        layer = twin.get_submodule(name)
        grad_norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in layer.parameters()))
        weight_norm = math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in layer.parameters()))
        assert values(rows, name, "gradient_norm") == pytest.approx(grad_norm, rel=1e-5)
        assert values(rows, name, "weight_norm") == pytest.approx(weight_norm, rel=1e-5)


def test_conv_channels_are_units() -> None:
    model = make_cnn()
    x, _ = probe_cnn(8)
    monitor = Monitor(model, layers=["3"], metrics=["numerical_rank"], config=MonitorConfig(rank_max_samples=10_000))
    rows = monitor.measure(x)
    with torch.no_grad():
        model.eval()
        out = model[:4](x)  # (8, 5, 6, 6)
    matrix = out.permute(0, 2, 3, 1).reshape(-1, 5).double().numpy()
    assert values(rows, "3", "numerical_rank") == np.linalg.matrix_rank(matrix) == 5


def test_inplace_relu_does_not_corrupt_linear_metrics() -> None:
    x, y = probe_mlp()
    loss_fn = nn.CrossEntropyLoss()
    plain = Monitor(make_mlp(inplace=False)).measure(x, y, loss_fn)
    inplace = Monitor(make_mlp(inplace=True)).measure(x, y, loss_fn)
    assert [(r["layer"], r["metric"]) for r in plain] == [(r["layer"], r["metric"]) for r in inplace]
    for a, b in zip(plain, inplace):
        assert a["value"] == pytest.approx(b["value"], rel=1e-6, abs=1e-9, nan_ok=True), (a, b)


def test_hessian_top_eigenvalue_of_least_squares() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    x = torch.randn(32, 4) * torch.tensor([3.0, 1.0, 0.5, 0.2])
    y = torch.randn(32, 1)
    config = MonitorConfig(hessian=True, hessian_iterations=100)
    monitor = Monitor(model, metrics=["hessian_top_eigenvalue"], config=config)
    rows = monitor.measure(x, y, nn.MSELoss())
    xn = x.double().numpy()
    expected = np.linalg.eigvalsh(2.0 / 32 * xn.T @ xn).max()  # Hessian of mean squared error
    assert values(rows, "model", "hessian_top_eigenvalue") == pytest.approx(expected, rel=1e-2)


# ---------------------------------------------------------------------------- cloning R^2
def cloned_pair(seed: int = 0) -> tuple[nn.Sequential, nn.Sequential, torch.Tensor]:
    """A tanh net 5 -> 4 -> 2 and its x2 interleaved clone (rows of W1 repeated, W2 columns split)."""
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    clone = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        clone[0].weight.copy_(base[0].weight.repeat_interleave(2, dim=0))
        clone[0].bias.copy_(base[0].bias.repeat_interleave(2))
        clone[2].weight.copy_(base[2].weight.repeat_interleave(2, dim=1) / 2)
        clone[2].bias.copy_(base[2].bias)
    return base, clone, torch.arange(4).repeat_interleave(2)


def test_cloning_r2_exact_clones_then_perturbed() -> None:
    base, clone, blocks = cloned_pair()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 5, generator=g), torch.randn(64, 2, generator=g)
    assert torch.allclose(base(x), clone(x), atol=1e-6)  # function preserving
    partition = {"0": blocks, "1": blocks}
    monitor = Monitor(clone, partition=partition, metrics=["cloning_r2_forward", "cloning_r2_backward"])
    rows = monitor.measure(x, y, nn.MSELoss())
    assert len(rows) == 4
    for row in rows:
        assert row["value"] == pytest.approx(1.0, abs=1e-6), row

    with torch.no_grad():
        clone[0].weight.add_(0.3 * torch.randn(clone[0].weight.shape, generator=g))
        clone[2].weight.add_(0.3 * torch.randn(clone[2].weight.shape, generator=g))  # else dL/dh stays cloned
    rows = monitor.measure(x, y, nn.MSELoss())
    # the Monitor must feed cloning_r2 the layer output and dL/dh computed here by hand
    pre = x @ clone[0].weight.detach().T + clone[0].bias.detach()
    h = torch.tanh(pre).requires_grad_(True)
    loss = nn.functional.mse_loss(h @ clone[2].weight.detach().T + clone[2].bias.detach(), y)
    (grad_h,) = torch.autograd.grad(loss, h)
    grad_pre = grad_h * (1 - h.detach() ** 2)
    expected = {
        ("0", "cloning_r2_forward"): cloning_r2(pre, blocks),
        ("0", "cloning_r2_backward"): cloning_r2(grad_pre, blocks),
        ("1", "cloning_r2_forward"): cloning_r2(h.detach(), blocks),
        ("1", "cloning_r2_backward"): cloning_r2(grad_h, blocks),
    }
    for (layer, metric), value in expected.items():
        measured = values(rows, layer, metric)
        assert measured < 1 - 1e-3
        assert measured == pytest.approx(value, rel=1e-5)


def test_partition_validation() -> None:
    _, clone, blocks = cloned_pair()
    with pytest.raises(ValueError, match="not monitored"):
        Monitor(clone, layers=["1"], partition={"0": blocks})
    with pytest.raises(ValueError, match="1-D integer"):
        Monitor(clone, partition={"1": blocks.float()})
    monitor = Monitor(clone, partition={"1": torch.arange(5)})
    with pytest.raises(ValueError, match="5 block ids.*8 units"):
        monitor.measure(torch.randn(10, 5))
    assert all_hooks_empty(clone)


def test_partition_layer_outside_the_default_selection_is_monitored_when_layers_is_none() -> None:
    """A custom block named in the partition is measured (not an error) when the caller left layers=None."""

    class Block(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    _, clone, blocks = cloned_pair()
    wrapped = nn.Sequential(Block(clone[0]), clone[1], clone[2])
    x = torch.randn(32, 5, generator=torch.Generator().manual_seed(1))
    monitor = Monitor(wrapped, partition={"0": blocks}, metrics=["cloning_r2_forward"])
    names = [layer.name for layer in monitor.layers]
    assert "0" in names and names.index("0") < names.index("1")  # model order kept
    (row,) = [r for r in monitor.measure(x) if r["layer"] == "0"]
    assert row["value"] == pytest.approx(cloning_r2(clone[0](x).detach(), blocks), rel=1e-6)
    with pytest.raises(ValueError, match="not monitored"):
        Monitor(wrapped, layers=["1"], partition={"0": blocks})
    with pytest.raises(ValueError, match="not monitored"):
        Monitor(wrapped, partition={"nope": blocks})


# ---------------------------------------------------------------------------- bad input
def test_nan_input_gives_nan_rows_and_warning() -> None:
    model = make_mlp()
    x, y = probe_mlp()
    x[3, 2] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = Monitor(model).measure(x, y, nn.CrossEntropyLoss())
    lop = [str(w.message) for w in caught if issubclass(w.category, LopkitWarning)]
    for layer in ("0", "1", "2", "3", "4"):
        assert sum(f"layer {layer!r}" in m and "NaN" in m for m in lop) == 1, lop
        layer_rows = [r for r in rows if r["layer"] == layer and r["metric"] != "weight_norm"]
        assert layer_rows and all(math.isnan(r["value"]) for r in layer_rows)
    assert math.isfinite(values(rows, "0", "weight_norm"))


def test_small_probe_gives_nan_rank_with_warning() -> None:
    monitor = Monitor(make_mlp(), layers=["1"], metrics=["effective_rank", "stable_rank"])
    with pytest.warns(LopkitWarning, match="layer '1'") as record:
        rows = monitor.measure(torch.randn(1, 8))
    assert all(math.isnan(r["value"]) for r in rows) and len(rows) == 2
    assert {w.filename for w in record} == {__file__}  # attributed to the caller, not to lopkit
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        monitor.measure(torch.randn(1, 8))
    assert not again  # the same metric warning is not repeated at every measurement


def test_module_called_twice_gives_one_layer_per_call() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(8, 6), nn.Linear(6, 6), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.fc2(self.act(self.fc1(x))))

    torch.manual_seed(0)
    rows = Monitor(Shared(), layers=["act"], metrics=["dead_fraction"]).measure(probe_mlp()[0])
    assert [r["layer"] for r in rows] == ["act#0", "act#1"]


def test_rows_load_into_pandas() -> None:
    monitor = Monitor(make_cnn())
    monitor.measure(*probe_cnn(), loss_fn=nn.CrossEntropyLoss())
    frame = pd.DataFrame(monitor.rows)
    assert list(frame.columns) == ["step", "layer", "metric", "value"]
    assert frame.groupby(["layer", "metric"]).size().max() == 1
    assert frame["value"].notna().any()


def test_rank_metrics_match_pure_functions() -> None:
    """The Monitor shares one spectrum between effective and numerical rank; values must equal the pure functions."""
    from lopkit.diagnostics.rank import correlation_rank, effective_rank, numerical_rank, stable_rank

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12))
    with torch.no_grad():  # make the second hidden layer rank-deficient (rank 3)
        model[2].weight.copy_(torch.randn(12, 3) @ torch.randn(3, 12))
        model[2].bias.zero_()
    x = torch.randn(40, 6)
    rows = Monitor(model).measure(x)
    with torch.no_grad():
        outputs = {"0": model[0](x), "1": model[:2](x), "2": model(x)}
    for name, h in outputs.items():
        assert values(rows, name, "effective_rank") == pytest.approx(effective_rank(h), rel=1e-9)
        assert values(rows, name, "numerical_rank") == numerical_rank(h)
        assert values(rows, name, "stable_rank") == pytest.approx(stable_rank(h), rel=1e-9)
        assert values(rows, name, "correlation_rank") == pytest.approx(correlation_rank(h), rel=1e-9)
    assert values(rows, "2", "numerical_rank") == np.linalg.matrix_rank(outputs["2"].numpy()) == 3  # float32 tolerance


def test_frozen_first_layer_still_gets_output_gradients() -> None:
    """A layer with no trainable parameter upstream still gets dL/dh; a frozen module reports no gradient_norm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 1))
    for p in model[0].parameters():
        p.requires_grad_(False)
    x, y = torch.randn(30, 5), torch.randn(30, 1)
    rows = Monitor(model, partition={"1": torch.tensor([0, 0, 1, 1, 2, 2])}).measure(x, y, nn.MSELoss())
    assert not [r for r in rows if r["layer"] == "0" and r["metric"] == "gradient_norm"]
    h = torch.tanh(model[0](x)).requires_grad_(True)
    (grad_h,) = torch.autograd.grad(nn.functional.mse_loss(model[2](h), y), h)
    expected = cloning_r2(grad_h, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert values(rows, "1", "cloning_r2_backward") == pytest.approx(expected)


def test_sequence_outputs_with_channels_last() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.GELU())
    x = torch.randn(3, 7, 5)
    rows = Monitor(model, metrics=["numerical_rank"], config=MonitorConfig(channels_last=True)).measure(x)
    with torch.no_grad():
        expected = np.linalg.matrix_rank(model(x).reshape(21, 6).numpy())
    assert values(rows, "0", "numerical_rank") == values(rows, "1", "numerical_rank") == expected == 6


def test_format_table_marks_unmeasured_cells_and_skips_tuple_outputs() -> None:
    class TupleOut(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.pair = nn.Linear(8, 4), TupleOut()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pair(self.fc(x))[0]

    monitor = Monitor(Net(), layers=["fc", "pair"], metrics=["weight_norm", "effective_rank"])
    with pytest.warns(LopkitWarning, match="returns tuple, not a tensor"):
        monitor.measure(torch.randn(16, 8))
    lines = monitor.format_table().splitlines()
    assert lines[0] == "step 0" and lines[1].split() == ["layer", "effective_rank", "weight_norm"]
    assert lines[3].split()[0] == "fc" and len(lines) == 4


# ---------------------------------------------------------------------------- fused (cheaper) metric paths
def wide_relu_mlp(seed: int = 0) -> nn.Sequential:
    """ReLU MLP 20 -> 150 -> 150 -> 3: wide enough (> 64 units) for the blocked Gram and similarity paths."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 150), nn.ReLU(), nn.Linear(150, 150), nn.ReLU(), nn.Linear(150, 3))


def numpy_duplicate_fraction(h: np.ndarray, threshold: float, absolute: bool = False) -> float:
    """Paper rule from the full float64 cosine matrix (zero-norm units are never duplicates)."""
    x = h.astype(np.float64)
    norms = np.linalg.norm(x, axis=0)
    alive = norms > 0
    cos = (x.T @ x) / np.outer(np.where(alive, norms, 1.0), np.where(alive, norms, 1.0))
    if absolute:
        cos = np.abs(cos)
    later = np.triu(np.ones_like(cos, dtype=bool), k=1)
    hits = (cos > threshold) & later & alive[None, :] & alive[:, None]
    return float(hits.any(axis=1).mean())


@pytest.mark.filterwarnings("ignore::lopkit.diagnostics.errors.LopkitWarning")
@pytest.mark.parametrize("probe_size", [100, 300])  # fewer and more samples than units
def test_fused_rank_and_duplicate_metrics_equal_pure_functions_on_wide_layers(probe_size: int) -> None:
    from lopkit.diagnostics.rank import correlation_rank, effective_rank, numerical_rank, stable_rank

    model = wide_relu_mlp()
    with torch.no_grad():  # cloned units (duplicates) and a dead unit in the first hidden layer
        model[0].weight[10:20] = model[0].weight[0:10] * 2.0
        model[0].bias[10:20] = model[0].bias[0:10] * 2.0
        model[0].bias[30] = -1e3
    x, y = torch.randn(probe_size, 20), torch.randint(0, 3, (probe_size,))
    rows = Monitor(model).measure(x, y, nn.CrossEntropyLoss())
    with torch.no_grad():
        outputs = {str(i): model[: i + 1](x) for i in range(5)}
    for name, h in outputs.items():
        assert values(rows, name, "effective_rank") == pytest.approx(effective_rank(h), rel=1e-10)
        assert values(rows, name, "numerical_rank") == numerical_rank(h)
        assert values(rows, name, "stable_rank") == pytest.approx(stable_rank(h), rel=1e-10)
        assert values(rows, name, "correlation_rank") == pytest.approx(correlation_rank(h), rel=1e-10)
        expected_duplicates = numpy_duplicate_fraction(h.numpy(), 0.95)
        assert values(rows, name, "duplicate_fraction") == pytest.approx(expected_duplicates, abs=1e-6)
    assert values(rows, "1", "duplicate_fraction") >= 10 / 150  # the ten clones count


def test_blocked_duplicate_rule_matches_numpy_for_every_option() -> None:
    from lopkit.diagnostics.similarity import duplicate_fraction, duplicate_unit_mask

    g = torch.Generator().manual_seed(4)
    h = torch.randn(60, 200, generator=g)
    h[:, 150:170] = h[:, 0:20] * 3.0 + 1e-3 * torch.randn(60, 20, generator=g)  # near-clones across blocks
    h[:, 180:190] = -h[:, 100:110]  # anti-correlated copies
    h[:, 199] = 0.0  # a zero unit: never a duplicate, even for a negative threshold
    for threshold in (0.95, 0.3, -0.2):
        for absolute in (False, True):
            expected = numpy_duplicate_fraction(h.numpy(), threshold, absolute)
            assert duplicate_fraction(h, threshold=threshold, absolute=absolute) == pytest.approx(expected, abs=1e-6)
    mask = duplicate_unit_mask(h)
    assert mask[0:20].all() and not mask[150:170].any() and not mask[199]


def test_relu_derivative_shortcut_equals_autograd() -> None:
    from lopkit.diagnostics.units import activation_derivative

    z = torch.randn(40, 6)
    z[0, 0], z[1, 1], z[2, 2], z[3, 3] = 0.0, float("nan"), -0.0, float("inf")
    leaf = z.clone().requires_grad_(True)
    torch.relu(leaf.clone()).sum().backward()  # autograd's convention at the kink and for NaN
    for activation in (nn.ReLU(), nn.ReLU(inplace=True), "relu", torch.relu):
        derivative = activation_derivative(z, activation)
        assert torch.equal(derivative, leaf.grad) and derivative.dtype == torch.float32
    assert activation_derivative(z.double(), nn.ReLU()).dtype == torch.float64


def test_weight_norm_without_float64_copies_handles_tiny_and_huge_weights() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.fill_(1e-25)  # squares underflow float32
        model[0].bias.zero_()
        model[2].weight.fill_(3e20)  # squares overflow float32
        model[2].bias.fill_(1.0)
    rows = Monitor(model, metrics=["weight_norm"]).measure(torch.randn(4, 3))
    assert values(rows, "0", "weight_norm") == pytest.approx(math.sqrt(6) * 1e-25, rel=1e-6)
    assert values(rows, "2", "weight_norm") == pytest.approx(math.sqrt(4 * 9e40 + 2), rel=1e-6)


# ----------------------------------------------------------------------------- issue 12, defect 6: probe shapes


def test_a_one_sample_probe_gives_nan_duplicates_with_a_warning_like_the_ranks():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.warns(LopkitWarning, match="duplicate units need at least 2 samples"):
        rows = Monitor(model).measure(torch.randn(1, 4))
    values = {(r["layer"], r["metric"]): r["value"] for r in rows}
    for layer in ("0", "1", "2"):
        assert math.isnan(values[(layer, "duplicate_fraction")]) and math.isnan(values[(layer, "effective_rank")])


def test_duplicate_fraction_of_one_sample_is_nan_not_a_fraction_of_signs():
    h = torch.tensor([[1.0, 2.0, 3.0, -1.0]])  # over one sample every positive unit has the same "direction"
    with pytest.warns(LopkitWarning, match="at least 2 samples"):
        assert math.isnan(duplicate_fraction(h))
    with pytest.warns(LopkitWarning):
        assert duplicate_clusters(h) == [] and not duplicate_unit_mask(h).any()


@pytest.mark.parametrize("model, probe, expected", [
    (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(4), r"expects a batch of shape \(N, 4\)"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), torch.randn(3, 8, 8), r"expects a batch of shape \(N, 3, H, W\)"),
])  # fmt: skip
def test_an_unbatched_probe_is_a_clear_error_naming_the_expected_shape(model, probe, expected):
    with pytest.raises(ValueError, match=expected):
        Monitor(model).measure(probe)
    Monitor(model).measure(torch.randn(5, *probe.shape))  # the batched probe is fine


def test_an_unbatched_probe_through_a_custom_forward_is_a_clear_error():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())

        def forward(self, x):
            return self.body(x)

    with pytest.raises(ValueError, match=r"layer 'body.0' produced an output of shape \(8,\), with no batch axis"):
        Monitor(Wrapped()).measure(torch.randn(4))
