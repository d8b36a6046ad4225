"""Tests for the small ResNet / ViT builders and their function-preserving clones (lop_paper.md T1, T2).

Function preservation is checked in float32 (1e-5, the spec's tolerance) and float64 (1e-12).
Training checks run in float64: there the clones stay bitwise equal (observed 1 - R^2 == 0 exactly
after 200 steps), so any symmetry breaking measured by the escape tests comes from the noise or
dropout, not from rounding.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from lopkit.benchmarks.architectures import SmallResNet, SmallViT, build_resnet, build_vit
from lopkit.data.seeding import seeded_generator
from lopkit.theory.cloning import clone
from lopkit.theory.cloning_arch import architecture_layer_blocks
from lopkit.theory.invariance import measure_cloning, track_clone_training
from lopkit.theory.manifolds import (
    block_constancy_residual,
    incoming_sums_residual,
    make_equitable_nonconstant,
    manifold_residuals,
    outgoing_sums_residual,
    weight_layer_blocks,
)
from lopkit.theory.partition import Partition


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models are slower with several intra-op threads on a busy CPU; restore afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Models and data

IMAGE = (1, 8, 8)


def tiny(arch: str, norm: str | None = None, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """Tiny ResNet (3 -> 4 channels, identity + projection shortcut) or ViT (5 tokens, dim 8, 2 heads, 2 blocks)."""
    torch.manual_seed(seed)
    if arch == "resnet":
        return build_resnet(1, (3, 4), 1, 3, norm=norm or "batch", dropout=dropout)
    return build_vit(1, 8, 4, dim=8, depth=2, heads=2, mlp_ratio=2, out_features=3, norm=norm or "layer",
                     dropout=dropout)


def randomise_norms(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Non-trivial affine parameters and running statistics, so duplicating them is really tested."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
    return model


def images(n: int, dtype=torch.float32, key: int = 0) -> torch.Tensor:
    return torch.randn((n, *IMAGE), generator=seeded_generator(0, key), dtype=dtype)


def classification_data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    gen = seeded_generator(0, 1)
    x = torch.randn((n, *IMAGE), generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=gen)


VARIANTS = {
    "resnet_batch": ("resnet", "batch"),
    "resnet_layer": ("resnet", "layer"),
    "resnet_none": ("resnet", "none"),
    "vit_layer": ("vit", "layer"),
    "vit_none": ("vit", "none"),
}


def units_last(t: torch.Tensor, last: bool) -> torch.Tensor:
    """Unit axis moved last: channels of (N, C, ...) or features of (N, T, D)."""
    return t if last else t.movedim(1, -1)


def module_outputs(model: nn.Module, names, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda _m, _a, out, n=n: outputs.__setitem__(n, out.detach()))
               for n in names]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
    return outputs


# ---------------------------------------------------------------------------------------------
# Builders


def test_builders_shapes_and_module_names():
    resnet, vit = build_resnet(), build_vit()
    x = torch.randn(2, 1, 28, 28)
    assert resnet(x).shape == (2, 10) and vit(x).shape == (2, 10)
    names = dict(resnet.named_modules())
    for name in ("stem", "stem_norm", "block1.conv1", "block1.norm2", "block2.shortcut.conv", "pool", "head"):
        assert name in names, name
    assert isinstance(names["block1.shortcut"], nn.Identity)  # same channels, stride 1
    assert names["block2.conv1"].stride == (2, 2) and names["block2.shortcut.conv"].kernel_size == (1, 1)
    names = dict(vit.named_modules())
    for name in ("embed.proj", "block1.norm1", "block1.attn.q", "block1.attn.o", "block2.mlp.fc1", "block2.mlp.act",
                 "norm", "head"):
        assert name in names, name
    assert not any(isinstance(m, nn.MultiheadAttention) for m in vit.modules())
    assert vit.embed.pos_embed.shape == (1, 17, 32)  # 16 patches of 7x7 + class token
    no_norm = build_vit(norm="none")
    assert not any(isinstance(m, nn.LayerNorm) for m in no_norm.modules())
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in build_resnet(norm="none").modules())


def test_builders_reject_bad_arguments():
    with pytest.raises(ValueError, match="norm"):
        build_vit(norm="batch")
    with pytest.raises(ValueError, match="norm"):
        build_resnet(norm="group")
    with pytest.raises(ValueError, match="divisible by patch_size"):
        build_vit(image_size=28, patch_size=5)
    with pytest.raises(ValueError, match="head_dim"):
        build_vit(dim=30, heads=4)
    with pytest.raises(ValueError, match="dropout"):
        build_resnet(dropout=1.0)


def test_vit_attention_matches_a_reference_computation():
    """The explicit q/k/v/o attention equals softmax(q k^T / sqrt(d)) v per head, written out head by head."""
    torch.manual_seed(0)
    attn = build_vit(dim=8, heads=2).block1.attn.double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    q, k, v = attn.q(x), attn.k(x), attn.v(x)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        weights = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 2.0, dim=-1)
        heads.append(weights @ v[..., sl])
    assert torch.allclose(attn(x), attn.o(torch.cat(heads, dim=-1)), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Function preservation and partitions


@pytest.mark.parametrize("layout", ["interleaved", "tiled"])
@pytest.mark.parametrize("factor", [2, 3])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_clone_matches_base_in_train_and_eval_mode(variant, factor, layout):
    arch, norm = VARIANTS[variant]
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        base = randomise_norms(tiny(arch, norm).to(dtype), seeded_generator(0, 2))
        cloned, partition = clone(base, factor, layout)
        x = images(32, dtype)
        for train in (False, True):
            base.train(train), cloned.train(train)
            with torch.no_grad():
                expected, got = base(x), cloned(x)
            assert got.shape == expected.shape
            error = float((got - expected).abs().max())
            assert error <= tol, f"{dtype} train={train}: {error}"
        assert partition.factor == factor
        assert all((partition.block_sizes(n) == factor).all() for n in partition)


@pytest.mark.parametrize("layout", ["interleaved", "tiled"])
@pytest.mark.parametrize("variant", ["resnet_batch", "vit_layer"])
def test_every_cloned_unit_equals_its_base_unit(variant, layout):
    """Module by module: clone output[..., unit] == base output[..., block id of unit] (channels, features, heads)."""
    arch, norm = VARIANTS[variant]
    base = randomise_norms(tiny(arch, norm).double(), seeded_generator(0, 2)).eval()
    cloned, partition = clone(base, 3, layout)
    cloned.eval()
    x = images(16, torch.float64)
    base_out, clone_out = module_outputs(base, list(partition), x), module_outputs(cloned, list(partition), x)
    assert set(clone_out) == set(partition)
    for name, ids in partition.items():
        last = partition.units_last(name)
        b, c = units_last(base_out[name], last), units_last(clone_out[name], last)
        assert c.shape[-1] == 3 * b.shape[-1], name
        assert torch.allclose(c, b[..., ids], atol=1e-12, rtol=0), name


def test_vit_partition_clones_whole_heads():
    base = tiny("vit")
    cloned, partition = clone(base, 2, "interleaved")
    attn = cloned.block1.attn
    assert (attn.heads, attn.head_dim) == (4, 4)  # heads doubled, head_dim (and the 1/sqrt(d) scale) unchanged
    assert partition["block1.attn.drop"].tolist() == [0, 0, 1, 1]  # attention weights: heads are the units
    assert partition["block1.attn.q"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7]
    assert partition["embed"].tolist() == [k for k in range(8) for _ in range(2)]
    assert "block1.attn.q" in partition.channels_last and "embed.proj" not in partition.channels_last
    assert "block1.attn.drop" not in partition.channels_last
    assert torch.equal(cloned.block1.attn.o.weight, base.block1.attn.o.weight[partition["embed"]][
        :, partition["block1.attn.v"]] / 2)
    assert cloned.block1.norm1.normalized_shape == (16,)
    no_norm = clone(tiny("vit", "none"), 2)[1]
    assert "block1.norm1" not in no_norm and "norm" not in no_norm  # Identity modules are not listed


def test_head_dim_duplication_would_not_preserve_the_function():
    """Control for the choice above: keeping 2 heads of doubled head_dim (the clone's weights, re-split) changes
    the output, because every q.k doubles while the scale shrinks only by sqrt(2)."""
    base = tiny("vit").double()
    cloned, _ = clone(base, 2, "tiled")  # tiled: clone j of head h is head j*H + h
    x = images(8, torch.float64)
    wrong = copy.deepcopy(cloned)
    for block in wrong.blocks():
        perm = torch.tensor([0, 2, 1, 3])  # reorder heads to (h, j) so head h's copies are adjacent
        index = (perm.view(-1, 1) * 4 + torch.arange(4)).reshape(-1)
        with torch.no_grad():
            for name in ("q", "k", "v"):
                layer = getattr(block.attn, name)
                layer.weight.copy_(layer.weight[index]), layer.bias.copy_(layer.bias[index])
            block.attn.o.weight.copy_(block.attn.o.weight[:, index])
        block.attn.heads, block.attn.head_dim = 2, 8
    with torch.no_grad():
        assert torch.allclose(cloned(x), base(x), atol=1e-12)
        assert float((wrong(x) - base(x)).abs().max()) > 1e-4


def test_resnet_batchnorm_statistics_are_duplicated():
    base = randomise_norms(tiny("resnet"), seeded_generator(0, 3))
    cloned, partition = clone(base, 2, "tiled")
    ids = partition["block2.shortcut.norm"]
    assert torch.equal(cloned.block2.shortcut.norm.running_var, base.block2.shortcut.norm.running_var[ids])
    assert cloned.block2.shortcut.norm.num_features == 8
    assert torch.equal(cloned.block1.conv2.weight, base.block1.conv2.weight[partition["block1"]][
        :, partition["block1.conv1"]] / 2)


def test_clone_leaves_the_base_unchanged_and_factor_one_copies():
    base = tiny("vit")
    before = copy.deepcopy(base.state_dict())
    cloned, partition = clone(base, 1)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in cloned.state_dict().items())
    assert cloned.block1.attn.q.weight is not base.block1.attn.q.weight
    assert isinstance(cloned, SmallViT) and isinstance(clone(tiny("resnet"), 2)[0], SmallResNet)


def test_partition_keeps_channels_last_through_pickle_and_restrict():
    partition = clone(tiny("vit"), 2)[1]
    again = pickle.loads(pickle.dumps(partition))
    assert again == partition and again.channels_last == partition.channels_last
    sub = partition.restrict(["embed.proj", "block1.attn.q"])
    assert sub.channels_last == {"block1.attn.q"}
    assert sub != Partition(dict(sub), factor=None)  # same blocks, different unit axes
    with pytest.raises(ValueError, match="channels_last"):
        Partition({"a": torch.tensor([0, 0])}, channels_last=frozenset({"b"}))


@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_fresh_clone_is_block_constant_in_every_weight_layer(arch):
    model, partition = clone(tiny(arch).double(), 2, "tiled")
    modules = dict(model.named_modules())
    layers = architecture_layer_blocks(model, partition)
    weighted = {n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(layers) == weighted
    for name, (out_ids, in_ids) in layers.items():
        assert block_constancy_residual(modules[name].weight, out_ids, in_ids) == 0.0, name
    with pytest.raises(ValueError, match="does not match"):
        architecture_layer_blocks(model, clone(tiny(arch).double(), 3)[1])
    generic = weight_layer_blocks(model, partition)  # dispatches to the real wiring, not registration order
    assert generic.keys() == layers.keys()
    for name, (out_ids, in_ids) in layers.items():
        for mine, theirs in zip((out_ids, in_ids), generic[name]):
            assert (mine is None and theirs is None) or torch.equal(mine, theirs), name
    rows = manifold_residuals(model, partition)
    assert len(rows) == 5 * len(layers) and max(r["value"] for r in rows) == 0.0


# ---------------------------------------------------------------------------------------------
# T1: SGD, momentum and Adam keep exact clones


def r2_values(rows, step=None):
    return [r["value"] for r in rows if r["metric"].startswith("cloning_r2") and (step is None or r["step"] == step)]


def first_last_loss(rows):
    values = sorted((r["step"], r["value"]) for r in rows if r["metric"] == "loss")
    return values[0][1], values[-1][1]


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("momentum", 0.05), ("adam", 0.01)])
@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_clones_stay_exact_under_sgd_momentum_adam(arch, optimizer, lr):
    x, y = classification_data()
    model, partition = clone(tiny(arch, dropout=0.0).double(), 2, "interleaved")
    rows = track_clone_training(model, partition, x, y, optimizer=optimizer, lr=lr, steps=200, batch_size=32,
                                seed=0, record_every=100)
    assert sorted({r["step"] for r in rows}) == [0, 100, 200]
    values = r2_values(rows)
    assert len(values) == 3 * 2 * len(partition)
    assert min(values) >= 1 - 1e-12, min(values)
    first, last = first_last_loss(rows)
    assert last < 0.8 * first  # it really trained (observed 1.14 -> 0.26..0.66 ResNet, 1.16 -> 0.66..0.77 ViT)
    modules = dict(model.named_modules())
    for name, (out_ids, in_ids) in architecture_layer_blocks(model, partition).items():
        assert block_constancy_residual(modules[name].weight, out_ids, in_ids) < 1e-12, name


# ---------------------------------------------------------------------------------------------
# T2: noisy SGD and dropout escape
#
# Setting: interleaved x2 clone of the tiny models, plain SGD lr 0.1, batch 32, 256 samples, 200 steps,
# float64; worst R^2 over modules and forward/backward.  Observed (seeds 0 / 1):
#   no noise, no dropout : 1 - R^2 == 0 exactly (test above)
#   noise sigma 0.01     : ResNet 1 - worst = 0.30 / 0.26;  ViT 3.0e-3 / 2.8e-3 (the ViT "does not move far")
#   dropout 0.1          : ResNet 0.021 / 0.020;           ViT 0.048 / 0.027
# The threshold 1e-3 sits below every observed escape and 13 orders of magnitude above the exact runs.


def escape_worst_r2(arch: str, **kwargs) -> float:
    x, y = classification_data()
    model, partition = clone(tiny(arch, dropout=0.0).double(), 2, "interleaved")
    rows = track_clone_training(model, partition, x, y, optimizer="sgd", lr=0.1, steps=200, batch_size=32, seed=0,
                                record_every=200, **kwargs)
    return min(r2_values(rows, step=200))


@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_noisy_sgd_escapes_clones(arch):
    assert escape_worst_r2(arch, noise_sigma=0.01) < 1 - 1e-3


@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_dropout_escapes_clones(arch):
    assert escape_worst_r2(arch, dropout=0.1) < 1 - 1e-3


# ---------------------------------------------------------------------------------------------
# Equitable, non-constant clones (Remark 2.3)


# The perturbation scale matters for a reason beyond the theorem: the clones of an equitable non-constant
# net are computed with different weights, so they differ by rounding (~1e-14 in train mode), and the
# dynamics amplify that normal component when the manifold is unstable there.  Observed (float64, seed
# below): at scale 0.3 the ResNet's 1 - R^2 grows ~100x per SGD step (1e-13 at step 6, 4e-9 at step 8,
# 0.97 at step 10) and the ViT's escapes after ~150 SGD steps; at scales 0.03 and 0.1 both stay at
# 1 - R^2 == 0 for 200 steps.  Gradients at step 0 are block-constant to 1e-14, so this is the
# instability the paper infers ("unstable or saddle-like" manifolds), not a broken invariance.
EQUITABLE_SCALE = 0.05


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("adam", 0.01)])
@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_equitable_nonconstant_clone_keeps_the_function_and_stays_on_the_manifold(arch, optimizer, lr):
    base = randomise_norms(tiny(arch).double(), seeded_generator(0, 4))
    cloned, partition = clone(base, 2, "tiled")
    layers = architecture_layer_blocks(cloned, partition)
    net = make_equitable_nonconstant(cloned, partition, scale=EQUITABLE_SCALE, generator=seeded_generator(0, 5))
    hidden = [n for n, (o, i) in layers.items() if o is not None and i is not None]
    modules = dict(net.named_modules())
    for name in hidden:
        assert block_constancy_residual(modules[name].weight, *layers[name]) > 1e-3, name
    x = images(32, torch.float64)
    for train in (False, True):
        base.train(train), net.train(train)
        with torch.no_grad():
            assert float((net(x) - base(x)).abs().max()) < 1e-12, train
    initial = {n: modules[n].weight.detach().clone() for n in hidden}
    xs, ys = classification_data()
    rows = track_clone_training(net, partition, xs, ys, optimizer=optimizer, lr=lr, steps=200, batch_size=32,
                                seed=0, record_every=100)
    assert min(r2_values(rows)) >= 1 - 1e-9
    for name in hidden:
        out_ids, in_ids = layers[name]
        w = modules[name].weight.detach()
        assert block_constancy_residual(w, out_ids, in_ids) > 1e-3, name  # still not identical clones
        assert incoming_sums_residual(w, out_ids, in_ids) < 1e-9, name
        assert outgoing_sums_residual(w, out_ids, in_ids) < 1e-9, name
        change = w - initial[name]
        assert float(change.abs().max()) > 1e-3, name  # it moved ...
        assert block_constancy_residual(change, out_ids, in_ids) < 1e-9, name  # ... by a block-constant amount


@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_non_equitable_perturbation_is_detected(arch):
    """Control: a perturbation with unequal block sums makes clones differ, and measure_cloning sees it."""
    x, y = classification_data(64)
    model, partition = clone(tiny(arch).double(), 2, "interleaved")
    layer = model.block1.conv2 if arch == "resnet" else model.block1.mlp.fc1
    exact = measure_cloning(model, partition, x, y)
    assert min(exact["cloning_r2_forward"].values()) == 1.0
    with torch.no_grad():
        # unit 0 of block 0 differs from its clone (random, not constant: a LayerNorm output sums to 0 over features)
        layer.weight[0] += 0.5 * torch.randn(layer.weight[0].shape, generator=seeded_generator(0, 6),
                                             dtype=torch.float64)
    broken = measure_cloning(model, partition, x, y)
    name = "block1.conv2" if arch == "resnet" else "block1.mlp.fc1"
    assert broken["cloning_r2_forward"][name] < 0.999
