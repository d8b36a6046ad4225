"""The one definition of which modules are activations and which are weight layers (a leaf module: imports torch only).

Every part of lopkit that walks a model (the Monitor, the theory of cloned units, the mitigations) reads these
lists and predicates, so a new activation or weight layer is added in one place.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

__all__ = [
    "ACTIVATION_MODULE_PATHS",
    "ACTIVATION_TYPES",
    "CLONABLE_ELEMENTWISE",
    "ELEMENTWISE_ACTIVATIONS",
    "HF_CONV1D_MODULE_PREFIX",
    "TRANSPOSED_CONVS",
    "WEIGHT_LAYERS",
    "is_activation",
    "is_hf_conv1d",
    "is_weight_layer",
    "splits_units",
    "unit_activation",
    "unit_pre_activation",
    "unwrap_model",
    "wrapper_chain",
]

#: Parameter-free, deterministic elementwise activations: each unit's output is the same fixed function of that
#: unit's input alone (what the theory of cloned units needs).
ELEMENTWISE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.LogSigmoid, nn.Threshold,
)  # fmt: skip

#: Every elementwise activation module of torch: the parameter-free ones plus ``PReLU`` (learned slope) and
#: ``RReLU`` (random slope in training). Post-activation ``h`` = output, ``z`` = input.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = ELEMENTWISE_ACTIVATIONS + (nn.PReLU, nn.RReLU)

#: Modules that :func:`lopkit.theory.cloning.clone` copies unit-wise unchanged: the elementwise activations and
#: ``nn.Identity``.
CLONABLE_ELEMENTWISE: tuple[type[nn.Module], ...] = ELEMENTWISE_ACTIVATIONS + (nn.Identity,)

#: Python modules whose ``nn.Module`` classes are all elementwise activations, recognised by the module path of
#: their class so the package is never imported: Hugging Face's ``GELUActivation``, ``NewGELUActivation``,
#: ``QuickGELUActivation``, ... (``ACT2FN``).
ACTIVATION_MODULE_PATHS: tuple[str, ...] = ("transformers.activations",)

#: Weight layers whose weight is laid out ``(out, in, *kernel)``: one row (or filter) per output unit.
WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: Transposed convolutions: weight layers whose weight is laid out ``(in, out / groups, *kernel)``.
TRANSPOSED_CONVS: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

#: Package prefix of Hugging Face's ``Conv1D`` (GPT-2's linear layer, weight laid out ``(in, out)``).
HF_CONV1D_MODULE_PREFIX = "transformers."


def is_activation(module: nn.Module, extra_types: tuple[type[nn.Module], ...] = ()) -> bool:
    """Whether a module is an activation: an elementwise one (torch's, an extra type, a known package's) or one
    that declares its unit map (:func:`splits_units`, e.g. lopkit's CReLU)."""
    return isinstance(module, ACTIVATION_TYPES + tuple(extra_types)) or (
        type(module).__module__ in ACTIVATION_MODULE_PATHS) or splits_units(module)


def splits_units(module: nn.Module) -> bool:
    """Whether an activation module declares how its output units come from its input (``unit_pre_activation``).

    Such a module (lopkit's CReLU: ``concat(relu(z), relu(-z))``) has more output units than input features; its
    output is ``unit_activation(unit_pre_activation(z))``, an elementwise activation of a per-unit pre-activation
    with the output's shape. Every output feature is a unit, as the next weight layer sees it.
    """
    return callable(getattr(module, "unit_pre_activation", None)) and callable(getattr(module, "unit_activation", None))


def unit_pre_activation(module: nn.Module, z: Tensor) -> Tensor:
    """The per-output-unit pre-activation of an activation module's input ``z`` (``z`` itself when elementwise)."""
    return module.unit_pre_activation(z) if splits_units(module) else z


def unit_activation(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """The elementwise function each output unit applies to its :func:`unit_pre_activation` (the module itself
    when it is elementwise)."""
    return module.unit_activation if splits_units(module) else module


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether a module is Hugging Face's ``Conv1D`` (GPT-2), by class name, without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith(HF_CONV1D_MODULE_PREFIX)


def is_weight_layer(module: nn.Module, hf_conv1d: bool = True) -> bool:
    """Whether a module is a weight layer: ``nn.Linear``, ``nn.Conv1d/2d/3d`` or (``hf_conv1d``) HF's ``Conv1D``.

    Only the torch layers have their weight laid out ``(out, in, *kernel)``; ``Conv1D`` stores ``(in, out)``.
    """
    return isinstance(module, WEIGHT_LAYERS) or (hf_conv1d and is_hf_conv1d(module))


def wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """``model`` and every module it wraps, outermost first, through ``DistributedDataParallel``, ``DataParallel`` and
    ``torch.compile`` wrappers (in any nesting); a plain model gives ``[model]``."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    chain = [model]
    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile's wrapper (torch._dynamo.eval_frame.OptimizedModule)
        else:
            return chain
        chain.append(model)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's own module inside any ``DistributedDataParallel``, ``DataParallel`` or ``torch.compile`` wrappers.

    Model walkers (unit groups, the Monitor) read it, so layer names carry no ``module.`` or ``_orig_mod.`` prefix
    and a probe forward never enters DDP (whose backward would wait for the other ranks). The parameters are
    shared with the wrapper, so what a method changes on the inner module is what the wrapper trains.
    """
    return wrapper_chain(model)[-1]
