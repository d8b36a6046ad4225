"""Training-time checks of the LoP manifolds: clones stay clones, frozen units stay frozen.

:func:`track_clone_training` trains a cloned network with minibatch SGD, SGD + momentum or Adam
(a fresh optimiser, so its state starts identical across clones) and records forward and backward
cloning R^2 for every partitioned module.  Without noise or dropout both stay at 1 (Theorem 2.1,
Remark 2.4); noisy SGD or dropout break the symmetry and R^2 falls below 1.

Noisy SGD (paper App. B.1.2): ``g <- g + eps``, ``eps ~ N(0, sigma_t^2 ||g||^2 I)``,
``sigma_t = noise_sigma * noise_decay ** t`` (t = 0, 1, ...; ``noise_decay = 0`` means a single
noisy first step since ``0 ** 0 = 1``).  We apply it **per parameter tensor**: ``||g||`` is the
norm of that tensor's gradient, so every tensor gets noise proportional to its own gradient scale
(the authors' code does the same); the noise is added before the optimiser step, so Adam and
momentum see the noisy gradient.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import nn

from lopkit.diagnostics.cloning import cloning_r2
from lopkit.diagnostics.units import as_unit_matrix
from lopkit.layer_types import ELEMENTWISE_ACTIVATIONS, WEIGHT_LAYERS
from lopkit.seeding import rng_sandbox
from lopkit.theory.manifolds import frozen_units

__all__ = [
    "track_clone_training",
    "measure_cloning",
    "probe_clone_tensors",
    "add_relative_gradient_noise",
    "make_optimizer",
    "incoming_parameters",
    "frozen_incoming_change",
    "frozen_layer_units",
    "OPTIMIZERS",
    "snapshot",
]

OPTIMIZERS = ("sgd", "momentum", "adam")
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_PER_UNIT_PASSTHROUGH = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Identity) + _DROPOUT_TYPES


def make_optimizer(
    params, name: str, lr: float, *, momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.Optimizer:
    """Fresh optimiser: ``"sgd"`` (no momentum), ``"momentum"`` (SGD with ``momentum``) or ``"adam"``."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.0)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def add_relative_gradient_noise(params, sigma: float, generator: torch.Generator | None = None) -> None:
    """In place ``g += sigma * ||g|| * N(0, I)`` for every parameter tensor with a gradient (per-tensor norm)."""
    if sigma == 0.0:
        return
    for param in params:
        if param.grad is None:
            continue
        grad = param.grad
        noise = torch.randn(grad.shape, generator=generator, dtype=grad.dtype).to(grad.device)
        grad.add_(noise * (sigma * torch.linalg.vector_norm(grad)))


def _default_loss(targets: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if targets.dtype.is_floating_point:
        return nn.functional.mse_loss
    return nn.functional.cross_entropy


def _unit_matrix(t: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """``(N, D) -> (N, D)``; ``(N, C, *spatial) -> (N * prod(spatial), C)`` (channels are units);
    with ``channels_last`` ``(N, T, D) -> (N * T, D)`` (tokens are samples)."""
    if t.dim() < 2:
        raise ValueError(f"module output must have a batch and a unit dimension, got shape {tuple(t.shape)}")
    return as_unit_matrix(t, channels_last=channels_last)


def probe_clone_tensors(
    model: nn.Module,
    names: list[str] | tuple[str, ...] | Mapping[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Probe loss and, per named module, its output and dL/d(output) as unit matrices, in eval mode, on one batch.

    Gradients come from ``torch.autograd.grad`` (``.grad`` fields are untouched); a module the loss does not
    reach gets a zero gradient. In-place activations are switched off during the probe so captures stay valid.
    """
    loss_fn = loss_fn or _default_loss(targets)
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"partition names {missing} are not modules of the model; was it built for this model?")
    captured: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(_capture_output(captured, name)) for name in names]
    inplace_modules = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    was_training = model.training
    for m in inplace_modules:
        m.inplace = False
    model.eval()
    try:
        with torch.enable_grad():
            loss = loss_fn(model(inputs), targets)
            order = list(captured)
            grads = torch.autograd.grad(loss, [captured[n] for n in order], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        for m in inplace_modules:
            m.inplace = True
        model.train(was_training)
    units_last = getattr(names, "channels_last", frozenset())  # a Partition says which outputs are token-wise
    tensors = {}
    for name, grad in zip(order, grads):
        output = captured[name].detach()
        grad = torch.zeros_like(output) if grad is None else grad.detach()
        last = name in units_last
        tensors[name] = (_unit_matrix(output, last), _unit_matrix(grad, last))
    return float(loss.detach()), tensors


def measure_cloning(
    model: nn.Module,
    partition: Mapping[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    *,
    legacy_std_ratio: bool = False,
) -> dict[str, dict[str, float]]:
    """Forward / backward cloning R^2 of every partitioned module and the loss on one batch, in eval mode.

    Forward R^2 uses the module outputs, backward R^2 the gradients of the loss with respect to those
    outputs (see :func:`probe_clone_tensors`).  Returns
    ``{"loss": {"model": value}, "cloning_r2_forward": {layer: r2}, "cloning_r2_backward": {layer: r2}}``.
    """
    loss, tensors = probe_clone_tensors(model, partition, inputs, targets, loss_fn)
    forward, backward = {}, {}
    for name, (output, grad) in tensors.items():
        block_ids = partition[name]
        forward[name] = cloning_r2(output, block_ids, legacy_std_ratio=legacy_std_ratio)
        backward[name] = cloning_r2(grad, block_ids, legacy_std_ratio=legacy_std_ratio)
    return {"loss": {"model": loss}, "cloning_r2_forward": forward, "cloning_r2_backward": backward}


def _capture_output(store: dict, name: str):
    def hook(_module, _args, output):
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"module {name!r} returns {type(output).__name__}, not a tensor; cannot measure cloning")
        store[name] = output

    return hook


def _set_dropout(model: nn.Module, p: float) -> None:
    dropouts = [m for m in model.modules() if isinstance(m, _DROPOUT_TYPES)]
    if p > 0 and not dropouts:
        raise ValueError(
            f"dropout={p} but the model has no Dropout modules; add nn.Dropout layers (clone() keeps them) to use it"
        )
    for m in dropouts:
        m.p = p


def track_clone_training(
    model: nn.Module,
    partition: Mapping[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    optimizer: str = "sgd",
    lr: float = 0.01,
    steps: int = 200,
    batch_size: int = 32,
    noise_sigma: float = 0.0,
    noise_decay: float = 1.0,
    dropout: float = 0.0,
    seed: int = 0,
    momentum: float = 0.9,
    record_every: int = 10,
    probe_inputs: torch.Tensor | None = None,
    probe_targets: torch.Tensor | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    legacy_std_ratio: bool = False,
) -> list[dict]:
    """Train ``model`` in place from a fresh optimiser and record cloning R^2 (forward/backward) and loss.

    Returns tidy rows ``{"step", "layer", "metric", "value"}`` with metrics ``cloning_r2_forward``
    and ``cloning_r2_backward`` per partitioned module, and ``loss`` (probe loss, eval mode) and
    ``train_loss`` (last minibatch) with layer ``"model"``; recorded at step 0, every
    ``record_every`` steps and after the last step.  The probe batch is ``probe_inputs`` or the
    first 256 training samples.  ``dropout`` sets ``p`` of every Dropout module of the model.
    Minibatch order, noise and dropout masks are seeded by ``seed`` (global RNG state is restored).
    """
    if len(inputs) != len(targets):
        raise ValueError(f"inputs ({len(inputs)}) and targets ({len(targets)}) must have the same length")
    if steps < 0 or batch_size < 1 or record_every < 1:
        raise ValueError("steps must be >= 0, batch_size >= 1 and record_every >= 1")
    if noise_sigma < 0 or not 0.0 <= dropout < 1.0:
        raise ValueError(f"noise_sigma must be >= 0 and dropout in [0, 1), got {noise_sigma}, {dropout}")
    loss_fn = loss_fn or _default_loss(targets)
    probe_x = inputs[:256] if probe_inputs is None else probe_inputs
    probe_y = targets[:256] if probe_targets is None else probe_targets
    _set_dropout(model, dropout)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optimizer, lr, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    rows: list[dict] = []
    train_loss = float("nan")

    def record(step: int) -> None:
        measured = measure_cloning(model, partition, probe_x, probe_y, loss_fn, legacy_std_ratio=legacy_std_ratio)
        measured["train_loss"] = {"model": train_loss}
        for metric, per_layer in measured.items():
            for layer, value in per_layer.items():
                rows.append({"step": step, "layer": layer, "metric": metric, "value": value})

    with rng_sandbox():
        torch.manual_seed(seed)
        order = torch.randperm(len(inputs), generator=generator)
        cursor = 0
        model.train()
        record(0)
        for step in range(steps):
            if cursor + batch_size > len(order):
                order, cursor = torch.randperm(len(inputs), generator=generator), 0
            index = order[cursor : cursor + batch_size]
            cursor += batch_size
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs[index]), targets[index])
            loss.backward()
            add_relative_gradient_noise(params, noise_sigma * noise_decay**step, generator)
            opt.step()
            train_loss = float(loss.detach())
            if (step + 1) % record_every == 0 or step + 1 == steps:
                record(step + 1)
    return rows


# ---------------------------------------------------------------------------------------------
# Frozen-unit manifold


def incoming_parameters(model: nn.Module, layer_name: str, unit_mask: torch.Tensor) -> torch.Tensor:
    """Flat copy of the incoming weights and bias of the masked output units of a Linear/Conv layer."""
    layer = dict(model.named_modules()).get(layer_name)
    if not isinstance(layer, WEIGHT_LAYERS):
        raise ValueError(f"{layer_name!r} is not a Linear/Conv layer of the model")
    mask = torch.as_tensor(unit_mask, dtype=torch.bool).to(layer.weight.device)
    if mask.shape != (layer.weight.shape[0],):
        raise ValueError(f"unit_mask must have shape ({layer.weight.shape[0]},), got {tuple(mask.shape)}")
    parts = [layer.weight.detach()[mask].reshape(-1)]
    if layer.bias is not None:
        parts.append(layer.bias.detach()[mask])
    return torch.cat(parts).clone()


def frozen_incoming_change(before: nn.Module, after: nn.Module, layer_name: str, unit_mask: torch.Tensor) -> float:
    """Largest absolute change of the masked units' incoming weights and bias between two model states.

    On the frozen-unit manifold this is exactly 0 for SGD, momentum and Adam (zero gradients keep
    Adam's moments at 0, so its update ``m / (sqrt(v) + eps)`` is 0 too), with no weight decay.
    """
    old = incoming_parameters(before, layer_name, unit_mask)
    new = incoming_parameters(after, layer_name, unit_mask)
    if old.numel() == 0:
        return 0.0
    return float((new - old).abs().max())


def frozen_layer_units(model: nn.Module, inputs: torch.Tensor, *, atol: float = 0.0) -> dict[str, torch.Tensor]:
    """Linear/Conv layer name -> mask of its output units that feed a frozen activation (``|f'| <= atol``).

    Follows the leaf modules in registration order (forward order for ``nn.Sequential``); a layer is
    linked to the activation only through per-unit modules (BatchNorm, Dropout, Identity), for which a
    zero downstream derivative implies zero gradient on the layer's incoming parameters.
    """
    masks = frozen_units(model, inputs, atol=atol)
    result: dict[str, torch.Tensor] = {}
    last_layer: str | None = None
    for name, module in model.named_modules():
        if len(list(module.children())) > 0:
            continue
        if isinstance(module, WEIGHT_LAYERS):
            last_layer = name
        elif isinstance(module, ELEMENTWISE_ACTIVATIONS) and last_layer is not None and name in masks:
            result[last_layer] = masks[name]
            last_layer = None
        elif not isinstance(module, _PER_UNIT_PASSTHROUGH):
            last_layer = None
    return result


def snapshot(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` for before/after comparisons."""
    return copy.deepcopy(model)
