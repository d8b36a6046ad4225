"""One definition of activation and weight-layer types (lopkit.layer_types), shared by every model walker."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from lopkit import layer_types as lt

_MIXERS = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.MultiheadAttention, nn.GLU)


def test_activation_types_are_torchs_elementwise_activation_modules():
    """Every class of torch.nn.modules.activation that acts unit by unit, and nothing else."""
    module = torch.nn.modules.activation
    torch_classes = {c for c in vars(module).values()
                     if isinstance(c, type) and issubclass(c, nn.Module) and c.__module__ == module.__name__}
    assert set(lt.ACTIVATION_TYPES) == torch_classes - set(_MIXERS)
    assert set(lt.ACTIVATION_TYPES) - set(lt.ELEMENTWISE_ACTIVATIONS) == {nn.PReLU, nn.RReLU}
    assert set(lt.CLONABLE_ELEMENTWISE) - set(lt.ELEMENTWISE_ACTIVATIONS) == {nn.Identity}


def test_is_activation_knows_torch_extra_and_hugging_face_classes():
    class Custom(nn.Module):
        def forward(self, x):
            return x

    hf_gelu = type("GELUActivation", (nn.Module,), {"__module__": "transformers.activations"})
    assert lt.is_activation(nn.GELU()) and lt.is_activation(nn.PReLU())
    assert not lt.is_activation(nn.Softmax(dim=-1)) and not lt.is_activation(nn.Linear(2, 2))
    assert not lt.is_activation(Custom()) and lt.is_activation(Custom(), (Custom,))
    assert lt.is_activation(hf_gelu())


def test_an_activation_that_declares_its_unit_map_is_an_activation_with_one_unit_per_output_feature():
    class Split(nn.Module):
        def forward(self, z):
            return torch.cat((z.relu(), (-z).relu()), dim=-1)

        def unit_pre_activation(self, z):
            return torch.cat((z, -z), dim=-1)

        unit_activation = staticmethod(torch.relu)

    module, z = Split(), torch.tensor([[1.0, -2.0]])
    assert lt.splits_units(module) and lt.is_activation(module) and not lt.splits_units(nn.ReLU())
    assert lt.unit_pre_activation(module, z).tolist() == [[1.0, -2.0, -1.0, 2.0]]
    assert lt.unit_activation(module)(lt.unit_pre_activation(module, z)).tolist() == module(z).tolist()
    relu = nn.ReLU()
    assert lt.unit_pre_activation(relu, z) is z and lt.unit_activation(relu) is relu


def test_is_weight_layer_recognises_hugging_face_conv1d_by_name():
    fake = type("Conv1D", (nn.Module,), {"__module__": "transformers.pytorch_utils"})
    other = type("Conv1D", (nn.Module,), {"__module__": "mypackage.layers"})
    assert lt.is_weight_layer(nn.Linear(2, 3)) and lt.is_weight_layer(nn.Conv2d(1, 2, 3))
    assert not lt.is_weight_layer(nn.ConvTranspose2d(1, 2, 3)) and not lt.is_weight_layer(nn.ReLU())
    assert lt.is_hf_conv1d(fake()) and lt.is_weight_layer(fake())
    assert not lt.is_weight_layer(fake(), hf_conv1d=False)
    assert not lt.is_hf_conv1d(other()) and not lt.is_weight_layer(other())


def test_real_hugging_face_conv1d_is_a_weight_layer():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    assert lt.is_weight_layer(pytorch_utils.Conv1D(4, 3))


def test_every_walker_reads_the_one_definition():
    from lopkit.benchmarks import continual
    from lopkit.diagnostics import monitor
    from lopkit.mitigations import layers, perturbation
    from lopkit.theory import cloning, invariance, manifolds

    assert monitor.ACTIVATION_TYPES is lt.ACTIVATION_TYPES and continual.is_activation is lt.is_activation
    assert monitor.PARAMETRIC_TYPES is lt.WEIGHT_LAYERS and monitor.is_activation_module is lt.is_activation
    assert manifolds.WEIGHT_LAYERS is lt.WEIGHT_LAYERS and invariance.WEIGHT_LAYERS is lt.WEIGHT_LAYERS
    assert manifolds.ELEMENTWISE_ACTIVATIONS is lt.ELEMENTWISE_ACTIVATIONS
    assert cloning._ELEMENTWISE is lt.CLONABLE_ELEMENTWISE and layers._WEIGHT_TYPES is lt.WEIGHT_LAYERS
    # shrink-and-perturb keeps acting on every torch convolution, transposed ones included
    assert set(perturbation.WEIGHT_LAYER_TYPES) == set(lt.WEIGHT_LAYERS + lt.TRANSPOSED_CONVS)


def test_layer_types_is_a_leaf_module():
    code = "import sys, lopkit.layer_types; print(sorted(m for m in sys.modules if m.startswith('lopkit.')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['lopkit._lazy', 'lopkit.layer_types']"  # the package's lazy-export helper only


def test_monitor_measures_a_gpt2_by_default_including_its_conv1d_layers():
    """Hugging Face GPT-2 keeps its projections in Conv1D (weight (in, out)); the default Monitor picks them up."""
    transformers = pytest.importorskip("transformers")
    import lopkit as lk

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                                     eos_token_id=0)
    model = transformers.GPT2Model(config).eval()
    monitor = lk.Monitor(model)
    chosen = {layer.name for layer in monitor.layers}
    assert {"h.0.attn.c_attn", "h.0.mlp.c_fc", "h.0.mlp.c_proj", "h.0.mlp.act"} <= chosen
    rows = monitor.measure(torch.randint(0, 50, (4, 8)))
    assert {r["layer"] for r in rows} >= {"h.0.mlp.c_fc", "h.0.mlp.act"}
    dead = [r["value"] for r in rows if r["layer"] == "h.0.mlp.act" and r["metric"] == "dead_fraction"]
    assert len(dead) == 1 and 0.0 <= dead[0] <= 1.0
