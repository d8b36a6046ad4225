"""Tests for the Monitor's public API: metric registry, bounded rows, state_dict, warnings policy, transformers."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

import lopkit as lk
from lopkit.diagnostics.activations import dead_fraction
from lopkit.diagnostics.errors import LopkitWarning
from lopkit.diagnostics.metric_registry import MetricSpec, available_metrics, register_metric, unregister_metric
from lopkit.diagnostics.monitor import METRIC_NAMES, Monitor, MonitorConfig
from lopkit.diagnostics.rank import effective_rank

#: the dead units of these small models make the correlation rank drop constant units at every measurement
pytestmark = pytest.mark.filterwarnings("ignore::lopkit.diagnostics.errors.ConstantUnitWarning")


def make_mlp(seed: int = 0) -> nn.Sequential:
    """ReLU MLP 8 -> 12 -> 12 -> 3 with a dead unit in the first hidden layer."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    with torch.no_grad():
        model[0].bias[0] = -1e3
    return model


def probe(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed probe batch for make_mlp."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def value(rows: list[dict], layer: str, metric: str) -> float:
    """The single value of (layer, metric) in rows."""
    (found,) = [r["value"] for r in rows if r["layer"] == layer and r["metric"] == metric]
    return found


def mean_activation(ctx: lk.MetricContext) -> float:
    """User metric: mean of the layer output."""
    return float(ctx.output.mean())


def grad_abs_mean(ctx: lk.MetricContext) -> float:
    """User metric that needs dL/dh."""
    return float(ctx.output_grad.abs().mean())


# ---------------------------------------------------------------------------- metric registry
@pytest.fixture
def registered_metric():
    """Register a user metric for one test and remove it afterwards."""
    spec = lk.register_metric(lk.MetricSpec("mean_activation", mean_activation, layers=("activation",)))
    yield spec
    unregister_metric("mean_activation")


def test_registered_user_metric_end_to_end(registered_metric) -> None:
    assert "mean_activation" in available_metrics() and "mean_activation" not in METRIC_NAMES
    model = make_mlp()
    x, y = probe()
    monitor = Monitor(model)
    rows = monitor.measure(x, y, nn.CrossEntropyLoss())
    with torch.no_grad():
        h1, h2 = model[:2](x), model[:4](x)
    assert value(rows, "1", "mean_activation") == pytest.approx(float(h1.mean()), rel=1e-6)
    assert value(rows, "3", "mean_activation") == pytest.approx(float(h2.mean()), rel=1e-6)
    assert not [r for r in rows if r["metric"] == "mean_activation" and r["layer"] in {"0", "2", "4"}]
    assert "mean_activation" in monitor.summary().columns
    assert list(monitor.summary().columns)[-2:] == ["mean_activation", "loss"]  # user metrics before model rows
    only = Monitor(model, metrics=["mean_activation"]).measure(x)
    assert {(r["layer"], r["metric"]) for r in only} == {("1", "mean_activation"), ("3", "mean_activation")}
    with pytest.raises(ValueError, match="already registered"):
        register_metric(MetricSpec("mean_activation", mean_activation))
    with pytest.raises(ValueError, match="built-in"):
        register_metric(MetricSpec("dead_fraction", mean_activation))


def test_extra_metric_with_predicate_and_gradient_need() -> None:
    model = make_mlp()
    x, y = probe()
    spec = MetricSpec("grad_abs_mean", grad_abs_mean, layers=lambda info: info.name == "3", needs=("output_grad",))
    monitor = Monitor(model, extra_metrics=[spec])
    assert "grad_abs_mean" not in available_metrics()  # this Monitor only
    no_loss = monitor.measure(x)
    assert not [r for r in no_loss if r["metric"] == "grad_abs_mean"]  # needs a loss: skipped without one
    rows = monitor.measure(x, y, nn.CrossEntropyLoss())
    h = model[:4](x).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(nn.CrossEntropyLoss()(model[4](h), y), h)
    assert value(rows, "3", "grad_abs_mean") == pytest.approx(float(grad.abs().mean()), rel=1e-5)
    assert [r["layer"] for r in rows if r["metric"] == "grad_abs_mean"] == ["3"]


def test_metric_spec_validation() -> None:
    with pytest.raises(ValueError, match="layer kinds"):
        MetricSpec("m", mean_activation, layers=("convolution",))
    with pytest.raises(ValueError, match="unknown entries"):
        MetricSpec("m", mean_activation, needs=("hessian",))
    with pytest.raises(ValueError, match="identifier"):
        MetricSpec("my metric", mean_activation)
    with pytest.raises(ValueError, match="reserved"):
        MetricSpec("loss", mean_activation)
    assert MetricSpec("m", mean_activation, layers="weight").layers == ("parametric",)
    with pytest.raises(ValueError, match="clashes"):
        Monitor(make_mlp(), extra_metrics=[MetricSpec("dead_fraction_2", mean_activation)] * 2)


# ---------------------------------------------------------------------------- bounded rows
def test_sink_and_max_rows_keep_memory_bounded() -> None:
    x, y = probe()
    reference = Monitor(make_mlp())
    streamed: list[dict] = []
    bounded = Monitor(make_mlp(), sink=streamed.extend, max_rows=0)
    for step in range(3):
        expected = reference.measure(x, y, nn.CrossEntropyLoss(), step=step)
        got = bounded.measure(x, y, nn.CrossEntropyLoss(), step=step)
        assert got == expected
    assert streamed == reference.rows and bounded.rows == []
    assert bounded.latest() == reference.latest() and bounded.latest_step == 2
    assert bounded.format_table() == reference.format_table()
    with pytest.raises(ValueError, match="no measurement at step 0"):
        bounded.summary(0)
    last_two = Monitor(make_mlp(), max_rows=len(expected))
    for step in range(3):
        last_two.measure(x, y, nn.CrossEntropyLoss(), step=step)
    assert last_two.rows == expected
    with pytest.raises(ValueError, match="max_rows"):
        Monitor(make_mlp(), max_rows=-1)


# ---------------------------------------------------------------------------- state_dict
def test_state_dict_round_trip() -> None:
    x = torch.randn(1, 8)  # one sample: the rank metrics warn (and give NaN)
    first = Monitor(make_mlp(), metrics=["effective_rank", "dead_fraction"], max_rows=None)
    with pytest.warns(LopkitWarning):
        first.measure(x)
    first.measure(probe()[0])
    state = json.loads(json.dumps(first.state_dict()))  # plain, JSON-safe values
    second = Monitor(make_mlp(), metrics=["effective_rank", "dead_fraction"])
    second.load_state_dict(state)
    assert json.dumps(second.rows) == json.dumps(first.rows)  # NaN rows included (NaN != NaN)
    assert second.latest() == first.latest()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = second.measure(x)
    assert not [w for w in caught if issubclass(w.category, LopkitWarning)]  # already warned before the save
    assert {r["step"] for r in rows} == {2}  # the step counter goes on
    with pytest.raises(ValueError, match="version"):
        second.load_state_dict({"version": 99})
    with pytest.raises(ValueError, match="seed"):
        Monitor(make_mlp(), config=MonitorConfig(seed=3)).load_state_dict(state)


# ---------------------------------------------------------------------------- warnings policy
@pytest.mark.parametrize("policy", ["once", "always", "ignore", "error"])
def test_warnings_policy(policy: str) -> None:
    monitor = Monitor(make_mlp(), layers=["1"], metrics=["effective_rank"], config=MonitorConfig(warnings=policy))
    x = torch.randn(1, 8)
    if policy == "error":
        with pytest.raises(LopkitWarning, match="layer '1'"):
            monitor.measure(x)
        return
    counts = []
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            monitor.measure(x)
        counts.append(sum(issubclass(w.category, LopkitWarning) for w in caught))
    assert counts == {"once": [1, 0], "always": [1, 1], "ignore": [0, 0]}[policy]
    with pytest.raises(ValueError, match="warnings"):
        MonitorConfig(warnings="sometimes")


def test_constant_unit_warning_can_be_switched_off() -> None:
    model, (x, _) = make_mlp(), probe()  # unit 0 of layer "1" is dead: constant over the probe
    for flag, expected in ((True, 1), (False, 0)):
        monitor = Monitor(model, layers=["1"], metrics=["correlation_rank"],
                          config=MonitorConfig(warn_constant_units=flag))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = monitor.measure(x)
        assert sum("constant unit" in str(w.message) for w in caught) == expected
        assert math.isfinite(rows[0]["value"])


# ---------------------------------------------------------------------------- argument order
def test_maybe_measure_has_the_argument_order_of_measure() -> None:
    x, y = probe()
    loss = nn.CrossEntropyLoss()
    expected = Monitor(make_mlp()).measure(x, y, loss, step=10)
    assert Monitor(make_mlp(), MonitorConfig(every=5)).maybe_measure(x, y, loss, step=10) == expected
    assert Monitor(make_mlp(), MonitorConfig(every=5)).maybe_measure(x, y, loss_fn=loss, step=10) == expected
    assert Monitor(make_mlp(), MonitorConfig(every=5)).maybe_measure(x, y, loss, step=11) is None
    with pytest.warns(DeprecationWarning, match="argument order"):
        legacy = Monitor(make_mlp(), MonitorConfig(every=5)).maybe_measure(10, x, y, loss_fn=loss)
    assert legacy == expected
    with pytest.raises(ValueError, match="step="):
        Monitor(make_mlp()).maybe_measure(x, y, loss)


# ---------------------------------------------------------------------------- transformers
def tiny_transformer(seed: int = 0, nested: bool = False) -> nn.TransformerEncoder:
    """Two post-norm encoder layers, d_model 8, feed-forward 16, ReLU applied as a function."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=nested)


def test_transformer_encoder_mlp_activation_is_found_and_described() -> None:
    model = tiny_transformer()
    with torch.no_grad():
        model.layers[1].linear1.bias[:4] = -1e3  # four of 16 feed-forward units of layer 1 are dead
    tokens = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(2))
    monitor = Monitor(model, config=MonitorConfig(channels_last=True))
    text = monitor.describe()
    for i in (0, 1):
        assert f"layers.{i}.activation: activation; measures the input of 'layers.{i}.linear2'" in text
        assert f"layers.{i}.self_attn.out_proj: not measured" in text
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = monitor.measure(tokens)
    assert not [w for w in caught if "not called" in str(w.message)]
    model.eval()
    seen: dict[int, torch.Tensor] = {}
    handles = [model.layers[i].linear2.register_forward_pre_hook(
        lambda m, args, i=i: seen.__setitem__(i, args[0].detach())) for i in (0, 1)]
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    for i in (0, 1):
        h = seen[i].reshape(-1, 16)  # tokens as samples, the 16 feed-forward units as units
        assert value(rows, f"layers.{i}.activation", "dead_fraction") == dead_fraction(h)
        assert value(rows, f"layers.{i}.activation", "effective_rank") == pytest.approx(effective_rank(h), rel=1e-9)
    assert value(rows, "layers.1.activation", "dead_fraction") == 4 / 16
    assert value(rows, "layers.0.activation", "dead_fraction") == 0.0
    y = torch.randn(4, 6, 8)
    with_loss = monitor.measure(tokens, y, nn.MSELoss())
    assert math.isfinite(value(with_loss, "layers.0.activation", "saturated_fraction"))
    assert value(with_loss, "layers.0.activation", "frozen_fraction") == pytest.approx(
        float(((seen[0].reshape(-1, 16) == 0).float().mean(0) >= 0.99).float().mean()))


def test_custom_activation_class_is_monitored_by_its_name() -> None:
    class MySwish(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.sigmoid(x)

    class SwiGLU(nn.Module):  # gated: halves its units, not elementwise
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = x.chunk(2, dim=-1)
            return a * torch.sigmoid(b)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), MySwish(), nn.Linear(12, 12), SwiGLU(), nn.Linear(6, 2))
    monitor = Monitor(model)
    kinds = {layer.name: layer.kind for layer in monitor.layers}
    assert kinds == {"0": "parametric", "1": "activation", "2": "parametric", "4": "parametric"}
    assert "custom class, by its name" in monitor.describe()
    rows = monitor.measure(torch.randn(16, 8))
    assert {"dead_fraction", "frozen_fraction"} <= {r["metric"] for r in rows if r["layer"] == "1"}


def test_transformer_padding_mask_measures_only_the_real_tokens() -> None:
    model = tiny_transformer(nested=True).eval()  # torch drops padded tokens (nested tensors) without gradients
    tokens = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, -2:] = True  # the last two tokens of every sequence are padding
    monitor = Monitor(model, metrics=["effective_rank"], config=MonitorConfig(channels_last=True))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nested tensors is in prototype")  # torch's own notice
        rows = monitor.measure({"src": tokens, "src_key_padding_mask": mask})  # no grad: torch's nested fast path
    seen: list[torch.Tensor] = []
    handle = model.layers[0].linear2.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.enable_grad():  # gradients on: torch takes the padded path
        model(tokens, src_key_padding_mask=mask)
    handle.remove()
    real = seen[0][~mask]  # (16 real tokens, 16 units)
    assert value(rows, "layers.0.activation", "effective_rank") == pytest.approx(effective_rank(real), rel=1e-5)


def test_functional_activation_can_be_named_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_transformer()
    tokens = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(2))
    with caplog.at_level("INFO", logger="lopkit.monitor"):
        Monitor(model, config=MonitorConfig(channels_last=True))
    assert "layers.0.activation" in caplog.text and "input of 'layers.0.linear2'" in caplog.text
    named = Monitor(model, layers=["layers.1.activation", "layers.1.linear2"], metrics=["dead_fraction"],
                    config=MonitorConfig(channels_last=True))
    assert [layer.name for layer in named.layers] == ["layers.1.activation", "layers.1.linear2"]
    full = Monitor(model, metrics=["dead_fraction"], config=MonitorConfig(channels_last=True)).measure(tokens)
    assert named.measure(tokens) == [r for r in full if r["layer"] == "layers.1.activation"]
    with pytest.raises(ValueError, match="'layers.0.activation'"):  # listed among the available names
        Monitor(model, layers=["layers.0.actvation"])


def test_probe_schedule_state_carries_the_monitor_state() -> None:
    from lopkit.integrations.probe import ProbeSchedule

    def schedule() -> ProbeSchedule:
        return ProbeSchedule(torch.randn(1, 8), every=1, layers=["1"], metrics=["effective_rank"])

    first = schedule()
    with pytest.warns(LopkitWarning):
        first.measure(make_mlp(), step=0)  # one probe sample: the rank warns
    assert first.monitor.rows == []  # the history lives in the schedule only
    state = json.loads(json.dumps(first.state_dict()))
    resumed = schedule()
    resumed.load_state_dict(state)  # before its Monitor exists
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.measure(make_mlp(), step=1)
    assert not [w for w in caught if issubclass(w.category, LopkitWarning)]  # warned before the checkpoint
    assert [r["step"] for r in resumed.rows] == [0, 1]
