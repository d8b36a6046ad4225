"""Train several runs of a continual benchmark (seeds, or configs that differ only in ``lr``) as one learner.

:class:`VectorisedContinual` holds one ordinary :class:`~lopkit.benchmarks.continual.ContinualBenchmark` per
member run (its tasks, data stream, probe, Monitor, accumulators, RNG: everything a separate run has) and
replaces only the optimiser step: the members' parameters and BatchNorm running statistics are stacked along a
leading member axis, every member's next minibatch is drawn from its *own* stream exactly as its separate run
draws it, and one batched forward (``torch.baddbmm`` per linear layer; for the CNN one grouped convolution over
the members' channels, pools per channel), one backward of the summed member losses and one elementwise optimiser
update advance all members at once. Each member's ``nn.Module`` parameters and buffers are views of its slice of
the stacked tensors, so the per-member task boundaries (head reset), evaluations and Monitor measurements (eval
mode: BatchNorm on that member's running statistics) run unchanged on the current state.

Normalisation follows ``nn.BatchNorm*d`` / ``nn.LayerNorm`` / ``nn.GroupNorm`` exactly (batch statistics and
in-place running-statistic updates per member in train mode). Dropout uses the masks the separate run draws:
before each step, under each member's own RNG, ``F.dropout`` of ones of each dropout layer's input shape, in
forward order (the draws of the separate forward), so the stacked step multiplies by the same masks.

Rows, and each member's :meth:`state_dict`, are those of the separate run (a checkpoint written here resumes
as a separate run and the other way round). They agree with the separate runs to float32 rounding, not bit for
bit: the batched matmul and the grouped convolution sum in another order. Like any online trajectory, last-bit
differences can grow over long runs (a ReLU pre-activation within rounding of 0 flips, a max-pool tie), and
faster with normalisation: a bias just before BatchNorm has an exact gradient of 0, so it holds rounding noise
(Adam scales it to lr-sized steps) that reaches the eval-mode rows through the running mean. Expect close
agreement over the first hundreds of steps and statistical agreement after that, as between two machines.

What is vectorised (:func:`continual_refusal` says why anything else is not, in one line): the MLP and CNN
(:data:`VECTORISED_MODELS`) with any norm (affine or not), activation and dropout, no mitigation method, Adam or
SGD; members whose configs differ only in :data:`VARYING_FIELDS` (an lr grid) and that have the same task lengths.
The optimiser is an elementwise application of PyTorch's Adam (its functional, fused kernel) and SGD formulas,
one lr per member, so member ``s`` of the stacked state equals its separate run's optimizer state. Members that
do not fit together raise ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.adam import adam

from lopkit.benchmarks.base import MemberGroup, check_finite_loss, differing_fields_refusal, stacked_sgd_
from lopkit.benchmarks.continual import ContinualBenchmark, ContinualConfig, _gather_inputs
from lopkit.benchmarks.models import ACTIVATIONS
from lopkit.mitigations.base import Mitigation

__all__ = [
    "VARYING_FIELDS",
    "VECTORISED_MODELS",
    "VectorisedContinual",
    "continual_refusal",
    "draw_dropout_noise",
    "dropout_shapes",
    "stacked_forward",
]

#: Config fields that may differ between the members of one vectorised learner (they change no shape).
VARYING_FIELDS: tuple[str, ...] = ("lr",)

#: Continual ``model`` values the stacked forward covers (any norm, affine or not, any activation, dropout).
VECTORISED_MODELS: tuple[str, ...] = ("mlp", "cnn")

_ACTIVATION_TYPES = tuple(factory for factory in ACTIVATIONS.values() if isinstance(factory, type))


def _active_methods(methods: Mitigation | Sequence[Mitigation] | None) -> list[Mitigation]:
    """The mitigations in ``methods`` (a Compose is unpacked; None means none)."""
    if methods is None:
        return []
    inner = getattr(methods, "methods", None)
    if isinstance(methods, Mitigation):
        return list(inner) if inner is not None else [methods]
    return list(methods)


def continual_refusal(
    configs: Sequence[ContinualConfig], methods: Mitigation | Sequence[Mitigation] | None = None
) -> str | None:
    """Why these continual runs cannot be trained as one vectorised learner, in one line (None when they can)."""
    if not configs:
        return "no runs to vectorise"
    present = _active_methods(methods)
    if present:
        names = ", ".join(getattr(m, "name", type(m).__name__) for m in present)
        return f"method {names} is not vectorised (it changes the model or the step of each run)"
    first = configs[0]
    if first.model not in VECTORISED_MODELS:
        return (f"model={first.model} is not vectorised (its residual blocks have no stacked forward); "
                f"model={' and '.join(VECTORISED_MODELS)} are")
    for other in configs[1:]:
        if type(other) is not type(first):
            return f"configs of different benchmarks ({type(first).__name__}, {type(other).__name__})"
    return differing_fields_refusal(configs, VARYING_FIELDS)


class _StackedLinear(torch.autograd.Function):
    """``x @ W^T + b`` per member: x (S, B, in), W (S, out, in), b (S, out) or None.

    Autograd's own backward of ``baddbmm`` through the transposed weight view writes the weight gradient in the
    transposed layout and copies it (about a third more time on the first layer); this one computes
    ``dW = g^T x`` directly in W's layout (the same values).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Batched affine map."""
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Gradients of x, W and b (only those needed)."""
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(dim=1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def _to_grouped(x: Tensor) -> Tensor:
    """(S, B, C, H, W) member-stacked images -> (B, S*C, H, W): each member's channels side by side."""
    members, batch = x.shape[:2]
    return x.transpose(0, 1).reshape(batch, members * x.shape[2], *x.shape[3:])


def _from_grouped(x: Tensor, members: int) -> Tensor:
    """(B, S*C, H, W) -> (S, B, C, H, W): back to one leading member axis."""
    batch, channels = x.shape[:2]
    return x.reshape(batch, members, channels // members, *x.shape[2:]).transpose(0, 1)


def _flat(tensor: Tensor | None) -> Tensor | None:
    """A stacked (S, C) per-channel tensor as the (S*C,) one the grouped layout's channels use (None stays None)."""
    return None if tensor is None else tensor.reshape(-1)


def _grouped_conv(x: Tensor, module: nn.Conv2d, weight: Tensor, bias: Tensor | None, members: int) -> Tensor:
    """S members' ``module`` convolutions as one grouped convolution of the (B, S*C, H, W) layout.

    ``weight`` is the stacked (S, out, in/groups, kh, kw) tensor, used as (S*out, ...): member s's output channels
    see only its own input channels (``groups`` = S x the module's groups).
    """
    if module.padding_mode != "zeros":
        raise ValueError(f"padding_mode={module.padding_mode!r} has no vectorised convolution (zeros only)")
    stacked_weight = weight.reshape(members * weight.shape[1], *weight.shape[2:])
    groups = module.groups * members
    return F.conv2d(x, stacked_weight, _flat(bias), module.stride, module.padding, module.dilation, groups)


def _batch_norm(x: Tensor, module: nn.modules.batchnorm._BatchNorm, name: str, params: dict[str, Tensor],
                buffers: dict[str, Tensor], grouped: bool) -> Tensor:
    """S members' BatchNorm exactly as ``nn.BatchNorm*d.forward`` does it, running statistics per member.

    Train mode normalises with each member's batch statistics and updates its running mean/var (and
    ``num_batches_tracked``) in place in the stacked buffers; eval mode uses the running statistics.
    """
    running_mean = buffers.get(f"{name}.running_mean")
    running_var = buffers.get(f"{name}.running_var")
    factor = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats:
        tracked = buffers[f"{name}.num_batches_tracked"]
        tracked.add_(1)  # every member took the same number of steps
        factor = 1.0 / float(tracked[0]) if module.momentum is None else module.momentum
    use_batch = module.training or (running_mean is None and running_var is None)
    if not module.training or module.track_running_stats:
        stats = (_flat(running_mean), _flat(running_var))
    else:
        stats = (None, None)
    weight, bias = (_flat(params[f"{name}.weight"]), _flat(params[f"{name}.bias"])) if module.affine else (None, None)
    if grouped:  # (B, S*C, H, W): channel c of member s is channel s*C + c
        return F.batch_norm(x, *stats, weight, bias, use_batch, factor, module.eps)
    members, batch, features = x.shape  # (S, B, F) -> (B, S*F): one BatchNorm1d of S*F features
    out = F.batch_norm(x.transpose(0, 1).reshape(batch, members * features), *stats, weight, bias, use_batch,
                       factor, module.eps)  # fmt: skip
    return out.reshape(batch, members, features).transpose(0, 1)


def stacked_forward(
    model: nn.Sequential,
    params: dict[str, Tensor],
    inputs: Tensor,
    buffers: dict[str, Tensor] | None = None,
    noise: dict[str, Tensor] | None = None,
) -> Tensor:
    """Forward of S stacked copies of an MLP/CNN ``model`` in its train/eval mode: inputs (S, B, ...) -> (S, B, out).

    ``params`` and ``buffers`` (BatchNorm running statistics, updated in place in train mode) are the stacked
    (S, ...) tensors by name; ``noise`` holds each train-mode dropout layer's (S, B, F) scaled keep mask
    (:func:`draw_dropout_noise`). Conv layers run as one grouped convolution over the members' channels.
    """
    buffers = {} if buffers is None else buffers
    members, batch = inputs.shape[:2]
    x = inputs
    grouped = False  # the conv part's (B, S*C, H, W) layout; otherwise (S, B, ...)
    for name, module in model.named_children():
        if isinstance(module, nn.Conv2d):
            if not grouped:
                x, grouped = _to_grouped(x), True
            bias = None if module.bias is None else params[f"{name}.bias"]
            x = _grouped_conv(x, module, params[f"{name}.weight"], bias, members)
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)) and grouped:
            x = module(x)  # per channel: each member's channels pool on their own
        elif isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            if grouped:
                x, grouped = _from_grouped(x, members), False
            x = x.reshape(members, batch, -1)
        elif isinstance(module, nn.Linear) and not grouped:
            bias = None if module.bias is None else params[f"{name}.bias"]
            x = _StackedLinear.apply(x, params[f"{name}.weight"], bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and (grouped == isinstance(module, nn.BatchNorm2d)):
            x = _batch_norm(x, module, name, params, buffers, grouped)
        elif isinstance(module, nn.GroupNorm) and grouped:  # GroupNorm(G, C) per member = GroupNorm(S*G, S*C)
            weight, bias = (params[f"{name}.weight"], params[f"{name}.bias"]) if module.affine else (None, None)
            x = F.group_norm(x, members * module.num_groups, _flat(weight), _flat(bias), module.eps)
        elif isinstance(module, nn.LayerNorm) and not grouped:
            x = F.layer_norm(x, module.normalized_shape, eps=module.eps)
            if module.elementwise_affine:
                x = x * params[f"{name}.weight"].unsqueeze(1) + params[f"{name}.bias"].unsqueeze(1)
        elif isinstance(module, nn.Dropout) and module.training and module.p > 0:
            if noise is None or name not in noise:
                raise ValueError(f"layer {name} (train-mode dropout) needs its members' masks: pass noise")
            x = x * noise[name]  # what F.dropout computes: input * (keep mask / (1 - p))
        elif isinstance(module, (*_ACTIVATION_TYPES, nn.Dropout)):
            x = module(x)  # elementwise (dropout: eval mode or p = 0, the identity): the same on any layout
        else:
            raise ValueError(f"layer {name} ({type(module).__name__}) has no vectorised forward here")
    return x


def dropout_shapes(model: nn.Sequential, batch: int) -> dict[str, tuple[int, int]]:
    """Input shape (batch, features) of each ``nn.Dropout`` with p > 0 among ``model``'s children, in forward order."""
    shapes: dict[str, tuple[int, int]] = {}
    features = None
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            features = module.out_features
        elif isinstance(module, nn.Conv2d):
            features = None
        elif isinstance(module, nn.Dropout) and module.p > 0:
            if features is None:
                raise ValueError(f"dropout layer {name} does not follow a Linear layer: it has no vectorised masks")
            shapes[name] = (batch, features)
    return shapes


def draw_dropout_noise(
    model: nn.Sequential, shapes: dict[str, tuple[int, int]], device: torch.device, dtype: torch.dtype
) -> dict[str, Tensor]:
    """One member's dropout masks for one step, drawn as its own forward draws them (call under its RNG).

    ``F.dropout`` of ones is exactly the ``keep / (1 - p)`` noise that ``F.dropout`` of the layer's input (same
    shape, same generator state) multiplies that input by, so the stacked step uses the separate run's masks.
    """
    modules = dict(model.named_children())
    return {
        name: F.dropout(torch.ones(shape, device=device, dtype=dtype), modules[name].p, training=True)
        for name, shape in shapes.items()
    }


class _StackedOptimizer:
    """torch.optim.Adam / SGD on stacked parameters, one lr per member (members sharing an lr update together).

    Adam runs PyTorch's own functional Adam (``torch.optim.adam.adam``, the fused kernel when available) on the
    stacked tensors, or on the members' slices when lrs differ; SGD is PyTorch's formula (no dampening/Nesterov).
    """

    def __init__(self, config: ContinualConfig, params: list[Tensor], lrs: Sequence[float]):
        self.kind = config.optimizer
        self.params = params
        self.weight_decay, self.momentum = config.weight_decay, config.momentum
        self.betas, self.eps = (0.9, 0.999), 1e-8
        groups: dict[float, list[int]] = {}
        for index, lr in enumerate(lrs):
            groups.setdefault(float(lr), []).append(index)
        # (lr, member indices or None for all members): one update call per distinct lr
        self.groups = [(lr, None if len(groups) == 1 else members) for lr, members in groups.items()]
        # the fused kernel (fastest) matches torch.optim.Adam to rounding without weight decay; with it, it
        # departs from it after a few steps (measured on CPU, torch 2.13): the multi-tensor path is used then
        self.fused = not self.weight_decay and torch.device(params[0].device).type in ("cpu", "cuda")
        self.state: list[dict[str, Any]] = [{} for _ in params]

    @staticmethod
    def _pick(tensors: list[Tensor], members: list[int] | None) -> list[Tensor]:
        """The tensors themselves (all members) or the listed members' slices of each (views)."""
        return tensors if members is None else [t[m] for t in tensors for m in members]

    @torch.no_grad()
    def step(self) -> None:
        """One update of every stacked parameter from its ``.grad``."""
        if self.kind == "adam":
            self._adam()
        else:
            for param, state in zip(self.params, self.state):
                self._sgd(param, param.grad, state)

    def _adam(self) -> None:
        """PyTorch's Adam (amsgrad off), one call per distinct lr."""
        if not self.state[0]:
            for param, state in zip(self.params, self.state):
                state.update(step=0, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
        params = [p.detach() for p in self.params]
        grads = [p.grad for p in self.params]
        exp_avgs = [state["exp_avg"] for state in self.state]
        exp_avg_sqs = [state["exp_avg_sq"] for state in self.state]
        step = self.state[0]["step"]
        for lr, members in self.groups:
            picked = self._pick(params, members)
            device = picked[0].device if self.fused else None  # the fused kernel keeps steps on the device
            steps = [torch.tensor(float(step), device=device) for _ in picked]  # the call advances each by one
            adam(
                picked, self._pick(grads, members), self._pick(exp_avgs, members), self._pick(exp_avg_sqs, members),
                [], steps, fused=self.fused, foreach=not self.fused, amsgrad=False,
                beta1=self.betas[0], beta2=self.betas[1], lr=lr, weight_decay=self.weight_decay, eps=self.eps,
                maximize=False,
            )  # fmt: skip
        for state in self.state:
            state["step"] = step + 1

    def _sgd(self, param: Tensor, grad: Tensor, state: dict[str, Any]) -> None:
        """PyTorch's single-tensor SGD step (no dampening, no Nesterov)."""
        stacked_sgd_(param, grad, state, self.groups, self.momentum, self.weight_decay)

    def clear(self) -> None:
        """Forget all state (``reset_optimizer``)."""
        self.state = [{} for _ in self.params]

    def member_state(self, index: int) -> dict[int, dict[str, Any]]:
        """Member ``index``'s slice in the ``state`` layout of its own torch optimizer's ``state_dict``."""
        out: dict[int, dict[str, Any]] = {}
        for k, state in enumerate(self.state):
            if not state:
                continue
            if self.kind == "adam":
                out[k] = {
                    "step": torch.tensor(float(state["step"])),
                    "exp_avg": state["exp_avg"][index].clone(),
                    "exp_avg_sq": state["exp_avg_sq"][index].clone(),
                }
            elif "momentum_buffer" in state:
                out[k] = {"momentum_buffer": state["momentum_buffer"][index].clone()}
        return out

    def load_members(self, per_member: list[list[dict[str, Any]]]) -> None:
        """Set the stacked state from each member's per-parameter torch optimizer state (all at the same step)."""
        for k, param in enumerate(self.params):
            states = [member[k] for member in per_member]
            if not any(states):
                self.state[k] = {}
                continue
            if not all(states):
                raise ValueError("the members' optimizer states differ in which parameters they hold")
            if self.kind == "adam":
                steps = {int(float(s["step"])) for s in states}
                if len(steps) != 1:
                    raise ValueError(f"the members' Adam steps differ ({sorted(steps)})")
                self.state[k] = {
                    "step": steps.pop(),
                    "exp_avg": torch.stack([s["exp_avg"] for s in states]).to(param),
                    "exp_avg_sq": torch.stack([s["exp_avg_sq"] for s in states]).to(param),
                }
            else:
                self.state[k] = {"momentum_buffer": torch.stack([s["momentum_buffer"] for s in states]).to(param)}


class VectorisedContinual(MemberGroup):
    """S runs of one continual benchmark (seeds and/or lr grid) trained as one stacked MLP/CNN; rows per member."""

    def __init__(
        self,
        benchmark_cls: type[ContinualBenchmark],
        members: Sequence[tuple[ContinualConfig, int]],
        methods: Mitigation | Sequence[Mitigation] | None = None,
    ):
        members = list(members)
        if not members:
            raise ValueError("no runs to vectorise: pass at least one (config, seed)")
        reason = continual_refusal([config for config, _ in members], methods)
        if reason is not None:
            raise ValueError(f"cannot vectorise these {benchmark_cls.name} runs: {reason}")
        self.benchmarks = [benchmark_cls(config, seed) for config, seed in members]
        first = self.benchmarks[0]
        self.name = first.name
        for bench in self.benchmarks[1:]:
            if bench._steps_per_task != first._steps_per_task:
                raise ValueError(
                    f"cannot vectorise these {self.name} runs: their tasks have different step counts "
                    "(epochs_per_task over task sizes that differ per seed)"
                )
        self.config = first.config
        models = [bench.model for bench in self.benchmarks]
        self.template = models[0]
        self.names = [name for name, _ in self.template.named_parameters()]
        self.params = {
            name: torch.stack([dict(m.named_parameters())[name].detach() for m in models]).requires_grad_(True)
            for name in self.names
        }
        buffer_names = [name for name, _ in self.template.named_buffers()]
        # BatchNorm running statistics, (S, C) and num_batches_tracked (S,)
        self.buffers = {name: torch.stack([dict(m.named_buffers())[name] for m in models]) for name in buffer_names}
        for index, model in enumerate(models):
            for name, parameter in model.named_parameters():
                parameter.data = self.params[name].detach()[index]  # the member's module sees its slice
            for name, buffer in model.named_buffers():
                buffer.data = self.buffers[name][index]  # its own running statistics, updated by the stacked step
        self._dropout = dropout_shapes(self.template, self.config.batch_size)
        lrs = [config.lr for config, _ in members]
        self.optimizer = _StackedOptimizer(self.config, [self.params[n] for n in self.names], lrs)

    # ------------------------------------------------------------------ Benchmark-like API
    def run(self, n_steps: int) -> list[list[dict[str, Any]]]:
        """Advance every member by at most ``n_steps`` steps; the rows of each member, in member order."""
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be a non-negative int, got {n_steps!r}")
        target = min(self.step + n_steps, self.total_steps)
        rows: list[list[dict[str, Any]]] = [[] for _ in self.benchmarks]
        for bench in self.benchmarks:  # train mode, as every separate step sets it (the template's drives the
            bench.model.train()  # stacked forward; evaluations and the Monitor restore the modes they change)
        while self.step < target:
            if not self.benchmarks[0]._task_started:
                for bench, out in zip(self.benchmarks, rows):
                    with bench.own_rng():
                        out += bench._start_task()
                if self.config.reset_optimizer:
                    self.optimizer.clear()
            self._train_step()
            if self._measuring_step():
                for bench, out in zip(self.benchmarks, rows):
                    with bench.own_rng():  # evaluations and the Monitor run under the run's own RNG
                        out += bench._after_step()
            else:  # only bins close: no RNG involved
                for bench, out in zip(self.benchmarks, rows):
                    out += bench._after_step()
        return rows

    def _measuring_step(self) -> bool:
        """Whether the step just taken ends a task or falls on a periodic Monitor measurement."""
        first = self.benchmarks[0]
        every = self.config.monitor_every
        return first.step_in_task >= first._steps_per_task[first.task] or bool(every and first.step % every == 0)

    def _train_step(self) -> None:
        """One optimiser step of every member on its own next minibatch."""
        inputs, targets, masks = [], [], []
        for bench in self.benchmarks:
            spec = bench.tasks[bench.task]
            indices = bench._stream.next_indices()
            inputs.append(_gather_inputs(spec.train_x, indices, spec.permutation))
            targets.append(spec.train_y.index_select(0, indices.to(spec.train_y.device)))
            masks.append(spec.class_mask)
        x, y = torch.stack(inputs), torch.stack(targets)  # (S, B, ...), (S, B)
        noise = None
        if self._dropout:  # each member's masks from its own RNG, as its separate forward draws them
            drawn = []
            for bench in self.benchmarks:
                with bench.own_rng():
                    drawn.append(draw_dropout_noise(self.template, self._dropout, x.device, x.dtype))
            noise = {name: torch.stack([masks[name] for masks in drawn]) for name in self._dropout}
        logits = stacked_forward(self.template, self.params, x, self.buffers, noise)  # (S, B, C)
        masked = logits
        if masks[0] is not None:
            active = torch.stack(masks).unsqueeze(1)  # (S, 1, C)
            masked = logits.masked_fill(~active, float("-inf"))
        members, batch = y.shape
        per_sample = F.cross_entropy(masked.reshape(members * batch, -1), y.reshape(-1), reduction="none")
        losses = per_sample.reshape(members, batch).mean(dim=1)
        for param in self.params.values():
            param.grad = None
        losses.sum().backward()  # members share no parameter: each slice gets its own loss's gradient
        with torch.no_grad():
            correct = (masked.argmax(dim=-1) == y).sum(dim=1)
            unmasked = correct if masks[0] is None else (logits.argmax(dim=-1) == y).sum(dim=1)
            stats = torch.stack([losses.detach(), correct.to(losses.dtype), unmasked.to(losses.dtype)]).tolist()
        for index, (bench, loss) in enumerate(zip(self.benchmarks, stats[0])):
            if not math.isfinite(loss):
                check_finite_loss(bench.name, loss, bench.step, bench.config.lr, f"task {bench.task}, member {index}")
        self.optimizer.step()
        for bench, loss, right, right_unmasked in zip(self.benchmarks, *stats):
            for sums in (bench._bin, bench._task_sums):
                sums["correct"] += int(right)
                sums["correct_unmasked"] += int(right_unmasked)
                sums["samples"] += batch
                sums["loss_sum"] += loss
                sums["steps"] += 1
            bench.step += 1
            bench.step_in_task += 1

    # ------------------------------------------------------------------ checkpoints
    def state_dicts(self) -> list[dict[str, Any]]:
        """Each member's state, exactly what its separate run's ``state_dict`` holds (loadable by either)."""
        states = []
        for index, bench in enumerate(self.benchmarks):
            state = bench.state_dict()  # its own optimizer is unused: put the member's slice of ours in it
            state["model"] = {key: value.clone() for key, value in state["model"].items()}  # not the whole stack
            state["optimizer"]["state"] = self.optimizer.member_state(index)
            states.append(state)
        return states

    def load_state_dicts(self, states: Sequence[dict[str, Any]]) -> None:
        """Restore every member from a state of its run (written here or by a separate run), all at one step."""
        self._check_member_states(states)
        per_member = []
        for bench, state in zip(self.benchmarks, states):
            bench.load_state_dict(state)  # the model loads in place into its slice of the stacked tensors
            params = [p for p in bench.model.parameters() if p.requires_grad]
            per_member.append([dict(bench.optimizer.state.get(p, {})) for p in params])
            bench.optimizer.state.clear()
        self.optimizer.load_members(per_member)
