"""Tests of the architectural mitigations: inserted modules and their place, shapes, CReLU widths, NaP projection."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lopkit.benchmarks.base import get_benchmark
from lopkit.benchmarks.models import build_cnn, build_mlp
from lopkit.configs import ConfigError, build_config
from lopkit.diagnostics.errors import LopkitWarning
from lopkit.diagnostics.monitor import Monitor, MonitorConfig
from lopkit.mitigations.architecture import (
    BatchNormInsertion,
    CReLU,
    CReLUActivation,
    DropoutInsertion,
    LayerNormInsertion,
    NormalizeAndProject,
)
from lopkit.mitigations.registry import build_methods, get_method
from lopkit.theory.unit_maps import layer_wiring

MLP_INPUT = (6, 12)
CNN_INPUT = (6, 3, 8, 8)


def mlp(**kwargs) -> nn.Sequential:
    """A small 2-hidden-layer MLP (12 -> 16 -> 10 -> 4)."""
    torch.manual_seed(0)
    return build_mlp(12, (16, 10), 4, **kwargs)


def cnn(**kwargs) -> nn.Sequential:
    """A small CNN: conv(3->4), conv(4->6) on 8x8 inputs, fc 10, head 4."""
    torch.manual_seed(0)
    return build_cnn(3, 8, (4, 6), (10,), 4, **kwargs)


def names(model: nn.Module) -> list[str]:
    """Top-level child names in order."""
    return [name for name, _ in model.named_children()]


def train_a_few_steps(model: nn.Module, method, input_shape, steps: int = 5) -> list[float]:
    """Plain training loop with every hook; returns the losses."""
    torch.manual_seed(1)
    model = method.prepare_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    method.attach(model, optimizer)
    method.on_task_start(model, optimizer, 0)
    x, y = torch.randn(*input_shape), torch.randint(0, 4, (input_shape[0],))
    losses = []
    for step in range(steps):
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        extra = method.loss_term(model)
        total = loss if extra is None else loss + extra
        optimizer.zero_grad()
        total.backward()
        method.before_step(model, optimizer, step)
        optimizer.step()
        method.after_step(model, optimizer, step)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    return losses


# ---------------------------------------------------------------------------------------------- norms


def test_layernorm_goes_between_each_hidden_layer_and_its_activation():
    original = mlp()
    prepared = LayerNormInsertion().prepare_model(original)
    assert names(prepared) == ["flatten", "fc1", "norm1", "act1", "fc2", "norm2", "act2", "head"]
    assert isinstance(prepared.norm1, nn.LayerNorm) and tuple(prepared.norm1.normalized_shape) == (16,)
    assert tuple(prepared.norm2.normalized_shape) == (10,) and prepared.norm2.weight is not None
    assert names(original) == ["flatten", "fc1", "act1", "fc2", "act2", "head"]  # the input is left alone
    torch.testing.assert_close(prepared.head.weight, original.head.weight)
    x = torch.randn(*MLP_INPUT)
    assert prepared(x).shape == original(x).shape
    # each sample's normalised pre-activations have mean 0 and variance 1
    z = prepared.norm1(prepared.fc1(x))
    torch.testing.assert_close(z.mean(dim=1), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(dim=1, unbiased=False), torch.ones(6), atol=1e-3, rtol=0)


def test_layernorm_on_a_cnn_uses_groupnorm_for_conv_layers():
    prepared = LayerNormInsertion(LayerNormInsertion.Config(affine=False)).prepare_model(cnn())
    assert names(prepared) == [
        "conv1", "norm1", "act1", "pool1", "conv2", "norm2", "act2", "pool2", "flatten", "fc3", "norm3", "act3", "head",
    ]  # fmt: skip
    assert isinstance(prepared.norm1, nn.GroupNorm)
    assert (prepared.norm1.num_groups, prepared.norm1.num_channels) == (1, 4)
    assert isinstance(prepared.norm3, nn.LayerNorm)
    assert sum(p.numel() for m in (prepared.norm1, prepared.norm2, prepared.norm3) for p in m.parameters()) == 0
    assert prepared(torch.randn(*CNN_INPUT)).shape == (6, 4)


def test_batchnorm_types_and_affine_option():
    prepared = BatchNormInsertion().prepare_model(cnn())
    assert isinstance(prepared.norm1, nn.BatchNorm2d) and prepared.norm1.num_features == 4
    assert isinstance(prepared.norm3, nn.BatchNorm1d) and prepared.norm3.num_features == 10
    plain = get_method("batchnorm", {"affine": "false"}).prepare_model(mlp())
    assert isinstance(plain.norm1, nn.BatchNorm1d) and plain.norm1.weight is None
    assert plain(torch.randn(*MLP_INPUT)).shape == (6, 4)


def test_no_second_norm_is_inserted():
    with_layer_norm = mlp(norm="layer")
    same = LayerNormInsertion().prepare_model(with_layer_norm)
    assert names(same) == names(with_layer_norm)
    with pytest.warns(LopkitWarning, match="already has a LayerNorm"):
        other = BatchNormInsertion().prepare_model(with_layer_norm)
    assert names(other) == names(with_layer_norm)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in other.modules())


def test_nested_and_numbered_sequentials_are_renumbered():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(5, 7), nn.Tanh()), nn.Linear(7, 2))
    prepared = LayerNormInsertion().prepare_model(model)
    inner = prepared[0]
    assert [type(m) for m in inner] == [nn.Linear, nn.LayerNorm, nn.Tanh]
    assert names(inner) == ["0", "1", "2"]
    assert prepared(torch.randn(3, 5)).shape == (3, 2)


def test_models_without_hidden_layers_are_rejected():
    with pytest.raises(ValueError, match="Sequential"):
        LayerNormInsertion().prepare_model(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="no hidden layer"):
        LayerNormInsertion().prepare_model(nn.Sequential(nn.Linear(3, 2)))


# ---------------------------------------------------------------------------------------------- dropout


def test_dropout_goes_after_each_hidden_activation():
    prepared = DropoutInsertion().prepare_model(mlp(norm="batch"))
    assert names(prepared) == ["flatten", "fc1", "norm1", "act1", "drop1", "fc2", "norm2", "act2", "drop2", "head"]
    assert prepared.drop1.p == 0.1
    x = torch.randn(*MLP_INPUT)
    prepared.eval()
    torch.testing.assert_close(prepared(x), prepared(x))
    prepared.train()
    torch.manual_seed(0)
    first = prepared(x)
    assert not torch.equal(first, prepared(x))  # fresh masks each forward in train mode


def test_dropout_skips_conv_layers_unless_asked_and_never_doubles():
    default = DropoutInsertion().prepare_model(cnn())
    assert [n for n in names(default) if n.startswith("drop")] == ["drop3"]
    everywhere = get_method("dropout", {"p": "0.2", "include_conv": "true"}).prepare_model(cnn())
    assert names(everywhere)[:5] == ["conv1", "act1", "drop1", "pool1", "conv2"]
    assert everywhere.drop1.p == 0.2
    already = mlp(dropout=0.3)
    with pytest.warns(LopkitWarning, match="no dropout layer was inserted"):
        same = DropoutInsertion().prepare_model(already)
    assert names(same) == names(already)


# ---------------------------------------------------------------------------------------------- CReLU


def test_crelu_module_concatenates_positive_and_negative_parts():
    x = torch.randn(5, 3, 2, 2)
    out = CReLU(dim=1)(x).numpy()
    expected = np.concatenate([np.maximum(x.numpy(), 0), np.maximum(-x.numpy(), 0)], axis=1)
    np.testing.assert_array_equal(out, expected)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_crelu_doubles_the_next_layers_input_and_keeps_shapes():
    original = mlp()
    prepared = CReLUActivation(CReLUActivation.Config(seed=0)).prepare_model(original)
    assert isinstance(prepared.act1, CReLU) and isinstance(prepared.act2, CReLU)
    assert (prepared.fc1.in_features, prepared.fc1.out_features) == (12, 16)
    assert (prepared.fc2.in_features, prepared.head.in_features) == (32, 20)
    torch.testing.assert_close(prepared.fc1.weight, original.fc1.weight)  # unchanged shape: kept as is
    # closed form: 12*16+16 + 32*10+10 + 20*4+4
    assert parameter_count(prepared) == 12 * 16 + 16 + 32 * 10 + 10 + 20 * 4 + 4
    x = torch.randn(*MLP_INPUT)
    assert prepared(x).shape == original(x).shape


def test_crelu_halve_width_keeps_every_later_layers_input_dimension():
    prepared = get_method("crelu", {"halve_width": "true", "seed": "0"}).prepare_model(mlp(norm="layer"))
    assert (prepared.fc1.out_features, prepared.fc2.in_features, prepared.fc2.out_features) == (8, 16, 5)
    assert prepared.head.in_features == 10
    assert tuple(prepared.norm1.normalized_shape) == (8,) and tuple(prepared.norm2.normalized_shape) == (5,)
    assert parameter_count(prepared) == (12 * 8 + 8) + 2 * 8 + (16 * 5 + 5) + 2 * 5 + (10 * 4 + 4)
    assert prepared(torch.randn(*MLP_INPUT)).shape == (6, 4)


def test_crelu_on_a_cnn_widens_conv_and_flattened_inputs():
    prepared = CReLUActivation(CReLUActivation.Config(seed=0)).prepare_model(cnn())
    assert prepared.conv2.in_channels == 8
    assert prepared.fc3.in_features == 2 * 6 * 2 * 2  # 2 x channels x (8/2/2)^2
    assert prepared.head.in_features == 20
    assert prepared(torch.randn(*CNN_INPUT)).shape == (6, 4)


def test_crelu_rebuilt_layers_follow_the_default_init_law_at_the_new_fan_in():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 300), nn.ReLU(), nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 3))
    prepared = CReLUActivation(CReLUActivation.Config(seed=4)).prepare_model(model)
    weight = prepared[2].weight.detach().double().numpy()
    bound = 1 / math.sqrt(600)  # PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) at the doubled fan-in
    assert np.abs(weight).max() <= bound * 1.05
    assert weight.std() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    again = CReLUActivation(CReLUActivation.Config(seed=4)).prepare_model(model)
    torch.testing.assert_close(again[2].weight, prepared[2].weight, rtol=0, atol=0)


def test_crelu_warns_when_replacing_a_non_relu_activation():
    with pytest.warns(LopkitWarning, match="Tanh"):
        prepared = CReLUActivation().prepare_model(mlp(activation="tanh"))
    assert isinstance(prepared.act1, CReLU)


def test_monitor_measures_every_crelu_output_feature_as_a_unit():
    model = nn.Sequential(nn.Linear(2, 2), CReLU(dim=-1), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.copy_(torch.tensor([5.0, 0.0]))
    t = torch.linspace(-1.0, 1.0, 64)
    x = torch.stack([t, t.flip(0)], dim=1)  # z0 = x0 + 5 > 0 on every sample, z1 = x1 takes both signs
    # units [relu(z0), relu(z1), relu(-z0), relu(-z1)]: relu(-z0) is 0 everywhere (dead, and frozen: ReLU'(-z0) = 0)
    assert CReLU(dim=-1).unit_activation(CReLU(dim=-1).unit_pre_activation(x)).tolist() == CReLU(dim=-1)(x).tolist()
    monitor = Monitor(model, config=MonitorConfig(seed=0))
    assert "1" in [layer.name for layer in monitor.layers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LopkitWarning)  # the dead feature is a constant unit
        rows = {r["metric"]: r["value"] for r in monitor.measure(x, step=0) if r["layer"] == "1"}
    assert rows["dead_fraction"] == 0.25 and rows["frozen_fraction"] == 0.25  # 1 unit of 4: the 2H features
    assert layer_wiring(model)["2"] == ("2", "1")  # the same 4 units are the columns of the next layer
    # (z0, relu(z1), relu(-z1), 0): 4 units of rank 3 (an H-unit view would have at most rank 2)
    assert rows["numerical_rank"] == 3


def test_crelu_runs_on_the_e1_preset_with_monitor_rows_for_its_layers():
    cls = get_benchmark("random_labels")
    config = cls.make_config("e1", {"num_tasks": 2, "steps_per_task": 5})
    assert config.monitor_layers == "activations"
    bench = cls(config, 0, build_methods("crelu"))
    rows = bench.run(bench.total_steps)
    crelu_layers = {name for name, m in bench.model.named_modules() if isinstance(m, CReLU)}
    assert len(crelu_layers) == 5
    fractions = [r for r in rows if r["layer"] in crelu_layers and r["metric"].endswith("_fraction")]
    assert {r["layer"] for r in fractions} == crelu_layers
    assert {"dead_fraction", "dormant_fraction", "frozen_fraction", "duplicate_fraction"} <= {r["metric"] for r in fractions}
    assert all(0.0 <= r["value"] <= 1.0 for r in fractions)
    ranks = [r["value"] for r in rows if r["layer"] in crelu_layers and r["metric"] == "numerical_rank"]
    assert ranks and max(ranks) <= 2 * config.width and max(ranks) > config.width  # 2H units, more than H of rank


def test_unit_resets_refuse_crelu_layers_with_a_clear_message():
    model = CReLUActivation(CReLUActivation.Config(seed=0)).prepare_model(mlp())
    method = build_methods("redo")
    with pytest.raises(ValueError, match="CReLU-like"):
        method.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))


# ---------------------------------------------------------------------------------------------- NaP


def nap_training(method: NormalizeAndProject, steps: int = 10):
    """Train a NaP MLP with a large lr; yield (model, output before projection, output after) each step."""
    model = method.prepare_model(mlp())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    method.attach(model, optimizer)
    torch.manual_seed(0)
    x, y = torch.randn(32, 12), torch.randint(0, 4, (32,))
    for step in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            before = model(x)
            method.after_step(model, optimizer, step)
            yield model, before, model(x)


def norm_of(*params: torch.Tensor) -> float:
    return math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in params))


def test_nap_keeps_hidden_weight_norms_at_their_initial_values():
    method = NormalizeAndProject()
    model = method.prepare_model(mlp())
    assert isinstance(model.norm1, nn.LayerNorm) and isinstance(model.norm2, nn.LayerNorm)
    method.attach(model, None)
    initial = {name: norm_of(getattr(model, name).weight) for name in ("fc1", "fc2", "head")}
    assert method.initial_norms == pytest.approx({"fc1.weight": initial["fc1"], "fc2.weight": initial["fc2"]})
    for model, _before, _after in nap_training(method):
        pass
    for name in ("fc1", "fc2"):
        assert norm_of(getattr(model, name).weight) == pytest.approx(initial[name], rel=1e-5)
    assert norm_of(model.head.weight) != pytest.approx(initial["head"], rel=1e-3)  # the output layer is free


def test_nap_with_bias_projects_the_pair_and_preserves_the_function_exactly():
    method = NormalizeAndProject(NormalizeAndProject.Config(with_bias=True))
    targets = {}
    for model, before, after in nap_training(method):
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
        targets = {key: norm_of(*params) for key, params in method.projected_parameters(model)}
    assert set(targets) == {"fc1.weight+fc1.bias", "fc2.weight+fc2.bias"}
    assert targets == pytest.approx(method.initial_norms, rel=1e-5)


def test_nap_project_affine_and_state_round_trip():
    method = get_method("nap", {"project_affine": "true"})
    model = method.prepare_model(cnn())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    method.attach(model, optimizer)
    assert set(method.initial_norms) == {
        "conv1.weight", "conv2.weight", "fc3.weight", "norm1.weight", "norm2.weight", "norm3.weight",
    }  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    method.after_step(model, optimizer, 0)
    assert norm_of(model.norm1.weight) == pytest.approx(2.0, rel=1e-6)  # ones(4) has norm 2
    resumed = NormalizeAndProject(NormalizeAndProject.Config(project_affine=True))
    resumed.attach(model, optimizer)  # now sees the scaled weights
    resumed.load_state_dict(method.state_dict())
    assert resumed.initial_norms == method.initial_norms


def test_nap_needs_attach_and_a_normalised_model():
    with pytest.raises(RuntimeError, match="attach"):
        NormalizeAndProject().after_step(mlp(), None, 0)
    with pytest.raises(ValueError, match="prepare_model"):
        NormalizeAndProject().attach(mlp(), None)


# ---------------------------------------------------------------------------------------------- training + configs


SPECS = ["layernorm", "batchnorm", "dropout", "crelu", "nap", "layernorm:affine=false,dropout"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_prepared_models_train(spec, kind):
    method = build_methods(spec)
    model, shape = (mlp(), MLP_INPUT) if kind == "mlp" else (cnn(), CNN_INPUT)
    losses = train_a_few_steps(model, method, shape, steps=5)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "cls, overrides, match",
    [(DropoutInsertion, {"p": 0.0}, "p must"), (DropoutInsertion, {"p": 1.0}, "p must"),
     (DropoutInsertion, {"p": -0.2}, "p must"), (CReLUActivation, {"seed": -1}, "seed"),
     (LayerNormInsertion, {"affine": "maybe"}, "affine"),
     (NormalizeAndProject, {"project_affine": "2"}, "project_affine"),
     (BatchNormInsertion, {"momentum": 0.1}, "unknown config key")],
)  # fmt: skip
def test_bad_hyper_parameters_raise(cls, overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_config(cls.Config, overrides)


def test_registered_names():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("layernorm", "batchnorm", "dropout", "crelu", "nap"):
            assert get_method(name).name == name
