"""Tests for lopkit.benchmarks.models: MLP/CNN builders (layer order, norms, dropout, init, validation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lopkit.benchmarks.models import build_cnn, build_mlp, head_layer, zero_head_


def _names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_children()]


@pytest.mark.parametrize("norm", [None, "none", "batch", "layer"])
def test_mlp_layer_order_names_and_shapes(norm):
    torch.manual_seed(0)
    model = build_mlp(20, (8, 6), 4, norm=norm, dropout=0.25)
    has_norm = norm in ("batch", "layer")
    block = lambda i: [f"fc{i}"] + ([f"norm{i}"] if has_norm else []) + [f"act{i}", f"drop{i}"]
    assert _names(model) == ["flatten", *block(1), *block(2), "head"]
    assert isinstance(model, nn.Sequential)
    expected_norm = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}.get(norm)
    if expected_norm is not None:
        assert isinstance(model.norm1, expected_norm) and model.norm2.weight.shape == (6,)
    assert model.fc1.in_features == 20 and model.fc2.out_features == 6 and model.head.out_features == 4
    assert model(torch.randn(5, 20)).shape == (5, 4)
    assert model(torch.randn(5, 1, 4, 5)).shape == (5, 4)  # the leading Flatten takes images too


def test_mlp_forward_matches_manual_layernorm_before_relu():
    torch.manual_seed(1)
    model = build_mlp(7, (5,), 3, norm="layer").eval()
    with torch.no_grad():
        model.norm1.weight.copy_(torch.linspace(0.5, 1.5, 5))
        model.norm1.bias.copy_(torch.linspace(-0.3, 0.3, 5))
    x = torch.randn(4, 7, dtype=torch.float64)
    p = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    xn = x.numpy()
    z = xn @ p["fc1.weight"].T + p["fc1.bias"]
    zn = (z - z.mean(1, keepdims=True)) / np.sqrt(z.var(1, keepdims=True) + 1e-5)  # norm BEFORE the activation
    h = np.maximum(zn * p["norm1.weight"] + p["norm1.bias"], 0.0)
    expected = h @ p["head.weight"].T + p["head.bias"]
    got = model.double()(x).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


def test_affine_false_has_no_norm_parameters_and_dropout_zero_has_no_dropout():
    model = build_mlp(10, (4,), 2, norm="batch", affine=False)
    assert model.norm1.weight is None and not model.norm1.affine
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    cnn = build_cnn(1, 8, (3,), (4,), 2, norm="layer", affine=False)
    assert cnn.norm1.weight is None and cnn.norm2.weight is None


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_cnn_structure_norm_types_and_dropout_only_in_fc(norm):
    torch.manual_seed(0)
    model = build_cnn(1, 28, channels=(4, 6), fc=(10,), out_features=3, norm=norm, dropout=0.1)
    has_norm = norm is not None
    conv = lambda i: [f"conv{i}"] + ([f"norm{i}"] if has_norm else []) + [f"act{i}", f"pool{i}"]
    fc = ["fc3"] + (["norm3"] if has_norm else []) + ["act3", "drop3"]
    assert _names(model) == [*conv(1), *conv(2), "flatten", *fc, "head"]
    for name in ("conv1", "conv2"):
        layer = getattr(model, name)
        assert layer.kernel_size == (3, 3) and layer.padding == (1, 1) and layer.stride == (1, 1)
    assert model.fc3.in_features == 6 * 7 * 7  # two 2x2 pools: 28 -> 14 -> 7
    if norm == "layer":
        assert isinstance(model.norm1, nn.GroupNorm) and model.norm1.num_groups == 1 and model.norm1.num_channels == 4
        assert isinstance(model.norm3, nn.LayerNorm)
    if norm == "batch":
        assert isinstance(model.norm1, nn.BatchNorm2d) and isinstance(model.norm3, nn.BatchNorm1d)
    dropout_names = [n for n, m in model.named_children() if isinstance(m, nn.Dropout)]
    assert dropout_names == ["drop3"]  # FC part only
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)


def test_cnn_non_square_images_and_no_fc_layers():
    model = build_cnn(3, (12, 20), channels=(5,), fc=(), out_features=2)
    assert model.head.in_features == 5 * 6 * 10
    assert model(torch.randn(2, 3, 12, 20)).shape == (2, 2)


@pytest.mark.parametrize("init", ["kaiming_normal", "kaiming_uniform"])
def test_kaiming_init_has_he_variance_and_zero_bias(init):
    torch.manual_seed(0)
    model = build_mlp(400, (300,), 10, init=init)
    weight = model.fc1.weight.detach()
    assert math.isclose(weight.std().item(), math.sqrt(2.0 / 400), rel_tol=0.03)
    assert torch.count_nonzero(model.fc1.bias) == 0 and torch.count_nonzero(model.head.bias) == 0
    cnn = build_cnn(2, 8, (64,), (), 2, init=init)
    assert math.isclose(cnn.conv1.weight.std().item(), math.sqrt(2.0 / (2 * 9)), rel_tol=0.1)


def test_xavier_tanh_uses_tanh_gain():
    torch.manual_seed(0)
    model = build_mlp(300, (300,), 10, activation="tanh", init="xavier_normal")
    expected = (5.0 / 3.0) * math.sqrt(2.0 / 600)
    assert math.isclose(model.fc1.weight.std().item(), expected, rel_tol=0.03)
    assert isinstance(model.act1, nn.Tanh)


def test_default_init_keeps_pytorch_init():
    torch.manual_seed(3)
    model = build_mlp(30, (20,), 5)
    torch.manual_seed(3)
    reference = nn.Linear(30, 20)
    assert torch.equal(model.fc1.weight, reference.weight)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(in_features=0), "in_features"),
        (dict(hidden=(8, 0)), "hidden"),
        (dict(hidden=8), "sequence"),
        (dict(norm="group"), "norm"),
        (dict(activation="swishy"), "activation"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(affine="yes"), "affine"),
        (dict(init="orthogonal"), "init"),
        (dict(out_features=0), "out_features"),
    ],
)
def test_mlp_rejects_bad_arguments(kwargs, match):
    args = dict(in_features=10, hidden=(4,), out_features=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_mlp(**args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=4, channels=(2, 2, 2)), "too small"),
        (dict(image_size=(8,)), "image_size"),
        (dict(channels=()), "channels"),
        (dict(in_channels=0), "in_channels"),
        (dict(norm="instance"), "norm"),
    ],
)
def test_cnn_rejects_bad_arguments(kwargs, match):
    args = dict(in_channels=1, image_size=8, channels=(2,), fc=(3,), out_features=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_cnn(**args)


def test_head_zeroing_and_lookup():
    model = build_mlp(6, (4,), 3)
    assert head_layer(model) is model.head
    zero_head_(model)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert torch.count_nonzero(model.fc1.weight) > 0
    plain = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert head_layer(plain) is plain[2]
    with pytest.raises(ValueError, match="no nn.Linear"):
        head_layer(nn.Sequential(nn.ReLU()))


def test_models_work_with_clone_and_monitor():
    from lopkit.diagnostics.monitor import Monitor
    from lopkit.theory.cloning import clone

    torch.manual_seed(0)
    for model, x in (
        (build_mlp(12, (6, 6), 3, norm="layer"), torch.randn(16, 12)),
        (build_cnn(1, 8, (3, 4), (5,), 3, norm="batch"), torch.randn(16, 1, 8, 8)),
    ):
        model.eval()
        cloned, partition = clone(model, 2)
        torch.testing.assert_close(cloned.eval()(x), model(x), rtol=1e-5, atol=1e-5)
        assert "act1" in partition
        rows = Monitor(model, metrics=["dead_fraction"]).measure(x)
        assert {r["layer"] for r in rows} >= {"act1", "act2"}


def test_every_benchmark_model_uses_the_same_readable_layer_names():
    import re

    from lopkit.benchmarks.base import get_benchmark
    from lopkit.benchmarks.bitflip import build_learner
    from lopkit.benchmarks.continual import build_model
    from lopkit.benchmarks.toy import build_toy_model

    readable = re.compile(r"^(flatten|head|(fc|act|norm|drop|conv|pool)[1-9][0-9]*)$")
    continual = get_benchmark("class_split")
    models = {
        "continual mlp": build_model(continual.make_config("e1_5way", {"norm": "layer", "dropout": 0.1})),
        "continual cnn": build_model(continual.make_config("smoke", {"model": "cnn", "norm": "batch"})),
        "toy": build_toy_model(get_benchmark("toy").make_config("smoke"), 0),
        "bitflip": build_learner(get_benchmark("bitflip").make_config("smoke"), 0),
    }
    for what, model in models.items():
        names = [name for name, _ in model.named_children()]
        assert names and all(readable.match(name) for name in names), (what, names)
        assert names[-1] == "head" and any(name.startswith("act") for name in names), (what, names)
