"""model=resnet|vit in the continual and cloning benchmarks, and the Monitor on them (token-wise units, heads)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lopkit.benchmarks.architectures import SmallResNet, SmallViT, build_resnet, build_vit
from lopkit.benchmarks.cloning import CloningBenchmark, activation_layer_names
from lopkit.benchmarks.continual import ClassSplitBenchmark, RandomLabelsBenchmark, build_model
from lopkit.configs import ConfigError
from lopkit.data.errors import DatasetNotFoundError
from lopkit.data.fashion_mnist import fashion_mnist_dir
from lopkit.diagnostics.activations import dead_fraction
from lopkit.diagnostics.heads import duplicate_heads_fraction, head_unit_matrix
from lopkit.diagnostics.monitor import Monitor, MonitorConfig, token_wise_layers
from lopkit.diagnostics.rank import effective_rank
from lopkit.theory.cloning import clone


def _fashion_mnist_available() -> bool:
    try:
        fashion_mnist_dir()
    except DatasetNotFoundError:
        return False
    return True


needs_data = pytest.mark.skipif(not _fashion_mnist_available(), reason="Fashion-MNIST not installed")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def value(rows: list[dict], layer: str, metric: str) -> float:
    """The single value of (layer, metric) in rows."""
    found = [r["value"] for r in rows if r["layer"] == layer and r["metric"] == metric]
    assert len(found) == 1, (layer, metric, found)
    return found[0]


# ----------------------------------------------------------------------------- continual configs and models
def test_continual_builds_resnet_and_vit_from_the_config():
    resnet = build_model(ClassSplitBenchmark.make_config("resnet_default"))
    assert isinstance(resnet, SmallResNet) and [b.conv2.out_channels for b in resnet.blocks()] == [8, 16, 32]
    assert isinstance(resnet.block1.norm1, nn.BatchNorm2d)
    config = ClassSplitBenchmark.make_config("vit_t3", {"vit_dim": 24, "vit_heads": 3, "vit_depth": 3})
    vit = build_model(config)
    assert isinstance(vit, SmallViT) and vit.depth == 3 and vit.block1.attn.heads == 3
    assert isinstance(vit.block1.norm1, nn.Identity) and isinstance(vit.norm, nn.Identity)  # T3: no LayerNorm
    normalised = build_model(ClassSplitBenchmark.make_config("vit_t4"))
    assert isinstance(normalised.block2.norm2, nn.LayerNorm)
    assert vit(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"model": "vit", "norm": "batch"}, "norm"),
        ({"model": "vit", "vit_dim": 30, "vit_heads": 4}, "divisible"),
        ({"model": "vit", "vit_patch": 5}, "vit_patch"),
        ({"model": "resnet", "activation": "tanh"}, "activation"),
        ({"model": "resnet", "init": "kaiming_normal"}, "init"),
        ({"model": "resnet", "resnet_blocks": 0}, "resnet_blocks"),
        ({"model": "transformer"}, "model must be one of"),
    ],
)
def test_continual_rejects_impossible_architecture_settings(overrides, words):
    with pytest.raises(ConfigError, match=words):
        ClassSplitBenchmark.make_config("smoke", overrides)


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("preset", ["vit_smoke", "resnet_smoke"])
def test_continual_smoke_runs_and_monitors_blocks(preset):
    metrics = ("dead_fraction", "duplicate_fraction", "duplicate_heads_fraction", "effective_rank", "loss")
    bench = ClassSplitBenchmark(ClassSplitBenchmark.make_config(preset, {"monitor_metrics": metrics,
                                                                         "num_tasks": 2, "steps_per_task": 10}), 0)
    rows = bench.run(bench.total_steps)
    layers = {r["layer"] for r in rows if r["metric"] == "duplicate_fraction"}
    assert {"block1", "block2" if preset == "resnet_smoke" else "block1"} <= layers
    heads = [r for r in rows if r["metric"] == "duplicate_heads_fraction"]
    if preset == "vit_smoke":
        assert {r["layer"] for r in heads} == {"block1.attn.o"} and all(0 <= r["value"] <= 1 for r in heads)
        assert all(r["value"] <= 16 for r in rows if r["layer"] == "block1" and r["metric"] == "effective_rank")
    else:
        assert not heads
    assert any(r["metric"] == "task_online_accuracy" for r in rows)


@needs_data
def test_random_labels_takes_a_vit():
    config = RandomLabelsBenchmark.make_config("smoke", {"model": "vit", "vit_dim": 8, "vit_heads": 2, "vit_depth": 1,
                                                         "norm": "none", "monitor": False})
    bench = RandomLabelsBenchmark(config, 0)
    assert isinstance(bench.model, SmallViT)
    assert any(r["metric"] == "online_accuracy" for r in bench.run(40))


# ----------------------------------------------------------------------------- the Monitor on ViT and ResNet
def test_token_wise_rule_picks_features_for_transformer_layers_and_channels_for_conv():
    vit, resnet = build_vit(dim=16, heads=2, depth=1), build_resnet(channels=(4, 8))
    wise = token_wise_layers(vit)
    assert {"block1.mlp.act", "block1", "block1.norm1", "norm", "embed"} <= wise
    assert "embed.proj" not in wise
    assert not {"stem_act", "block1.act1", "block1", "block2", "block1.norm1"} & token_wise_layers(resnet)


def test_monitor_reads_vit_gelu_features_as_units_and_tokens_as_samples():
    torch.manual_seed(0)
    vit = build_vit(dim=16, heads=2, depth=1).eval()
    with torch.no_grad():
        vit.block1.mlp.fc1.bias[:5] = -1e3  # 5 of the 32 hidden GELU features are off on every token
    x = torch.randn(8, 1, 28, 28)
    seen = {}
    handle = vit.block1.mlp.act.register_forward_hook(lambda m, a, out: seen.__setitem__("h", out.detach()))
    with torch.no_grad():
        vit(x)
    handle.remove()
    h = seen["h"].reshape(-1, 32)  # (8 images x 17 tokens, 32 features)
    rows = Monitor(vit, metrics=["dead_fraction", "effective_rank"]).measure(x)
    assert value(rows, "block1.mlp.act", "dead_fraction") == dead_fraction(h) == 5 / 32
    assert value(rows, "block1.mlp.act", "effective_rank") == pytest.approx(effective_rank(h), rel=1e-6)
    old = Monitor(vit, metrics=["dead_fraction"], config=MonitorConfig(token_units=False)).measure(x)
    assert value(old, "block1.mlp.act", "dead_fraction") == dead_fraction(seen["h"].movedim(1, -1).reshape(-1, 17))


def test_monitor_keeps_channels_as_units_in_a_resnet():
    torch.manual_seed(0)
    resnet = build_resnet(channels=(4, 8)).eval()
    x = torch.randn(4, 1, 28, 28)
    seen = {}
    handle = resnet.block2.register_forward_hook(lambda m, a, out: seen.__setitem__("h", out.detach()))
    with torch.no_grad():
        resnet(x)
    handle.remove()
    h = seen["h"].movedim(1, -1).reshape(-1, 8)
    rows = Monitor(resnet, layers=["block2"], metrics=["effective_rank"]).measure(x)
    assert value(rows, "block2", "effective_rank") == pytest.approx(effective_rank(h), rel=1e-6)


def test_head_unit_matrix_puts_each_head_in_one_column():
    concat = torch.arange(12.0).reshape(2, 6)  # 2 samples, 3 heads of width 2
    heads = head_unit_matrix(concat, 3)
    assert heads.shape == (4, 3)
    assert heads[:, 1].tolist() == [2.0, 3.0, 8.0, 9.0]
    with pytest.raises(ValueError, match="heads"):
        head_unit_matrix(concat, 4)
    same = torch.cat([concat[:, :2], concat[:, :2], torch.randn(2, 2)], dim=1)
    assert duplicate_heads_fraction(same, 3) == pytest.approx(1 / 3)


def test_duplicate_heads_of_a_cloned_vit_are_half_and_of_the_base_none():
    torch.manual_seed(1)
    base = build_vit(dim=16, heads=4, depth=2).double()
    twin, _ = clone(base, 2)
    x = torch.randn(16, 1, 28, 28, dtype=torch.float64)
    base_rows = Monitor(base, metrics=["duplicate_heads_fraction"]).measure(x)
    twin_rows = Monitor(twin, metrics=["duplicate_heads_fraction"]).measure(x)
    for block in ("block1", "block2"):
        assert value(base_rows, f"{block}.attn.o", "duplicate_heads_fraction") == 0.0
        assert value(twin_rows, f"{block}.attn.o", "duplicate_heads_fraction") == 0.5  # 8 heads, 4 have a twin later
    assert twin.block1.attn.o.concat_heads == 8


def test_monitor_uses_the_partition_channels_last_of_a_cloned_vit():
    torch.manual_seed(2)
    twin, partition = clone(build_vit(dim=8, heads=2, depth=1).double(), 2)
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    rows = Monitor(twin, metrics=["cloning_r2_forward"], partition=partition).measure(x)
    r2 = [r["value"] for r in rows if r["metric"] == "cloning_r2_forward"]
    assert "embed" in {r["layer"] for r in rows} and len(r2) == len(partition)
    assert min(r2) > 1 - 1e-9


# ----------------------------------------------------------------------------- cloning benchmark
DIGITS = {"dataset": "digits", "train_size": 600, "batch_size": 32, "base_steps": 20, "paired_steps": 30,
          "log_every": 10, "probe_size": 128, "dtype": "float64"}
ARCH = {"resnet": {"model": "resnet", "channels": (4, 8), "norm": "batch"},
        "vit": {"model": "vit", "vit_dim": 8, "vit_heads": 2, "vit_depth": 1, "vit_patch": 4, "norm": "layer"}}


def _r2(rows: list[dict]) -> list[float]:
    return [r["value"] for r in rows if r["metric"] == "cloning_r2_variance_ratio_forward"]


@pytest.mark.parametrize("arch", [pytest.param("resnet", marks=pytest.mark.slow), "vit"])
def test_cloning_benchmark_keeps_resnet_and_vit_clones_exact_under_sgd(arch):
    bench = CloningBenchmark(CloningBenchmark.make_config("smoke", {**DIGITS, **ARCH[arch]}), 0)
    rows = bench.run(bench.total_steps)
    assert isinstance(bench.clone, SmallResNet if arch == "resnet" else SmallViT)
    assert len(_r2(rows)) >= 4 * len(bench.partition) and min(_r2(rows)) > 1 - 1e-9
    assert activation_layer_names(bench.base) == (["stem_act", "block1.act1", "block1.act2", "block2.act1",
                                                   "block2.act2"] if arch == "resnet" else ["block1.mlp.act"])
    assert any(r["metric"] == "clone_effective_rank" for r in rows)


def test_cloning_benchmark_vit_dropout_escapes():
    config = CloningBenchmark.make_config("smoke", {**DIGITS, **ARCH["vit"], "variant": "dropout", "dropout_p": 0.3})
    bench = CloningBenchmark(config, 0)
    rows = bench.run(bench.total_steps)
    assert min(_r2(rows)) < 1 - 1e-6


@pytest.mark.parametrize("overrides", [{"model": "vit", "norm": "batch"}, {"model": "vit", "norm": "layer",
                                                                            "vit_patch": 3},
                                       {"model": "cnn"}, {"model": "resnet", "channels": ()}])
def test_cloning_rejects_bad_architecture_settings(overrides):
    with pytest.raises(ConfigError):
        CloningBenchmark.make_config("smoke", {**DIGITS, **overrides})


def _activation_rows(model: nn.Module, inputs, config: MonitorConfig | None = None) -> list[dict]:
    rows = Monitor(model, metrics=["dead_fraction", "effective_rank"], config=config).measure(inputs)
    return [r for r in rows if "act" in r["layer"]]


def test_torch_transformer_gets_feature_units_without_configuration():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    tokens = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(2))
    default = _activation_rows(model, tokens)
    assert default and default == _activation_rows(model, tokens, MonitorConfig(channels_last=True))
    assert default != _activation_rows(model, tokens, MonitorConfig(token_units=False))


def test_hugging_face_bert_gets_feature_units_without_configuration():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=10, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    ids = torch.randint(0, 40, (6, 10), generator=torch.Generator().manual_seed(3))
    default = _activation_rows(model, ids)
    assert {r["layer"] for r in default} == {"bert.encoder.layer.0.intermediate.intermediate_act_fn",
                                             "bert.pooler.activation"}
    assert default == _activation_rows(model, ids, MonitorConfig(channels_last=True))
    erank = [r["value"] for r in default if r["metric"] == "effective_rank" and "intermediate" in r["layer"]][0]
    assert 10.0 < erank <= 32.0  # the 32 intermediate features are the units, not the 10 tokens
