"""Resets (CBP, ReDo, reset_frozen) on the small ResNet and ViT: unit groups from the one unit walker, and resets
that must not change the network's output (units whose outgoing weights are zero, or dead units)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lopkit.benchmarks.architectures import build_resnet, build_vit
from lopkit.mitigations.layers import architecture_unit_groups, resolve_unit_groups
from lopkit.mitigations.resets import (
    CBPConfig,
    ContinualBackprop,
    ReDo,
    ReDoConfig,
    ResetFrozen,
    ResetFrozenConfig,
)
from lopkit.theory.unit_maps import layer_wiring, unit_sites


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_resnet(channels=(4, 8), norm="batch").double()


def vit() -> nn.Module:
    torch.manual_seed(0)
    return build_vit(dim=8, heads=2, depth=2, mlp_ratio=2).double()


BUILD = {"resnet": resnet, "vit": vit}


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_unit_sites_name_the_block_groups():
    names = [s.name for s in unit_sites(resnet())]
    assert names == ["block1.act1", "block2.act1"]
    site = unit_sites(resnet())[1]
    assert (site.incoming, site.norm, site.outgoing) == ("block2.conv1", "block2.norm1", ("block2.conv2",))
    assert [s.name for s in unit_sites(vit())] == ["block1.attn.v", "block1.mlp.act", "block2.attn.v",
                                                   "block2.mlp.act"]
    assert unit_sites(build_resnet(channels=(4,), norm="layer")) == []  # GroupNorm(1, C) mixes the channels
    assert unit_sites(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))) is None


def test_layer_wiring_follows_residual_streams_and_heads():
    wiring = layer_wiring(resnet())
    assert wiring["block2.conv1"] == ("block2.conv1", "block1")
    assert wiring["block2.shortcut.conv"] == ("block2.shortcut.conv", "block1")
    assert wiring["block1.conv1"] == ("block1.conv1", "stem") and wiring["head"] == ("head", "block2")
    wiring = layer_wiring(vit())
    assert wiring["block2.attn.q"] == ("block2.attn.q", "block1")
    assert wiring["block1.attn.o"] == ("block1.attn.o", "block1.attn.v")
    assert wiring["block1.mlp.fc2"] == ("block1.mlp.fc2", "block1.mlp.fc1")
    sequential = layer_wiring(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
    assert sequential == {"0": ("0", None), "2": ("2", "1")}


@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_groups_read_the_right_rows_and_columns(arch):
    """Zero a unit's outgoing columns: then redrawing its incoming rows (and norm) changes nothing downstream."""
    model = BUILD[arch]().eval()
    groups = architecture_unit_groups(model)
    assert [g.name for g in groups] == [s.name for s in unit_sites(model)]
    assert resolve_unit_groups(model)[0].incoming is groups[0].incoming
    x = images()
    for group in groups:
        with torch.no_grad():
            group.outgoing.weight[:, 0] = 0.0
            before = model(x)
            group.incoming.weight[0].normal_()
            if group.norm is not None:
                group.norm.weight[0] = 3.0
        assert torch.equal(model(x).detach(), before)
        with torch.no_grad():
            group.incoming.weight[1].normal_()  # a unit that is still read: the output moves
        assert not torch.allclose(model(x).detach(), before)


@pytest.mark.parametrize("arch", ["resnet", "vit"])
@pytest.mark.parametrize("method_cls", [ContinualBackprop, ReDo, ResetFrozen])
def test_reset_of_units_without_outgoing_weights_changes_no_output(arch, method_cls):
    model = BUILD[arch]()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    method = method_cls(method_cls.Config(seed=0))
    method.attach(model, optimizer)
    x = images()
    model(x).sum().backward()
    optimizer.step()  # Adam state exists, so its reset is exercised too
    model.eval()
    masks = []
    for group in method.groups:
        mask = torch.zeros(group.num_units, dtype=torch.bool)
        mask[::2] = True
        with torch.no_grad():
            group.outgoing.weight[:, mask] = 0.0
        masks.append(mask)
    with torch.no_grad():
        before = model(x)
    incoming = [g.incoming.weight.detach().clone() for g in method.groups]
    for index, mask in enumerate(masks):
        assert method._reset_units(index, mask, optimizer) == int(mask.sum())
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-12)
    for group, old, mask in zip(method.groups, incoming, masks):
        changed = (group.incoming.weight.detach() != old).flatten(1).any(dim=1)
        assert torch.equal(changed, mask), group.name


def _kill_units(model: nn.Module, arch: str) -> dict[str, list[int]]:
    """Make units 0 and 2 of every activation group dead (exactly zero output on every input)."""
    dead = {}
    with torch.no_grad():
        for group in architecture_unit_groups(model):
            if group.activation is None:
                continue
            if arch == "resnet":  # BatchNorm output -1 whatever the batch, so ReLU gives 0
                group.norm.weight[[0, 2]] = 0.0
                group.norm.bias[[0, 2]] = -1.0
            else:  # GELU(-1000) = -0.0
                group.incoming.weight[[0, 2]] = 0.0
                group.incoming.bias[[0, 2]] = -1000.0
            dead[group.name] = [0, 2]
    return dead


@pytest.mark.parametrize("arch", ["resnet", "vit"])
@pytest.mark.parametrize("method_name", ["redo", "reset_frozen"])
def test_periodic_resets_of_dead_units_keep_the_function(arch, method_name):
    model = BUILD[arch]()
    dead = _kill_units(model, arch)
    if method_name == "redo":
        method = ReDo(ReDoConfig(every=3, window_steps=3, tau=0.0, seed=0))
    else:
        method = ResetFrozen(ResetFrozenConfig(every=3, window_steps=3, seed=0))
    reference = copy.deepcopy(model)  # trained the same way without the method (BatchNorm statistics move)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: only the resets change the weights
    method.attach(model, optimizer)
    for step in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images(seed=step)), torch.arange(6) % 10).backward()
        method.before_step(model, optimizer, step)
        optimizer.step()
        method.after_step(model, optimizer, step)
        with torch.no_grad():
            reference(images(seed=step))
    reset = {g.name: n for g, n in zip(method.groups, method.replaced_per_group) if n}
    assert reset == {name: len(units) for name, units in dead.items()}
    model.eval()
    reference.eval()
    probe = images(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(model(probe), reference(probe), rtol=0, atol=1e-10)
        group = method.groups[-1]
        assert torch.all(group.outgoing.weight[:, dead[group.name]] == 0)


@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_cbp_trains_resnet_and_vit_and_replaces_units(arch):
    model = BUILD[arch]()
    method = ContinualBackprop(CBPConfig(replacement_rate=0.2, maturity=1, seed=0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    method.attach(model, optimizer)
    for step in range(4):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images(seed=step)), torch.arange(6) % 10)
        loss.backward()
        method.before_step(model, optimizer, step)
        optimizer.step()
        method.after_step(model, optimizer, step)
    assert method.total_replaced > 0 and all(n > 0 for n in method.replaced_per_group)
    assert torch.isfinite(model(images())).all()
