"""Train several seeds of the bit-flipping learner in one process, vectorised over seeds.

:class:`BitFlipSeedGroup` (what ``lopkit run bitflip --seeds`` uses, through :func:`lopkit.runner.bitflip_group.execute_seed_group`) trains
S :class:`~lopkit.benchmarks.bitflip.BitFlipBenchmark` objects, plain or with ``cbp``/``cbp_aggressive``, as
one learner: the lean step batched over seeds in NumPy, and continual backprop's utilities and replacements
per seed (:class:`lopkit.benchmarks.bitflip_lean.LeanCBP`, each seed's own method generator seeded through
:func:`lopkit.seeding.derive_seed` as in a separate run). ``l2``, ``l2init``, ``noisy_sgd``, ``shrink_perturb``
and ``redo`` run through each seed's own lean kernel on its slice (:class:`_GroupKernels`). Each benchmark's
rows, state and checkpoints are those of its own run within float tolerance.

The older :func:`run_bitflip_seeds` below (plain learner only) builds its own runs:

:func:`run_bitflip_seeds` returns, for every seed, the rows that a separate run of the ``"bitflip"``
benchmark (:class:`lopkit.benchmarks.bitflip.BitFlipBenchmark`, no mitigation) would produce: the same
``online_mse`` bins and the same Monitor rows at the same steps. Each seed keeps its own data stream
(same teacher and inputs as the separate run) and its own learner initialisation.

Two engines:

- ``"func"`` (default): :func:`torch.func.stack_module_state` stacks the S learners' parameters into
  tensors with a leading seed axis, and ``vmap(grad_and_value(loss))`` over a
  :func:`torch.func.functional_call` of one meta-device copy gives all S gradients and losses per step;
  the SGD update is one ``torch._foreach_add_``. It works for any learner module.
- ``"lean"``: the same hand-written forward/backward/update as the benchmark's lean engine, batched over
  the seed axis with NumPy (``matmul`` over stacked matrices). Much less per-step overhead.

Speed (``benchmarks/vmap_seeds.py``, one core, 8 seeds x 10k steps, width 100, Monitor every 1000 steps):
``lean`` is about 1.8x faster than 8 sequential benchmark runs with the lean engine; ``func`` pays torch.func's
per-call overhead (~1 ms per step for all seeds), so it is ~8x *slower* than those sequential lean runs, but
about 2x faster than 8 sequential runs of the generic autograd engine (the fair comparison for a learner
without a hand-written step).

Per-seed ``nn.Module`` copies share memory with the stacked parameters (each parameter's ``.data`` is a
view of slice ``s``), so the per-seed Monitors always see the current weights at no copying cost.

Exactness. The rows agree with separate runs to float32 rounding (about 1e-6 relative on a few thousand
steps), not bit for bit: batched kernels (``bmm``/batched ``matmul``) sum the dot products in a different
order than the single-seed matrix-vector product, and ``lr * grad`` versus ``(2 lr e) * h`` round
differently. Over long runs these last-bit differences can grow: an online trajectory is sensitive to a
ReLU pre-activation that sits within rounding of 0, or a unit-pair cosine within rounding of the duplicate
threshold. Expect agreement to ~1e-5 relative over thousands of steps and statistical (not per-step)
agreement over millions.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from lopkit.benchmarks.bitflip import (
    BitFlipBenchmarkConfig,
    bin_due,
    build_learner,
    learner_layers,
    make_bitflip_monitor,
    learner_inputs,
    monitor_rows,
    run_probe_steps,
    mse_loss,
    next_block_length,
    stream_config,
)
from lopkit.benchmarks.base import MemberGroup, make_row
from lopkit.configs import ConfigError, check_device
from lopkit.data.bitflip import BitFlipStream, run_inputs_at
from lopkit.diagnostics.monitor import Monitor

__all__ = [
    "BITFLIP_VARYING_FIELDS",
    "BitFlipSeedGroup",
    "BitFlipVectorised",
    "bitflip_refusal",
    "GROUP_KERNEL_METHODS",
    "VMAP_ENGINES",
    "group_unsupported_reason",
    "run_bitflip_seeds",
    "run_seed_group",
]

VMAP_ENGINES = ("func", "lean")


@dataclass
class _SeedRun:
    """Per-seed state: data stream, module (a view of the stacked parameters), monitor, bin accumulator."""

    seed: int
    stream: BitFlipStream
    model: nn.Module
    monitor: Monitor | None
    probe_inputs: torch.Tensor | None = None
    bin_sum: float = 0.0
    bin_count: int = 0


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    """Validate the seed list: non-empty, distinct, non-negative ints."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty; pass at least one seed, e.g. seeds=[0, 1, 2]")
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be non-negative ints, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    return [int(s) for s in seeds]


def _tie_to_stack(model: nn.Module, stacked: dict[str, torch.Tensor], index: int) -> None:
    """Make every parameter of ``model`` a view of slice ``index`` of the stacked tensors (shared memory)."""
    for name, parameter in model.named_parameters():
        parameter.data = stacked[name][index]


def _func_step_fn(template: nn.Module) -> Callable:
    """``(params, x (S,1,D), t (S,1,1)) -> (grads, losses (S,))`` via vmap(grad_and_value(functional_call))."""
    meta = copy.deepcopy(template).to("meta")

    def loss(params: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return mse_loss(functional_call(meta, params, (x,)), t)

    return vmap(grad_and_value(loss))


def _func_block(
    step_fn: Callable,
    stacked: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    lr: float,
    sums: list[float],
) -> None:
    """SGD over a block for all seeds at once (torch.func); inputs (S, L, D), targets (S, L, 1); updates ``sums``."""
    names = list(stacked)
    params = [stacked[n] for n in names]
    for i in range(inputs.shape[1]):
        grads, losses = step_fn(stacked, inputs[:, i : i + 1], targets[:, i : i + 1])
        torch._foreach_add_(params, [grads[n] for n in names], alpha=-lr)
        for k, value in enumerate(losses.tolist()):
            sums[k] += value


def _lean_block(
    views: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    inputs: np.ndarray,
    targets: np.ndarray,
    lr: float,
    sums: list[float],
) -> None:
    """The benchmark's lean SGD step batched over seeds (NumPy); views are (S,H,D), (S,H), (S,H), (S,1)."""
    w1, b1, w2, b2 = views
    two_lr = np.float32(2.0 * lr)
    for i in range(inputs.shape[1]):
        x = inputs[:, i]  # (S, D)
        z = np.matmul(w1, x[:, :, None])[:, :, 0]
        z += b1
        h = np.maximum(z, np.float32(0.0))
        errors = np.einsum("sh,sh->s", w2, h) + b2[:, 0] - targets[:, i]
        for k, error in enumerate((errors * errors).tolist()):
            sums[k] += error
        scale = (two_lr * errors)[:, None]  # (S, 1)
        dz = w2 * (z > 0)
        dz *= scale
        w2 -= scale * h
        b2 -= scale
        w1 -= dz[:, :, None] * x[:, None, :]
        b1 -= dz


def _stacked_views(stacked: dict[str, torch.Tensor], template: nn.Module) -> tuple[np.ndarray, ...]:
    """NumPy views (W1, b1, w2, b2) of the stacked learner parameters for the lean engine."""
    hidden, _activation, output = learner_layers(template)
    names = {id(p): n for n, p in template.named_parameters()}
    w1, b1, w2, b2 = (
        stacked[names[id(p)]].numpy() for p in (hidden.weight, hidden.bias, output.weight, output.bias)
    )
    return w1, b1, w2[:, 0, :], b2


def run_bitflip_seeds(
    config: BitFlipBenchmarkConfig,
    seeds: Sequence[int],
    *,
    engine: Literal["func", "lean"] = "func",
    n_steps: int | None = None,
) -> dict[int, list[dict[str, Any]]]:
    """Train the bit-flipping learner for every seed at once; return ``{seed: rows}`` as separate runs would.

    ``n_steps`` (default: ``config.num_steps``) lets a test stop early; rows are those of a separate
    benchmark run advanced by the same number of steps. No mitigation is supported (use the benchmark).
    """
    if not isinstance(config, BitFlipBenchmarkConfig):
        raise ConfigError(f"config must be a BitFlipBenchmarkConfig, got {type(config).__name__}")
    if engine not in VMAP_ENGINES:
        raise ValueError(f"engine must be one of {VMAP_ENGINES}, got {engine!r}")
    seeds = _check_seeds(seeds)
    device = check_device(config.device)
    if engine == "lean" and device.type != "cpu":
        raise ConfigError(f"engine='lean' is NumPy on the CPU; with device={config.device} use engine='func'")
    total = config.num_steps if n_steps is None else min(int(n_steps), config.num_steps)
    runs = [
        _SeedRun(
            seed=seed,
            stream=BitFlipStream(stream_config(config), seed),
            model=build_learner(config, seed),
            monitor=None,
            probe_inputs=(
                run_inputs_at(stream_config(config), seed, run_probe_steps(config, seed))
                if config.probe == "run" and config.monitor_every > 0 else None
            ),
        )
        for seed in seeds
    ]
    stacked, _buffers = stack_module_state([run.model for run in runs])
    stacked = {name: tensor.detach().to(device) for name, tensor in stacked.items()}
    for index, run in enumerate(runs):
        _tie_to_stack(run.model, stacked, index)
        run.monitor = make_bitflip_monitor(run.model, config) if config.monitor_every > 0 else None
    step_fn = _func_step_fn(runs[0].model) if engine == "func" else None
    views = _stacked_views(stacked, runs[0].model) if engine == "lean" else None

    rows: dict[int, list[dict[str, Any]]] = {run.seed: [] for run in runs}
    if config.monitor_every > 0:
        for run in runs:
            rows[run.seed] += monitor_rows(run.monitor, run.stream, config, 0, run.probe_inputs)
    step = 0
    while step < total:
        length = next_block_length(step, total, config.block_size, config.bin_size, config.monitor_every)
        batches = [run.stream.next_batches(length) for run in runs]
        inputs = torch.stack([learner_inputs(x, config) for x, _ in batches]).to(device)  # (S, L, D)
        targets = torch.stack([y for _, y in batches]).to(device)  # (S, L, 1)
        sums = [run.bin_sum for run in runs]
        if engine == "func":
            _func_block(step_fn, stacked, inputs, targets, config.lr, sums)
        else:
            _lean_block(views, inputs.numpy(), targets.numpy()[:, :, 0], config.lr, sums)
        step += length
        for run, loss_sum in zip(runs, sums):
            run.bin_sum, run.bin_count = loss_sum, run.bin_count + length
            if bin_due(step, config.num_steps, config.bin_size, run.bin_count):
                mse = run.bin_sum / run.bin_count
                rows[run.seed].append(make_row(step, step // config.flip_period, "model", "online_mse", mse))
                run.bin_sum, run.bin_count = 0.0, 0
            if run.monitor is not None and step % config.monitor_every == 0:
                rows[run.seed] += monitor_rows(run.monitor, run.stream, config, step, run.probe_inputs)
    return rows


# --------------------------------------------------------------------------- benchmark objects trained together


def group_unsupported_reason(benchmarks: Sequence[Any]) -> str | None:
    """Why :class:`BitFlipSeedGroup` cannot train these benchmarks as one learner (None: it can).

    It can when all are ``"bitflip"`` benchmarks with one config at the same step on the lean engine, with no
    method, each with ``cbp``/``cbp_aggressive`` (:func:`lopkit.benchmarks.bitflip_lean.lean_cbp_supported`) or
    each with the same single method of :data:`GROUP_KERNEL_METHODS` that has a lean kernel, and no method switch.
    """
    from lopkit.benchmarks.bitflip import BitFlipBenchmark, method_is_noop
    from lopkit.benchmarks.bitflip_lean import lean_cbp_supported

    if not benchmarks:
        return "no runs"
    first = benchmarks[0]
    if not all(isinstance(b, BitFlipBenchmark) for b in benchmarks):
        return "only bit-flipping runs can be vectorised here"
    if any(b.config != first.config for b in benchmarks):
        return "the runs have different configs"
    if len({b.step for b in benchmarks}) != 1:
        return f"the runs are at different steps ({sorted({b.step for b in benchmarks})}), e.g. after an interruption"
    if first.config.switch_step:
        return "switch_step (a method switch) is not vectorised"
    if any(b.engine != "lean" for b in benchmarks):
        return f"method {first.method.name!r} needs the autograd engine"
    if all(method_is_noop(b.method) for b in benchmarks):
        return None
    if all(lean_cbp_supported(b.method, b.model) for b in benchmarks):
        return None
    return _group_kernel_refusal(benchmarks)


#: Methods the seed group runs through their lean kernels (:mod:`lopkit.benchmarks.bitflip_lean`), besides cbp.
GROUP_KERNEL_METHODS = ("l2", "l2init", "noisy_sgd", "shrink_perturb", "redo")


def _group_kernel_refusal(benchmarks: Sequence[Any]) -> str | None:
    """Why :class:`_GroupKernels` cannot run the benchmarks' methods (None: each has the same kind of lean kernel)."""
    from lopkit.benchmarks.bitflip_lean import _MethodKernel, _single, lean_kernel

    first = benchmarks[0]
    singles = [_single(b.method) for b in benchmarks]
    name = getattr(first.method, "name", type(first.method).__name__)
    if any(m is None for m in singles):
        return f"method {name!r} (a composition of several methods) has no vectorised kernel"
    if len({type(m) for m in singles}) != 1 or any(getattr(m, "config", None) != singles[0].config for m in singles):
        return "the runs have different methods or method settings"
    kernel = lean_kernel(first.method, first.model, first.optimizer, first.config)
    if not isinstance(kernel, _MethodKernel):
        return (f"method {name!r} has no vectorised kernel (plain SGD, cbp, cbp_aggressive, "
                f"{', '.join(GROUP_KERNEL_METHODS)} do)")
    return None


class BitFlipSeedGroup:
    """S bit-flipping benchmarks (one per seed, same config) trained as one learner vectorised over seeds.

    The learners' parameters become slices of stacked tensors (so each benchmark's model, Monitor, method and
    ``state_dict`` keep working); each step is the lean engine's step batched over seeds in NumPy, and with
    ``cbp``/``cbp_aggressive`` one :class:`~lopkit.benchmarks.bitflip_lean.LeanCBP` keeps every seed's utilities
    and replaces units with that seed's own generator. :meth:`run` returns, per benchmark, the rows its own
    ``run`` would (within float tolerance: batched products round differently) and leaves its state as that would.
    """

    def __init__(self, benchmarks: Sequence[Any]):
        reason = group_unsupported_reason(benchmarks)
        if reason is not None:
            raise ConfigError(f"these runs cannot be trained as one vectorised learner: {reason}")
        from lopkit.benchmarks.bitflip import method_is_noop
        from lopkit.benchmarks.bitflip_lean import LeanCBP, lean_cbp_supported

        self.benchmarks = list(benchmarks)
        models = [b.model for b in self.benchmarks]
        layers = [learner_layers(model) for model in models]
        # W1 and b1 of all seeds as one (S, D + 1, H) array, b1 the last row: the input gets a 1 appended, so one
        # product gives W1 x + b1 and one outer-product update (along contiguous rows of H) changes both; each
        # model's fc1.weight is the (H, D) transposed view of its slice, fc1.bias the view of its last row
        w1b = torch.stack([torch.cat([hidden.weight.detach().t(), hidden.bias.detach()[None, :]])
                           for hidden, _, _ in layers]).contiguous()
        w2, b2 = (torch.stack([getattr(layer[2], name).detach() for layer in layers]).contiguous()
                  for name in ("weight", "bias"))
        inputs = w1b.shape[1] - 1
        for index, (hidden, _activation, output) in enumerate(layers):
            hidden.weight.data = w1b[index, :inputs].t()
            hidden.bias.data, output.weight.data, output.bias.data = w1b[index, inputs], w2[index], b2[index]
        self.views = (w1b.numpy(), w2.numpy()[:, 0, :], b2.numpy())
        self.cbp = self.kernels = None
        if all(method_is_noop(b.method) for b in self.benchmarks):
            pass
        elif all(lean_cbp_supported(b.method, b.model) for b in self.benchmarks):
            self.cbp = LeanCBP([b.method for b in self.benchmarks], models, [b.optimizer for b in self.benchmarks],
                               transposed=True, bias_row=True)
        else:
            self.kernels = _GroupKernels(self.benchmarks, self.views)

    @property
    def step(self) -> int:
        """The common step of the benchmarks."""
        return self.benchmarks[0].step

    def run(self, n_steps: int) -> list[list[dict[str, Any]]]:
        """Advance every benchmark by up to ``n_steps``; per benchmark, the rows its own ``run`` would return."""
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        benches, cfg = self.benchmarks, self.benchmarks[0].config
        rows: list[list[dict[str, Any]]] = [[] for _ in benches]
        for index, bench in enumerate(benches):
            if bench.monitor is not None and bench.step == 0 and not bench._initial_measured:
                rows[index] += bench._measure()
                bench._initial_measured = True
        end = min(self.step + n_steps, bench.total_steps)
        periods = self.kernels.periods if self.kernels is not None else ()
        while self.step < end:
            step = self.step
            length = next_block_length(step, end, cfg.block_size, cfg.bin_size, cfg.monitor_every, *periods)
            batches = [b.stream.next_batches(length) for b in benches]
            inputs = np.ones((len(benches), length, self.views[0].shape[1]), dtype=np.float32)  # (S, L, D + 1)
            for index, (x, _) in enumerate(batches):
                inputs[index, :, :-1] = learner_inputs(x, cfg).numpy()
            targets = np.stack([y.numpy()[:, 0] for _, y in batches])  # (S, L)
            sums = np.array([b._bin_sum for b in benches], dtype=np.float64)
            if self.kernels is not None:
                self.kernels.begin(step, length, cfg.lr)
            _group_block(self.views, inputs, targets, cfg.lr, sums, step, self.cbp, self.kernels)
            if self.kernels is not None:
                self.kernels.finish(step, length)
            for index, bench in enumerate(benches):
                bench._bin_sum = float(sums[index])
                bench._bin_count += length
                bench.step += length
                rows[index] += bench._after_block()
        return rows


def _group_block(
    views: tuple[np.ndarray, np.ndarray, np.ndarray],
    inputs: np.ndarray,
    targets: np.ndarray,
    lr: float,
    sums: np.ndarray,
    first_step: int,
    cbp: Any = None,
    kernels: Any = None,
) -> None:
    """The lean SGD step batched over seeds, with continual backprop or another method's kernels when given.

    ``views``: ``[W1^T; b1]`` (S, D + 1, H), w2 (S, H), b2 (S, 1); ``inputs`` (S, L, D + 1) end with a 1 column.
    The squared errors are added to ``sums`` one step after the other in float64, as the single-run engine does.
    """
    from lopkit.benchmarks.base import check_finite_loss

    w1b, w2, b2 = views
    two_lr = np.float32(2.0 * lr)
    zero = np.float32(0.0)
    outer = np.empty_like(w1b)
    size, length = inputs.shape[:2]
    errors = np.empty((length, size), dtype=np.float32)
    if cbp is not None:
        cbp.begin(length)
    with np.errstate(over="ignore", invalid="ignore"):
        for i in range(length):
            x = inputs[:, i]  # (S, D + 1)
            z = np.matmul(x[:, None, :], w1b)[:, 0, :]
            if cbp is not None:
                h = np.maximum(z, zero, out=cbp.rec_h[cbp.k])
            elif kernels is not None and kernels.record is not None:
                h = np.maximum(z, zero, out=kernels.record[i])
            else:
                h = np.maximum(z, zero)
            error = np.vecdot(w2, h, out=errors[i])
            error += b2[:, 0]
            error -= targets[:, i]
            scale = two_lr * error
            dz = w2 * (z > 0)
            dz *= scale[:, None]
            if kernels is not None:  # the method's penalty, noise or perturbation around the update
                kernels.step(first_step + i, x, h, dz, scale, outer, lr)
                continue
            w2 -= scale[:, None] * h
            b2[:, 0] -= scale
            np.multiply(x[:, :, None], dz[:, None, :], out=outer)
            w1b -= outer
            if cbp is not None:
                np.abs(w2, out=cbp.rec_w2[cbp.k])
                if cbp.needs_incoming:
                    cbp.record_incoming(w1b)
                cbp.step()
    if cbp is not None:
        cbp.finish()
    squares = errors * errors  # float32, as float(error * error) of the single-run engine
    for index in range(size):  # sequential float64 sums (add.accumulate), as the per-step additions
        sums[index] = np.add.accumulate(np.concatenate([[sums[index]], squares[:, index].astype(np.float64)]))[-1]
    if not np.isfinite(sums).all():
        bad = int(np.flatnonzero(~np.isfinite(sums))[0])
        check_finite_loss("bitflip", float(sums[bad]), first_step + length - 1, lr)


class _GroupKernels:
    """``l2``, ``l2init``, ``noisy_sgd``, ``shrink_perturb`` and ``redo`` in the seed group: each seed's own lean kernel.

    Each seed keeps the :class:`~lopkit.benchmarks.bitflip_lean._MethodKernel` its separate run builds (same
    method object, anchors, generators and counters), applied to NumPy views of its slices of the stacked
    parameters in the single-run layout, so every random draw comes from that seed's own method generator in
    the order its separate run draws it. The L2 penalties (elementwise) act on all seeds at once; the gradient
    noise and the shrink-and-perturb events go seed by seed (each draws from its own generator); ReDo's window
    statistics come from a record of every seed's hidden features, and its check (the method's ``after_step``,
    under the run's own RNG) rewrites the seed's slice in place.
    """

    def __init__(self, benchmarks: Sequence[Any], views: tuple[np.ndarray, np.ndarray, np.ndarray]):
        from lopkit.benchmarks.bitflip_lean import lean_kernel

        self.benchmarks = list(benchmarks)
        self.kernels = [lean_kernel(b.method, b.model, b.optimizer, b.config) for b in self.benchmarks]
        first, cfg = self.kernels[0], self.benchmarks[0].config
        w1b, w2, b2 = self.views_of_group = views
        inputs = w1b.shape[1] - 1
        # each seed's (W1 (H, D), b1, w2, b2) in the single-run layout: views of its slices
        self.seed_views = [(w1b[s, :inputs].T, w1b[s, inputs], w2[s], b2[s]) for s in range(len(self.benchmarks))]
        self.periods = first.periods()
        self.task_hook, self.flip_period = first.task_hook, cfg.flip_period
        self.noise = first.noise is not None
        if self.noise:  # each seed's noise buffers become slices of stacked ones (drawn into in place, per seed)
            count = len(self.benchmarks)
            stacked = [torch.zeros((count, *b.shape), dtype=b.dtype) for b in first.noise.buffers]
            for s, kernel in enumerate(self.kernels):
                kernel.noise.buffers = [buffer[s] for buffer in stacked]
            self.noise_arrays = [buffer.numpy().reshape(count, -1) for buffer in stacked]
        self.perturb = first.perturb is not None
        self.record: np.ndarray | None = None
        if first.record is not None:  # ReDo: (block, S, H), each kernel reads its seed's column
            self.record = np.zeros((cfg.block_size, len(self.benchmarks), w2.shape[1]), dtype=np.float32)
            for s, kernel in enumerate(self.kernels):
                kernel.record = self.record[:, s]
        self.penalty: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.coefficient = 0.0
        if first.penalty is not None:
            group = (w1b[:, :inputs], w1b[:, inputs], w2, b2)
            for position, (index, anchor) in enumerate(first.penalty[1]):
                stacked = None
                if anchor is not None:
                    anchors = [k.penalty[1][position][1] for k in self.kernels]
                    stacked = np.stack([a.T if index == 0 else a.reshape(group[index].shape[1:]) for a in anchors])
                self.penalty.append((group[index], stacked))

    def begin(self, first_step: int, length: int, lr: float) -> None:
        """Before a block: task-start hooks (``shrink_perturb`` per task) and each seed's perturbation draws."""
        first = self.kernels[0]
        self.coefficient = first.penalty[0] * lr if first.penalty is not None else 0.0
        if self.task_hook and first_step % self.flip_period == 0:
            for bench, kernel in zip(self.benchmarks, self.kernels):
                with bench.rng.active():
                    kernel.method.on_task_start(bench.model, bench.optimizer, first_step // self.flip_period)
        if self.perturb:
            self._perturb_begin(length)

    def step(self, index: int, x: np.ndarray, h: np.ndarray, dz: np.ndarray, scale: np.ndarray,
             outer: np.ndarray, lr: float) -> None:
        """Penalty, update (with each seed's gradient noise) and perturbation of step ``index`` for every seed."""
        for p, anchor in self.penalty:
            p -= self.coefficient * (p if anchor is None else p - anchor)
        if self.noise:
            self._noisy_update(index, x, h, dz, scale, outer)
        else:
            w1b, w2, b2 = self.views_of_group
            w2 -= scale[:, None] * h
            b2[:, 0] -= scale
            np.multiply(x[:, :, None], dz[:, None, :], out=outer)
            w1b -= outer
        if self.perturb:
            self._perturb_step()

    def _noisy_update(self, index: int, x: np.ndarray, h: np.ndarray, dz: np.ndarray, scale: np.ndarray,
                      outer: np.ndarray) -> None:
        """``noisy_sgd``'s update of every seed: the single-run kernel's (:class:`~lopkit.benchmarks.bitflip_lean.
        _GradientNoise`) elementwise formulas on the stacked gradients, each seed's noise drawn from its own
        generator in its run's order (fc1.weight, fc1.bias, head.weight, head.bias); only the gradient norms sum
        in another order."""
        w1b, w2, b2 = self.views_of_group
        inputs = w1b.shape[1] - 1
        sigmas = np.empty(len(self.kernels), dtype=np.float64)
        for s, kernel in enumerate(self.kernels):
            method = kernel.method
            if method.config.restart_each_task and index % self.flip_period == 0:
                method.t = 0  # on_task_start
            sigmas[s] = method.sigma()
            method.t += 1
            if sigmas[s] > 0:
                generator = method.noise.get(torch.device("cpu"))
                for buffer in kernel.noise.buffers:
                    torch.randn(buffer.shape, generator=generator, out=buffer)
        np.multiply(x[:, :, None], dz[:, None, :], out=outer)  # lr * gradient of [W1^T; b1] (the b1 row is dz)
        g_w2 = scale[:, None] * h
        g_b2 = scale.copy()
        noisy = sigmas > 0
        if noisy.any():
            n_w1, n_b1, n_w2, n_b2 = self.noise_arrays
            g_w1 = outer[:, :inputs]
            norms = [np.sqrt(np.einsum("sdh,sdh->s", g_w1, g_w1)), np.sqrt(np.einsum("sh,sh->s", dz, dz)),
                     np.sqrt(np.einsum("sh,sh->s", g_w2, g_w2)), np.abs(scale)]
            # sigma * ||g|| in float64, then float32, as the single-run kernel's np.float32(sigma * float(norm))
            c_w1, c_b1, c_w2, c_b2 = ((sigmas * norm.astype(np.float64)) * noisy for norm in norms)
            count, hidden = w2.shape
            g_w1 += n_w1.reshape(count, hidden, inputs).transpose(0, 2, 1) * c_w1.astype(np.float32)[:, None, None]
            outer[:, inputs] += n_b1 * c_b1.astype(np.float32)[:, None]
            g_w2 += n_w2 * c_w2.astype(np.float32)[:, None]
            g_b2 += n_b2[:, 0] * c_b2.astype(np.float32)
        w1b -= outer
        w2 -= g_w2
        b2[:, 0] -= g_b2

    def _perturb_begin(self, length: int) -> None:
        """Each seed's uniform draws of the block's shrink-and-perturb events, laid out as the stacked parameters.

        The draws are the single-run kernel's (:class:`~lopkit.benchmarks.bitflip_lean._PerturbSchedule`, each
        seed's own method generator, one ``torch.rand`` per block); every event then updates all seeds at once.
        """
        w1b, w2, _b2 = self.views_of_group
        inputs, hidden = w1b.shape[1] - 1, w1b.shape[2]
        self.noise_rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        draws = []
        for kernel, views in zip(self.kernels, self.seed_views):
            kernel.perturb.begin(views, length)  # draws into kernel.perturb.noise (events x parameters) or None
            draws.append(kernel.perturb.noise)
        method = self.kernels[0].method
        self.events, self.position = method.events, 0
        if draws[0] is None:
            return
        rows = np.stack(draws, axis=1)  # (events, S, H D + H + H + 1), each row in the single-run order
        w1 = rows[:, :, : hidden * inputs].reshape(len(rows), len(draws), hidden, inputs).transpose(0, 1, 3, 2)
        noise_w1b = np.concatenate([w1, rows[:, :, None, hidden * inputs : hidden * (inputs + 1)]], axis=2)
        noise_w2 = rows[:, :, hidden * (inputs + 1) : hidden * (inputs + 2)]
        self.noise_rows = (np.ascontiguousarray(noise_w1b), noise_w2, rows[:, :, hidden * (inputs + 2) :])

    def _perturb_step(self) -> None:
        """Count one step; on every ``every``-th, shrink and perturb every seed's parameters (the same elementwise
        operations as the single-run kernel)."""
        method = self.kernels[0].method
        self.events += 1
        if self.events % method.config.every:
            return
        shrink = np.float32(method.shrink)
        for index, p in enumerate(self.views_of_group):
            if method.shrink != 1.0:
                p *= shrink
            if self.noise_rows is not None:
                p += self.noise_rows[index][self.position]
        self.position += 1
        for kernel in self.kernels:
            kernel.method.applications += 1

    def finish(self, first_step: int, length: int) -> None:
        """After a block: perturbation counters back to the methods, ReDo's statistics and check."""
        for bench, kernel in zip(self.benchmarks, self.kernels):
            if self.perturb:
                kernel.method.events = self.events
            if self.record is None:
                continue
            if (first_step + length) % kernel.method.config.every == 0:  # the check may draw: the run's own RNG
                with bench.rng.active():
                    kernel._redo_statistics(first_step, length)
            else:
                kernel._redo_statistics(first_step, length)


# --------------------------------------------------------------------------- lopkit.runner.vectorised (sweeps)

#: Config fields that may differ within one group: none (the seed group trains one config; its step has one lr).
BITFLIP_VARYING_FIELDS: tuple[str, ...] = ()


def bitflip_refusal(configs: Sequence[Any], methods: Sequence[Any] = ()) -> str | None:
    """Why these bit-flipping runs (their configs, the shared resolved methods) cannot be one seed group, in one line.

    Two Monitor-less copies of the run are built to ask :func:`group_unsupported_reason` (engine, method kernel).
    """
    from lopkit.benchmarks.bitflip import BitFlipBenchmark, BitFlipBenchmarkConfig

    if not configs:
        return "no runs to vectorise"
    first = configs[0]
    if not all(isinstance(config, BitFlipBenchmarkConfig) for config in configs):
        return "configs of another benchmark, not bitflip's"
    if any(config != first for config in configs):
        return "the runs have different configs (a bit-flipping seed group trains one config)"
    probe = replace(first, monitor_every=0)
    try:
        benches = [BitFlipBenchmark(probe, seed, copy.deepcopy(list(methods))) for seed in (0, 1)]
    except ConfigError as err:  # the separate runs report it as a set-up error
        return str(err).splitlines()[0]
    return group_unsupported_reason(benches)


class BitFlipVectorised(MemberGroup):
    """The bit-flipping learner of :mod:`lopkit.runner.vectorised` (sweeps): a :class:`BitFlipSeedGroup` with its contract.

    One :class:`~lopkit.benchmarks.bitflip.BitFlipBenchmark` per member, each with its own copy of the methods
    (attached, seeded and checkpointed by its run); the seed group is made at the first :meth:`run`, after any
    :meth:`load_state_dicts`, so resumed members continue from their saved state.
    """

    def __init__(self, benchmark_cls: type, members: Sequence[tuple[Any, int]], methods: Sequence[Any] = ()):
        members = list(members)
        if not members:
            raise ValueError("no runs to vectorise: pass at least one (config, seed)")
        if any(config != members[0][0] for config, _ in members):
            raise ValueError("cannot vectorise these bitflip runs: the runs have different configs")
        self.benchmarks = [benchmark_cls(config, seed, copy.deepcopy(list(methods))) for config, seed in members]
        reason = group_unsupported_reason(self.benchmarks)
        if reason is not None:
            raise ValueError(f"cannot vectorise these bitflip runs: {reason}")
        self._group: BitFlipSeedGroup | None = None

    def run(self, n_steps: int) -> list[list[dict[str, Any]]]:
        """Advance every member by up to ``n_steps``; per member, the rows its own ``run`` would return."""
        if self._group is None:
            self._group = BitFlipSeedGroup(self.benchmarks)
        return self._group.run(n_steps)

    def state_dicts(self) -> list[dict[str, Any]]:
        """Each member's state (its benchmark's ``state_dict``: loadable by a separate run)."""
        return [bench.state_dict() for bench in self.benchmarks]

    def load_state_dicts(self, states: Sequence[dict[str, Any]]) -> None:
        """Restore every member from a state of its run (written here or by a separate run), all at one step."""
        self._check_member_states(states)
        for bench, state in zip(self.benchmarks, states):
            bench.load_state_dict(state)
        self._group = None  # rebuilt from the loaded parameters and method states at the next run


def run_seed_group(benchmarks: Sequence[Any], n_steps: int | None = None) -> list[list[dict[str, Any]]]:
    """Train these benchmarks as one :class:`BitFlipSeedGroup` to the end (or ``n_steps``); rows per benchmark."""
    group = BitFlipSeedGroup(benchmarks)
    total = benchmarks[0].total_steps - group.step if n_steps is None else n_steps
    return group.run(total)
