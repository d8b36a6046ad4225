"""MLP and CNN builders for the benchmarks: plain ``nn.Sequential`` of standard modules with readable names.

Both builders follow the paper's layer order (section 4.1): weight layer, normalisation *before* the
activation, activation, then dropout (CNN: max-pool after the activation, dropout only in the FC part).
Modules are named by hidden layer so Monitor rows read well::

    MLP: flatten, fc1, norm1, act1, drop1, fc2, ..., head
    CNN: conv1, norm1, act1, pool1, conv2, ..., flatten, fc3, norm3, act3, drop3, ..., head

(``normK``/``dropK`` exist only when normalisation/dropout is on.) Numbering runs through conv and FC
layers, so ``act3`` is always the third hidden layer. Because only standard modules are used,
:func:`lopkit.theory.clone` and :class:`lopkit.diagnostics.monitor.Monitor` work on the results directly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "NORMS",
    "build_cnn",
    "build_mlp",
    "check_dropout",
    "check_positive_int",
    "check_sizes",
    "head_layer",
    "make_activation",
    "spatial_size",
    "zero_head_",
]

#: Activation names accepted by the builders -> module factory.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "identity": nn.Identity,
}

#: Normalisation names (None and "none" both mean no normalisation).
NORMS: tuple[str, ...] = ("none", "batch", "layer")

#: Weight initialisations: PyTorch's default, or Kaiming/Xavier with zero biases.
INITS: tuple[str, ...] = ("default", "kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal")

# Gain used by the Kaiming/Xavier inits for each activation (ReLU-like smooth activations use ReLU's gain).
_GAIN_NAMES = {
    "relu": "relu", "leaky_relu": "leaky_relu", "tanh": "tanh", "sigmoid": "sigmoid", "gelu": "relu",
    "elu": "relu", "selu": "selu", "silu": "relu", "softplus": "relu", "identity": "linear",
}  # fmt: skip


def make_activation(name: str) -> nn.Module:
    """A fresh activation module from its name (see :data:`ACTIVATIONS`)."""
    if not isinstance(name, str) or name.lower() not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name.lower()]()


def _check_norm(norm: str | None) -> str:
    """Canonical normalisation name ('none', 'batch' or 'layer')."""
    canonical = "none" if norm is None else norm
    if not isinstance(canonical, str) or canonical.lower() not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose None/'none', 'batch' or 'layer'")
    return canonical.lower()


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` if it is a positive int, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_sizes(values: Sequence[int], name: str, allow_empty: bool) -> tuple[int, ...]:
    """Return a tuple of positive layer sizes, or raise ValueError."""
    if isinstance(values, (int, str)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence of positive integers, e.g. (128, 128), got {values!r}")
    sizes = tuple(check_positive_int(v, f"each entry of {name}") for v in values)
    if not sizes and not allow_empty:
        raise ValueError(f"{name} must hold at least one layer size")
    return sizes


def check_dropout(dropout: float) -> float:
    """Return ``dropout`` if it is a probability in [0, 1), else raise ValueError."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    return float(dropout)


def _check_common(activation: str, norm: str | None, affine: bool, dropout: float, init: str) -> tuple[str, float]:
    """Validate the options shared by both builders; return (canonical norm, dropout)."""
    make_activation(activation)
    if not isinstance(affine, bool):
        raise ValueError(f"affine must be True or False, got {affine!r}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    return _check_norm(norm), check_dropout(dropout)


def _initialise(model: nn.Module, init: str, activation: str) -> None:
    """Re-initialise every Linear/Conv weight with ``init`` (biases zeroed); 'default' keeps PyTorch's init."""
    if init == "default":
        return
    nonlinearity = _GAIN_NAMES[activation.lower()]
    slope = 0.01 if nonlinearity == "leaky_relu" else 0.0  # nn.LeakyReLU's default negative slope
    gain = nn.init.calculate_gain(nonlinearity, slope)
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if init == "kaiming_uniform":
            nn.init.kaiming_uniform_(module.weight, a=slope, nonlinearity=nonlinearity)
        elif init == "kaiming_normal":
            nn.init.kaiming_normal_(module.weight, a=slope, nonlinearity=nonlinearity)
        elif init == "xavier_uniform":
            nn.init.xavier_uniform_(module.weight, gain=gain)
        else:
            nn.init.xavier_normal_(module.weight, gain=gain)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _fc_block(
    index: int, in_size: int, out_size: int, activation: str, norm: str, affine: bool, dropout: float
) -> list[tuple[str, nn.Module]]:
    """fcK -> [normK] -> actK -> [dropK], the paper's order (normalisation before the activation)."""
    layers: list[tuple[str, nn.Module]] = [(f"fc{index}", nn.Linear(in_size, out_size))]
    if norm == "batch":
        layers.append((f"norm{index}", nn.BatchNorm1d(out_size, affine=affine)))
    elif norm == "layer":
        layers.append((f"norm{index}", nn.LayerNorm(out_size, elementwise_affine=affine)))
    layers.append((f"act{index}", make_activation(activation)))
    if dropout > 0:
        layers.append((f"drop{index}", nn.Dropout(dropout)))
    return layers


def build_mlp(
    in_features: int,
    hidden: Sequence[int] = (128,) * 5,
    out_features: int = 10,
    activation: str = "relu",
    norm: str | None = None,
    affine: bool = True,
    dropout: float = 0.0,
    *,
    init: str = "default",
) -> nn.Sequential:
    """An MLP ``flatten, (fc, [norm], act, [dropout]) x len(hidden), head`` (defaults: the paper's 5 x 128 ReLU).

    ``norm`` is None/"none", "batch" (BatchNorm1d) or "layer" (LayerNorm), placed before the activation,
    with learnable affine parameters when ``affine``. The leading ``Flatten`` lets the MLP take images too.
    """
    in_features = check_positive_int(in_features, "in_features")
    out_features = check_positive_int(out_features, "out_features")
    sizes = check_sizes(hidden, "hidden", allow_empty=True)
    norm, dropout = _check_common(activation, norm, affine, dropout, init)
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    width = in_features
    for index, size in enumerate(sizes, start=1):
        layers += _fc_block(index, width, size, activation, norm, affine, dropout)
        width = size
    layers.append(("head", nn.Linear(width, out_features)))
    model = nn.Sequential(OrderedDict(layers))
    _initialise(model, init, activation)
    return model


def spatial_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) from an int or a pair, validated."""
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if isinstance(image_size, (str, bytes)) or not isinstance(image_size, Sequence) or len(image_size) != 2:
        raise ValueError(f"image_size must be an int or a (height, width) pair, got {image_size!r}")
    height, width = (check_positive_int(v, "image_size") for v in image_size)
    return height, width


def build_cnn(
    in_channels: int,
    image_size: int | Sequence[int],
    channels: Sequence[int] = (16, 32),
    fc: Sequence[int] = (128,),
    out_features: int = 10,
    norm: str | None = None,
    affine: bool = True,
    dropout: float = 0.0,
    activation: str = "relu",
    *,
    init: str = "default",
) -> nn.Sequential:
    """A CNN ``(conv3x3 pad 1, [norm], act, maxpool2) x len(channels), flatten, (fc, [norm], act, [dropout])..., head``.

    "layer" normalisation is GroupNorm(1, C) for conv layers (as the paper's code) and LayerNorm for FC
    layers; "batch" is BatchNorm2d / BatchNorm1d. Dropout applies to the FC part only (paper, section 4.1).
    Each pool halves the spatial size (floor), so ``image_size`` must survive ``len(channels)`` halvings.
    """
    in_channels = check_positive_int(in_channels, "in_channels")
    out_features = check_positive_int(out_features, "out_features")
    conv_sizes = check_sizes(channels, "channels", allow_empty=False)
    fc_sizes = check_sizes(fc, "fc", allow_empty=True)
    norm, dropout = _check_common(activation, norm, affine, dropout, init)
    height, width = spatial_size(image_size)
    final_h, final_w = height >> len(conv_sizes), width >> len(conv_sizes)
    if final_h < 1 or final_w < 1:
        raise ValueError(
            f"image_size {height}x{width} is too small for {len(conv_sizes)} 2x2 max-pools; "
            "use fewer conv layers or larger images"
        )
    layers: list[tuple[str, nn.Module]] = []
    previous = in_channels
    for index, size in enumerate(conv_sizes, start=1):
        layers.append((f"conv{index}", nn.Conv2d(previous, size, kernel_size=3, stride=1, padding=1)))
        if norm == "batch":
            layers.append((f"norm{index}", nn.BatchNorm2d(size, affine=affine)))
        elif norm == "layer":
            layers.append((f"norm{index}", nn.GroupNorm(1, size, affine=affine)))
        layers.append((f"act{index}", make_activation(activation)))
        layers.append((f"pool{index}", nn.MaxPool2d(2)))
        previous = size
    layers.append(("flatten", nn.Flatten()))
    features = previous * final_h * final_w
    for offset, size in enumerate(fc_sizes, start=len(conv_sizes) + 1):
        layers += _fc_block(offset, features, size, activation, norm, affine, dropout)
        features = size
    layers.append(("head", nn.Linear(features, out_features)))
    model = nn.Sequential(OrderedDict(layers))
    _initialise(model, init, activation)
    return model


def head_layer(model: nn.Module) -> nn.Linear:
    """The output layer: the module named ``head`` if any, else the last ``nn.Linear`` of the model."""
    named = dict(model.named_modules())
    head = named.get("head")
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear output layer to use as the head")
    return linears[-1]


@torch.no_grad()
def zero_head_(model: nn.Module) -> None:
    """Zero the head's weight and bias in place (the class-split protocol does this at every task start)."""
    head = head_layer(model)
    head.weight.zero_()
    if head.bias is not None:
        head.bias.zero_()

