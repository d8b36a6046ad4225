"""Tests for lopkit.theory.partition / cloning / invariance: function-preserving clones and their training.

Exactness checks (R^2 == 1 within 1e-6 after 200 optimiser steps) run in float64: in float32 the
clone's duplicated units agree only up to rounding, and rounding differences are a (tiny) symmetry-
breaking perturbation that the training dynamics can amplify; float64 keeps the numerical floor far
below the tolerance so the test checks the theorem, not the arithmetic.  Function-preservation
checks run in float32 (the realistic setting) at the 1e-5 tolerance of the spec.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from lopkit.theory.cloning import clone
from lopkit.theory.invariance import measure_cloning, track_clone_training
from lopkit.theory.manifolds import block_constancy_residual, weight_layer_blocks
from lopkit.theory.partition import Partition
from lopkit.theory.unit_maps import sequential_leaves

IN_FEATURES = 12


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These tiny models are slower with several intra-op threads on a busy CPU; restore afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Models and data


def make_mlp(norm: str | None = None, dropout: bool = False) -> nn.Sequential:
    """12 -> 10 -> 8 -> 3 MLP; hidden blocks nested to exercise nested Sequentials."""
    def norm_layer(width: int) -> list[nn.Module]:
        if norm == "bn":
            return [nn.BatchNorm1d(width)]
        if norm == "ln":
            return [nn.LayerNorm(width)]
        return []

    drop = [nn.Dropout(0.0)] if dropout else []
    return nn.Sequential(
        nn.Linear(IN_FEATURES, 10), *norm_layer(10), nn.ReLU(), *drop,
        nn.Sequential(nn.Linear(10, 8), *norm_layer(8), nn.Tanh(), *drop),
        nn.Linear(8, 3),
    )


def make_cnn(norm: str = "bn") -> nn.Sequential:
    """(Conv-Norm-ReLU-MaxPool) x 2, Flatten, Linear, ReLU, Linear on 3x8x8 images."""
    def norm_layer(channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels) if norm == "bn" else nn.GroupNorm(1, channels)

    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm_layer(4), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), norm_layer(5), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Flatten(),
        nn.Linear(5 * 2 * 2, 6), nn.ReLU(),
        nn.Linear(6, 3),
    )


def randomise_norm_layers(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial affine parameters and running statistics, so duplicating them is really tested."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
                module.num_batches_tracked.fill_(7)


ARCHS = {
    "mlp": (lambda: make_mlp(None), (IN_FEATURES,)),
    "mlp_bn": (lambda: make_mlp("bn"), (IN_FEATURES,)),
    "mlp_ln": (lambda: make_mlp("ln"), (IN_FEATURES,)),
    "cnn_bn": (lambda: make_cnn("bn"), (3, 8, 8)),
    "cnn_gn": (lambda: make_cnn("gn"), (3, 8, 8)),
}


def build(arch: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    make, shape = ARCHS[arch]
    model = make()
    randomise_norm_layers(model, torch.Generator().manual_seed(seed + 1))
    inputs = torch.randn((32, *shape), generator=torch.Generator().manual_seed(seed + 2))
    return model, inputs


def regression_data(n: int = 256, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(n, IN_FEATURES, generator=gen, dtype=dtype)
    mix = torch.randn(IN_FEATURES, 3, generator=gen, dtype=dtype)
    y = torch.sin(x @ mix) + 0.1 * torch.randn(n, 3, generator=gen, dtype=dtype)
    return x, y


def expected_ids(base_units: int, factor: int, layout: str) -> list[int]:
    """Block ids written out by hand from the layout definition."""
    if layout == "interleaved":
        return [k for k in range(base_units) for _ in range(factor)]
    return [k for _ in range(factor) for k in range(base_units)]


def module_outputs(model: nn.Module, names, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda _m, _a, out, n=n: outputs.__setitem__(n, out.detach().clone()))
        for n in names
    ]
    try:
        model(inputs)
    finally:
        for h in handles:
            h.remove()
    return outputs


def units_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 2 else t.movedim(1, -1).reshape(-1, t.shape[1])


# ---------------------------------------------------------------------------------------------
# Function preservation and partitions


@pytest.mark.parametrize("layout", ["interleaved", "tiled"])
@pytest.mark.parametrize("factor", [2, 3])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_clone_matches_base_outputs_in_eval_and_train_mode(arch, factor, layout):
    base, x = build(arch)
    cloned, partition = clone(base, factor, layout)
    for train in (False, True):
        base.train(train)
        cloned.train(train)
        with torch.no_grad():
            expected, got = base(x), cloned(x)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), f"train={train}: {(got - expected).abs().max()}"
    assert partition.factor == factor
    for name in partition:
        assert (partition.block_sizes(name) == factor).all()


@pytest.mark.parametrize("layout", ["interleaved", "tiled"])
@pytest.mark.parametrize("arch", ["mlp_bn", "cnn_bn"])
def test_every_cloned_unit_equals_its_base_unit(arch, layout):
    """Layer by layer: clone output[:, unit] == base output[:, block id of unit] (units = features or channels)."""
    base, x = build(arch)
    cloned, partition = clone(base, 3, layout)
    base.eval(), cloned.eval()
    with torch.no_grad():
        base_out = module_outputs(base, list(partition), x)
        clone_out = module_outputs(cloned, list(partition), x)
    for name, ids in partition.items():
        b, c = base_out[name], clone_out[name]
        assert c.shape[1] == 3 * b.shape[1], name
        assert torch.allclose(c, b[:, ids], atol=1e-5, rtol=0), name


@pytest.mark.parametrize("layout", ["interleaved", "tiled"])
def test_partition_names_sizes_and_layout(layout):
    base = make_cnn("bn")
    cloned, partition = clone(base, 2, layout)
    # every module whose output is cloned; not the input, not the final Linear "5"
    assert list(partition) == ["0.0", "0.1", "0.2", "0.3", "1.0", "1.1", "1.2", "1.3", "2", "3", "4"]
    for name in ["0.0", "0.1", "0.2", "0.3"]:
        assert partition[name].tolist() == expected_ids(4, 2, layout)
    for name in ["1.0", "1.1", "1.2", "1.3"]:
        assert partition[name].tolist() == expected_ids(5, 2, layout)
    channel_ids = expected_ids(5, 2, layout)
    assert partition["2"].tolist() == [channel_ids[c] * 4 + s for c in range(10) for s in range(4)]
    assert partition.base_units("2") == 20
    assert partition["3"].tolist() == expected_ids(6, 2, layout)
    modules = dict(cloned.named_modules())
    assert modules["0.0"].weight.shape == (8, 3, 3, 3)  # input channels are not cloned
    assert modules["1.0"].weight.shape == (10, 8, 3, 3)
    assert modules["3"].weight.shape == (12, 40)
    assert modules["5"].weight.shape == (3, 12)  # outputs are not cloned
    assert modules["0.1"].running_mean.shape == (8,)


def test_incoming_weights_are_divided_by_input_block_size():
    base = make_mlp()
    cloned, partition = clone(base, 3, "interleaved")
    w_base, w_clone = base[2][0].weight.detach(), cloned[2][0].weight.detach()
    for o in range(w_clone.shape[0]):
        for i in range(w_clone.shape[1]):
            assert w_clone[o, i] == pytest.approx(float(w_base[o // 3, i // 3]) / 3, abs=1e-7)
    assert torch.equal(cloned[2][0].bias.detach(), base[2][0].bias.detach().repeat_interleave(3))
    # first layer: input features are singleton blocks, so no division
    assert torch.equal(cloned[0].weight.detach(), base[0].weight.detach().repeat_interleave(3, dim=0))


def test_clone_is_a_deep_copy_and_base_is_unchanged():
    base, x = build("mlp_bn")
    before = copy.deepcopy(base.state_dict())
    cloned, partition = clone(base, 2)
    with torch.no_grad():
        for p in cloned.parameters():
            p.add_(1.0)
    cloned.train()
    cloned(x)  # updates the clone's BatchNorm running stats only
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    assert not base_ptrs & {p.data_ptr() for p in cloned.parameters()}


def test_factor_one_is_an_exact_copy():
    base, x = build("cnn_bn")
    cloned, partition = clone(base, 1)
    base.eval(), cloned.eval()
    assert torch.equal(base(x), cloned(x))
    assert all((partition.block_sizes(n) == 1).all() for n in partition)


def test_unsupported_modules_raise_clear_errors():
    with pytest.raises(TypeError, match=r"'1'.*GRU.*Supported modules:.*Linear"):
        clone(nn.Sequential(nn.Linear(4, 4), nn.GRU(4, 4), nn.Linear(4, 2)), 2)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 2)

        def forward(self, x):
            return self.net(x)

    with pytest.raises(TypeError, match="nn.Sequential"):
        clone(Wrapper(), 2)
    with pytest.raises(TypeError, match="groups"):
        clone(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1)), 2)
    with pytest.raises(TypeError, match="LayerNorm"):
        clone(nn.Sequential(nn.Linear(4, 6), nn.LayerNorm([2, 3]), nn.Linear(6, 2)), 2)
    with pytest.raises(TypeError, match="Softmax"):
        clone(nn.Sequential(nn.Linear(4, 6), nn.Softmax(dim=1), nn.Linear(6, 2)), 2)
    with pytest.raises(ValueError, match="factor"):
        clone(make_mlp(), 0)
    with pytest.raises(ValueError, match="layout"):
        clone(make_mlp(), 2, layout="blocked")


def test_clone_walks_the_one_unit_walker_shared_modules_stay_tied():
    """clone() walks lopkit.theory.unit_maps.sequential_leaves: a module registered at several places is cloned at
    each place (the base's tie is kept: one module, the partition names every place) and a Sequential with its own
    forward is a barrier for the walker and an error for clone()."""
    torch.manual_seed(0)
    act, tied = nn.ReLU(), nn.Linear(6, 6)
    base = nn.Sequential(nn.Linear(4, 6), act, tied, act, nn.Sequential(tied, act), nn.Linear(6, 2))
    walked = [name for name, _ in sequential_leaves(base)]
    assert walked == ["0", "1", "2", "3", "4.0", "4.1", "5"]
    x = torch.randn(7, 4)
    for layout in ("interleaved", "tiled"):
        cloned, partition = clone(base, 2, layout)
        assert torch.allclose(cloned(x), base(x), atol=1e-5)
        assert list(partition) == walked[:-1]  # every place of the shared ReLU and Linear, not the output layer
        assert cloned[2] is cloned[4][0] and cloned[2].weight.shape == (12, 12)
        assert sum(p.numel() for p in cloned.parameters()) == 4 * 12 + 12 + 12 * 12 + 12 + 12 * 2 + 2
    with pytest.raises(TypeError, match="'2' is registered again at '4'"):  # the tie's second place is the output
        clone(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), tied, nn.ReLU(), tied), 2)

    class Reversed(nn.Sequential):
        def forward(self, x):
            for module in reversed(self):
                x = module(x)
            return x

    model = nn.Sequential(nn.Linear(4, 6), Reversed(nn.ReLU(), nn.Linear(6, 6)), nn.Linear(6, 2))
    assert list(sequential_leaves(model))[1] == ("1", None)
    with pytest.raises(TypeError, match="'1' must be an nn.Sequential.*plain Sequential forward, got Reversed"):
        clone(model, 2)


def test_group_norm_with_several_groups_needs_interleaved_layout():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(5, 2, 6, 6)
    cloned, _ = clone(base, 2, "interleaved")
    assert torch.allclose(cloned(x), base(x), atol=1e-5)
    with pytest.raises(TypeError, match="GroupNorm"):
        clone(base, 2, "tiled")


def test_layer_norm_statistics_of_a_duplicated_vector_equal_the_base():
    """Why LayerNorm clones exactly: mean and (biased) variance over a vector whose entries each appear E times."""
    v = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for dup in (v.repeat_interleave(3, dim=1), v.repeat(1, 3)):
        assert torch.allclose(dup.mean(1), v.mean(1), atol=1e-14)
        assert torch.allclose(dup.var(1, unbiased=False), v.var(1, unbiased=False), atol=1e-14)
    expected = nn.functional.layer_norm(v, (7,)).repeat_interleave(3, dim=1)
    assert torch.allclose(nn.functional.layer_norm(v.repeat_interleave(3, dim=1), (21,)), expected, atol=1e-12)


def test_partition_survives_pickle_and_deepcopy():
    import pickle

    _, partition = clone(make_cnn("bn"), 2)
    assert pickle.loads(pickle.dumps(partition)) == partition
    copied = copy.deepcopy(partition)
    assert copied == partition and copied.factor == 2


def test_partition_mapping_api_and_validation():
    p = Partition.interleaved({"a": 3, "b": 2}, factor=2)
    assert len(p) == 2 and list(p) == ["a", "b"] and "a" in p
    assert dict(p)["b"].tolist() == [0, 0, 1, 1]
    assert p.factor == 2 and p.base_units("a") == 3
    assert p.block_sizes("a").tolist() == [2, 2, 2]
    assert [m.tolist() for m in p.members("b")] == [[0, 1], [2, 3]]
    assert Partition.tiled({"a": 3}, 2)["a"].tolist() == [0, 1, 2, 0, 1, 2]
    assert p == Partition({"a": [0, 0, 1, 1, 2, 2], "b": [0, 0, 1, 1]})
    assert p != Partition.tiled({"a": 3, "b": 2}, factor=2)
    irregular = Partition({"x": [0, 1, 1, 2]})
    assert irregular.factor is None and irregular.block_sizes("x").tolist() == [1, 2, 1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.factor = 3
    with pytest.raises(ValueError, match="cover"):
        Partition({"x": [0, 2, 2]})
    with pytest.raises(ValueError, match="1-D"):
        Partition({"x": [[0, 1]]})
    with pytest.raises(ValueError, match=">= 0"):
        Partition({"x": [-1, 0]})
    with pytest.raises(ValueError, match="factor=3"):
        Partition({"x": [0, 0, 1, 1]}, factor=3)
    with pytest.raises(KeyError, match="not in the partition"):
        p.base_units("zzz")


# ---------------------------------------------------------------------------------------------
# T1: exact invariance under SGD, momentum and Adam


def max_within_block_spread(t: torch.Tensor, ids: torch.Tensor) -> float:
    """Largest difference between two units of the same block, over samples (independent of cloning_r2)."""
    m = units_last(t)
    return max(float((m[:, ids == k].amax(1) - m[:, ids == k].amin(1)).max()) for k in range(int(ids.max()) + 1))


def forward_and_backward(model, names, x, y):
    """Module outputs and dL/d(outputs) on a batch in eval mode, computed directly with hooks."""
    outputs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda _m, _a, o, n=n: outputs.__setitem__(n, o)) for n in names]
    model.eval()
    try:
        out = model(x)
        loss = nn.functional.mse_loss(out, y) if y.dtype.is_floating_point else nn.functional.cross_entropy(out, y)
        grads = torch.autograd.grad(loss, [outputs[n] for n in names])
    finally:
        for h in handles:
            h.remove()
        model.train()
    return {n: outputs[n].detach() for n in names}, dict(zip(names, grads))


def assert_exact_clones(rows, model, partition, x, y):
    r2 = [r for r in rows if r["metric"].startswith("cloning_r2")]
    assert {r["layer"] for r in r2} == set(partition)
    assert {r["metric"] for r in r2} == {"cloning_r2_forward", "cloning_r2_backward"}
    worst = min(r["value"] for r in r2)
    assert worst >= 1 - 1e-6, worst
    # independent check: units of a block are identical, forward and backward
    acts, grads = forward_and_backward(model, list(partition), x, y)
    for name, ids in partition.items():
        assert max_within_block_spread(acts[name], ids) <= 1e-9 * (1 + float(acts[name].abs().max())), name
        assert max_within_block_spread(grads[name], ids) <= 1e-9 * (1 + float(grads[name].abs().max())), name
    # and the weights stay block-constant (plain clones are on M_BC)
    modules = dict(model.named_modules())
    for name, (out_ids, in_ids) in weight_layer_blocks(model, partition).items():
        assert block_constancy_residual(modules[name].weight, out_ids, in_ids) < 1e-9, name


def losses(rows):
    values = sorted((r["step"], r["value"]) for r in rows if r["metric"] == "loss")
    return values[0][1], values[-1][1]


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.2), ("momentum", 0.05), ("adam", 0.01)])
def test_clones_stay_exact_under_sgd_momentum_adam(optimizer, lr):
    x, y = regression_data()
    torch.manual_seed(1)
    base = make_mlp("bn", dropout=True).double()
    model, partition = clone(base, 2, "tiled")
    rows = track_clone_training(
        model, partition, x, y, optimizer=optimizer, lr=lr, steps=200, batch_size=32, seed=0, record_every=50
    )
    assert sorted({r["step"] for r in rows}) == [0, 50, 100, 150, 200]
    first, last = losses(rows)
    assert last < 0.8 * first  # it really trained
    assert_exact_clones(rows, model, partition, x[:256], y[:256])


def test_cnn_clone_stays_exact_under_adam():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(128, 3, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (128,), generator=gen)
    torch.manual_seed(2)
    model, partition = clone(make_cnn("bn").double(), 2, "interleaved")
    rows = track_clone_training(model, partition, x, y, optimizer="adam", lr=0.01, steps=100, batch_size=32,
                                seed=0, record_every=100)
    first, last = losses(rows)
    assert last < first
    assert_exact_clones(rows, model, partition, x, y)


# ---------------------------------------------------------------------------------------------
# T2: noisy SGD and dropout escape the cloned manifold
#
# Setting: interleaved x2 clone of a 12-10-8-3 ReLU/tanh MLP (Dropout modules present), plain SGD
# lr 0.3, batch 32, 256 samples, 400 steps, float64.  Observed for seeds 0/1/2:
#   no noise, no dropout : 1 - R^2 == 0 to machine precision for every layer (control below)
#   noise sigma 0.01     : mean R^2 0.989 / 0.985 / 0.989, worst backward 0.954 / 0.938 / 0.957
#   dropout 0.1          : mean R^2 0.969 / 0.964 / 0.962, worst backward 0.910 / 0.925 / 0.887
# The thresholds sit well inside the observed escape and > 10 orders of magnitude above the
# exact runs' numerical floor, so they separate "on the manifold" from "escaping" without being
# tuned to one seed.  (Escape grows with time: at 200 steps and lr 0.05 it is only ~1e-3.)


def escape_run(steps: int = 400, **kwargs):
    x, y = regression_data()
    torch.manual_seed(1)
    base = make_mlp(None, dropout=True).double()
    model, partition = clone(base, 2, "interleaved")
    rows = track_clone_training(model, partition, x, y, optimizer="sgd", lr=0.3, steps=steps, batch_size=32,
                                seed=0, record_every=steps, **kwargs)
    final = [r for r in rows if r["step"] == steps and r["metric"].startswith("cloning_r2")]
    mean = sum(r["value"] for r in final) / len(final)
    worst_backward = min(r["value"] for r in final if r["metric"] == "cloning_r2_backward")
    worst_forward = min(r["value"] for r in final if r["metric"] == "cloning_r2_forward")
    return mean, worst_forward, worst_backward


def test_same_setting_without_noise_stays_exact():
    mean, worst_forward, worst_backward = escape_run()
    assert min(worst_forward, worst_backward) >= 1 - 1e-9


def test_noisy_sgd_escapes_clones():
    mean, worst_forward, worst_backward = escape_run(noise_sigma=0.01, noise_decay=1.0)
    assert mean < 0.995
    assert worst_backward < 0.98
    assert worst_forward < 0.995


def test_dropout_escapes_clones():
    mean, worst_forward, worst_backward = escape_run(dropout=0.1)
    assert mean < 0.99
    assert worst_backward < 0.97
    assert worst_forward < 0.99


def test_single_noisy_step_starts_escape():
    """noise_decay=0 adds noise on the first step only (0 ** 0 = 1); the clone never returns."""
    mean, worst_forward, worst_backward = escape_run(noise_sigma=0.01, noise_decay=0.0)
    assert min(worst_forward, worst_backward) < 0.999  # observed ~0.982 (the manifold is unstable here)


def test_dropout_without_dropout_modules_is_an_error():
    x, y = regression_data(64)
    model, partition = clone(make_mlp().double(), 2)
    with pytest.raises(ValueError, match="no Dropout modules"):
        track_clone_training(model, partition, x, y, dropout=0.1, steps=1)


def test_measure_cloning_detects_a_broken_clone():
    x, y = regression_data(64)
    torch.manual_seed(0)
    model, partition = clone(make_mlp().double(), 2, "interleaved")
    exact = measure_cloning(model, partition, x, y)
    assert min(exact["cloning_r2_forward"].values()) == pytest.approx(1.0, abs=1e-12)
    with torch.no_grad():
        model[0].weight[0] += 0.5  # unit 0 of block 0 differs from unit 1
    broken = measure_cloning(model, partition, x, y)
    assert broken["cloning_r2_forward"]["0"] < 0.999
    assert broken["loss"]["model"] != exact["loss"]["model"]
