"""Experiment E3, bit-flipping ("slowly-changing regression"): online SGD on a drifting teacher-student task.

The learner is a two-layer ReLU network (one hidden layer of ``width`` units, Kaiming-uniform weights, zero
biases) trained online with SGD (batch 1, lr 0.01, MSE) on :class:`lopkit.data.bitflip.BitFlipStream`.
Loss of plasticity shows as an online error that *rises* over time while the effective rank of the hidden
representation falls and, for wide learners, duplicate units appear (spec ``lop_paper.md`` section 4.4,
checklist T5).

Rows (``layer="model"`` unless stated):

- ``online_mse`` at every multiple of ``bin_size``: the mean squared error of the online predictions made
  during the bin (each prediction is made *before* the update on that sample). A last, shorter bin is emitted
  at the final step when ``num_steps`` is not a multiple of ``bin_size``. The running sum is accumulated one
  step at a time in float64 and kept in the state, so rows do not depend on how ``run`` is chunked.
- Monitor metrics at step 0 and every ``monitor_every`` steps, on a fixed probe of ``probe_size`` inputs. The
  default ``probe="run"`` is the paper's code's probe: rows drawn at random from the inputs of the whole run
  (past and future flip states). Layers are named after the tensor they measure:

  - ``fc1``: the hidden Linear layer's output, i.e. the **pre-activations**. The paper's bit-flipping figures
    (duplicates, effective rank) are computed on this tensor (its code hooks named modules only, and the
    ReLU is a function call). Its weight and gradient norms are reported here too.
  - ``act1``: the ReLU outputs (dead, dormant, saturated and duplicate fractions, ranks).
  - ``duplicate_fraction``: the paper's rule, uncentred cosine > ``duplicate_threshold`` (0.98) with some
    later unit. ``live_clone_fraction`` (lopkit's, :func:`lopkit.diagnostics.similarity.live_clone_fraction`):
    Pearson (centred) similarity > the same threshold, dead ReLU units excluded, on ``fc1`` and ``act1``.
    ``dead_duplicate_fraction`` on ``fc1``: units that are both paper duplicates and dead ReLU units; when it
    equals ``duplicate_fraction``, the paper's "duplicates" are dead units, not live clones.
  - ``loss``: the probe MSE (``layer="model"``). Saturation thresholds follow the paper's bit-flipping code:
    ratio < 0.05 on > 80 % of samples.

``task`` in every row is ``step // flip_period`` (the number of flips that happened before the step's
distribution).

Two training engines give the same trajectory up to float rounding:

- ``"lean"``: a hand-written forward/backward/update of the two-layer net in NumPy float32 on views of the
  model's parameters (no optimizer object). About 15x faster than eager autograd at batch 1 without a method.
  ``cbp``, ``cbp_aggressive``, ``redo``, ``l2``, ``l2init``, ``shrink_perturb`` and ``noisy_sgd`` run inside it
  through their kernels (:mod:`lopkit.benchmarks.bitflip_lean`: no torch forward or hook call per step; ``cbp``
  at about the plain engine's speed, ``benchmarks/throughput_bitflip.py``). Other methods that
  :func:`lean_supports` get the generic hooked step: ``on_task_start``, the hidden layer's torch forward so
  that the method's forward hooks see the step, the autograd gradient of ``loss_term`` added to the update,
  and ``after_step``.
- ``"autograd"``: the generic loop (``torch.optim.SGD`` and autograd) that calls every mitigation hook:
  ``on_task_start`` at step 0 and at every flip, ``loss_term`` (added to the loss; the online MSE excludes it),
  ``before_step`` between ``backward`` and ``optimizer.step`` and ``after_step`` after it. Hooks receive the
  0-based index of the step being taken.

``engine="auto"`` (the default) picks ``"lean"`` whenever it supports the method.

Seeds. ``lopkit run bitflip --seeds 0-7`` trains the seeds as one learner vectorised over seeds
(:class:`lopkit.benchmarks.vmap_seeds.BitFlipSeedGroup`) when the method allows it (none, ``cbp``,
``cbp_aggressive``): each seed keeps its own run, rows, checkpoints, data stream and method generator, and its
rows equal a separate run's within float tolerance. It prints which path it takes, and why it runs the seeds
one by one otherwise (``BitFlipBenchmark.seed_group_runner``).

Method switch (checklist T5). ``switch_step=S switch_method=SPEC`` trains with the run's ``--method`` (e.g.
``sgd``) for steps ``0..S-1`` and with ``SPEC`` (a method spec as for ``--method``) from step S on; the first
method is detached, the second attached to the same model and optimizer. The state records whether the switch
happened, so a run resumed from a checkpoint before or after S continues exactly. Example, the paper's T5:
``lopkit run bitflip --preset paper --set width=100 switch_step=2500000 switch_method=cbp_aggressive``.

Presets (whose setup they follow; widths are the ``width`` field, e.g. ``--set width=5``):

- ``paper``: the paper's ("Barriers") code: teacher ``spec_text``, m + 1 learner inputs (constant column),
  zero biases, Kaiming-uniform fc1 (ReLU gain) and fc2 (linear), SGD lr 0.01, 5M steps, T = 10,000,
  metrics every 1000 steps on the run probe of 128 rows, duplicate cosine > 0.98. Width 100 by default.
- ``default``: the same setup for 2M steps (200 flips), metrics every 2000 steps: about a minute per width on
  an idle core with the lean engine.
- ``dohare``: Dohare et al.'s code: teacher ``dohare_code``, m learner inputs (no constant column; the hidden
  bias plays that role), all f slow bits redrawn every T = 10,000 steps (``flip_mode="redraw"``, his
  ``cfg/prob.json``; ``--set flip_mode=one`` is his ``cfg/flip_one``, the papers' description), probe of
  the current distribution. His CBP is ``--method cbp``. Width 5 and 1M steps are lopkit's choices (``--set``).
- ``smoke``: a second (T = 500 so that flips happen).

The teacher rule ``count_with_bias`` is lopkit's own older reading (in neither reference code); no preset uses
it, ``--set threshold_rule=count_with_bias`` still does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from lopkit.benchmarks.base import (
    PrivateRNG,
    check_finite_loss,
    Benchmark,
    BenchmarkConfig,
    make_row,
    register_benchmark,
)
from lopkit.benchmarks.bitflip_lean import (  # noqa: F401  (learner_layers re-exported)
    has_lean_kernel,
    has_lean_kernel_type,
    lean_kernel,
    lean_method_block,
    lean_param_views,
    learner_layers,
)
from lopkit.configs import ConfigError, check_device, require
from lopkit.data.bitflip import FLIP_MODES, THRESHOLD_RULES, BitFlipConfig, BitFlipStream, run_inputs_at
from lopkit.seeding import rng_sandbox, seeded_generator
from lopkit.diagnostics.activations import dead_unit_mask
from lopkit.diagnostics.monitor import METRIC_NAMES, Monitor, MonitorConfig
from lopkit.diagnostics.similarity import duplicate_unit_mask, live_clone_fraction
from lopkit.mitigations.base import Compose, Mitigation

__all__ = [
    "BITFLIP_MONITOR_METRICS",
    "BitFlipBenchmark",
    "BitFlipBenchmarkConfig",
    "PrivateRNG",
    "bin_due",
    "build_learner",
    "lean_sgd_block",
    "learner_layers",
    "make_bitflip_monitor",
    "method_is_noop",
    "monitor_rows",
    "probe_batch",
    "next_block_length",
    "stream_config",
]

#: Monitor metrics measured by default in the bit-flipping benchmark.
BITFLIP_MONITOR_METRICS: tuple[str, ...] = (
    "dead_fraction",
    "dormant_fraction",
    "saturated_fraction",
    "duplicate_fraction",
    "effective_rank",
    "stable_rank",
    "weight_norm",
    "gradient_norm",
    "loss",
)

_INIT_STREAM = 11  # seeded_generator key of the learner initialisation (the data stream uses keys 1..4)
_UNIFORM_PROBE_STREAM = 12  # key of the uniform probe's bits
_RUN_PROBE_STREAM = 13  # key of the run probe's step indices


@dataclasses.dataclass
class BitFlipBenchmarkConfig(BenchmarkConfig):
    """Sizes of the stream and the learner, schedule of the metrics and the training engine."""

    run_id_neutral: ClassVar[tuple[str, ...]] = ("device", "flip_mode")
    """Fields added after runs had been stored (left out of the run id at their default; see BenchmarkConfig)."""

    width: int = 100
    """Hidden units of the learner (the paper uses 5, 10, 50 and 100)."""
    num_bits: int = 20
    """m: input bits, excluding the constant bias input."""
    num_flipping_bits: int = 15
    """f: slowly changing bits; one of them is inverted every ``flip_period`` steps."""
    flip_period: int = 10_000
    """T: steps between two flips."""
    flip_mode: str = "one"
    """``one``: invert one random slow bit every T (the papers); ``redraw``: redraw all f slow bits every T
    (Dohare et al.'s default cfg)."""
    teacher_width: int = 100
    """LTUs in the teacher ("size of the data generating function")."""
    beta: float = 0.7
    """Teacher LTU threshold parameter."""
    threshold_rule: str = "spec_text"
    """How the teacher counts S_i (see :mod:`lopkit.data.bitflip`): ``spec_text`` (the paper's code),
    ``dohare_code`` (Dohare et al.'s code) or ``count_with_bias`` (lopkit's own older reading, in neither)."""
    constant_input: bool = True
    """The learner sees the constant 1 input column (m + 1 inputs, the paper's code); False: only the m bits
    (Dohare et al.'s learner). The teacher always has its bias input."""
    lr: float = 0.01
    """SGD step size."""
    num_steps: int = 2_000_000
    """Online samples (= SGD steps of batch 1)."""
    bin_size: int = 1000
    """Steps per ``online_mse`` bin."""
    monitor_every: int = 2000
    """Steps between Monitor measurements (0 turns the Monitor off)."""
    probe_size: int = 128
    """Inputs in the Monitor's probe batch."""
    probe_seed: int = 0
    """Seed of the probe's random bits."""
    probe: Literal["run", "current", "uniform"] = "run"
    """Probe inputs: ``run`` (the paper's code: ``probe_size`` rows drawn at random, without replacement, from
    the inputs of the whole run, past and future flip states; seeded by the run seed and ``probe_seed``),
    ``current`` distribution (current flipping bits, fixed random bits), or ``uniform`` (all m bits fixed
    uniform draws)."""
    duplicate_threshold: float = 0.98
    """Cosine similarity above which two hidden units are duplicates (paper's bit-flipping value)."""
    saturation_ratio: float = 0.05
    """|dL/dh| / mean|h| below this counts a sample as saturated (paper's bit-flipping value)."""
    saturation_sample_fraction: float = 0.8
    """A unit is saturated when more than this fraction of probe samples is saturated."""
    monitor_metrics: tuple[str, ...] = BITFLIP_MONITOR_METRICS
    """Monitor metric names to record."""
    engine: Literal["auto", "lean", "autograd"] = "auto"
    """Training loop: hand-written NumPy (``lean``), generic autograd with hooks, or ``auto``."""
    device: str = "cpu"
    """Where the learner trains: ``cpu``, ``cuda`` or ``cuda:N`` (on CUDA ``auto`` picks the autograd engine; the
    stream is drawn on the CPU and moved). Batch-1 online SGD is faster on the CPU; vectorised seeds
    (:mod:`lopkit.benchmarks.vmap_seeds`) are the GPU path."""
    block_size: int = 4096
    """Steps of input pulled from the stream at once (speed only; rows do not depend on it)."""
    switch_step: int = 0
    """Checklist T5: at this step the run drops its method and continues with ``switch_method`` (0: no switch).
    The paper switches SGD -> CBP at 2,500,000 of 5,000,000 steps."""
    switch_method: str = ""
    """Method spec used from ``switch_step`` on, as for ``--method`` (e.g. ``cbp_aggressive`` or
    ``cbp:replacement_rate=1e-4``; ``sgd`` for none)."""

    def validate(self) -> None:
        """Reject impossible sizes and unknown names with a message saying what to change."""
        for name in ("width", "num_bits", "flip_period", "teacher_width", "num_steps", "bin_size", "block_size"):
            value = getattr(self, name)
            require(value >= 1, f"{name} must be >= 1, got {value}")
        require(self.num_flipping_bits >= 0, f"num_flipping_bits must be >= 0, got {self.num_flipping_bits}")
        require(
            self.num_flipping_bits <= self.num_bits,
            f"num_flipping_bits={self.num_flipping_bits} cannot exceed num_bits={self.num_bits}",
        )
        require(math.isfinite(self.beta), f"beta must be finite, got {self.beta}")
        require(self.flip_mode in FLIP_MODES, f"flip_mode must be one of {', '.join(FLIP_MODES)}, got {self.flip_mode!r}")
        require(
            self.threshold_rule in THRESHOLD_RULES,
            f"threshold_rule must be one of {', '.join(THRESHOLD_RULES)}, got {self.threshold_rule!r}",
        )
        require(math.isfinite(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr}")
        require(
            self.monitor_every >= 0, f"monitor_every must be >= 0 (0 turns the Monitor off), got {self.monitor_every}"
        )
        require(self.probe_size >= 2, f"probe_size must be >= 2 for rank metrics, got {self.probe_size}")
        require(self.probe_seed >= 0, f"probe_seed must be >= 0, got {self.probe_seed}")
        require(
            -1.0 <= self.duplicate_threshold <= 1.0,
            f"duplicate_threshold must be a cosine similarity in [-1, 1], got {self.duplicate_threshold}",
        )
        require(self.saturation_ratio >= 0, f"saturation_ratio must be >= 0, got {self.saturation_ratio}")
        require(
            0.0 <= self.saturation_sample_fraction <= 1.0,
            f"saturation_sample_fraction must be in [0, 1], got {self.saturation_sample_fraction}",
        )
        require(self.switch_step >= 0, f"switch_step must be >= 0 (0: no switch), got {self.switch_step}")
        require(
            (self.switch_step == 0) == (self.switch_method == ""),
            "switch_step and switch_method go together: set both (e.g. switch_step=2500000 "
            f"switch_method=cbp_aggressive) or neither; got switch_step={self.switch_step}, "
            f"switch_method={self.switch_method!r}",
        )
        require(
            self.switch_step < self.num_steps,
            f"switch_step={self.switch_step} must be below num_steps={self.num_steps}",
        )
        if self.switch_method:
            from lopkit.mitigations.registry import build_methods

            from lopkit.mitigations.base import changes_architecture

            switched = build_methods(self.switch_method)  # raises ConfigError for an unknown method or parameter
            require(
                not changes_architecture(switched),
                f"switch_method={self.switch_method!r} changes the learner's architecture, which cannot happen "
                "mid-run; switch to a training method (e.g. cbp, cbp_aggressive, l2init, shrink_perturb)",
            )
        unknown = [m for m in self.monitor_metrics if m not in METRIC_NAMES]
        require(not unknown, f"unknown monitor_metrics {unknown}; valid names: {', '.join(METRIC_NAMES)}")
        if check_device(self.device).type != "cpu":
            require(self.engine != "lean", f"engine=lean runs in NumPy on the CPU; with device={self.device} use "
                    "engine=auto or engine=autograd")
        require(
            len(self.monitor_metrics) > 0 or self.monitor_every == 0,
            "monitor_metrics is empty; set monitor_every=0 to turn the Monitor off instead",
        )


def stream_config(config: BitFlipBenchmarkConfig) -> BitFlipConfig:
    """The data stream's config from the benchmark config."""
    return BitFlipConfig(
        num_bits=config.num_bits,
        num_flipping_bits=config.num_flipping_bits,
        flip_period=config.flip_period,
        hidden_units=config.teacher_width,
        beta=config.beta,
        threshold_rule=config.threshold_rule,
        flip_mode=config.flip_mode,
    )


def learner_input_dim(config: BitFlipBenchmarkConfig) -> int:
    """Learner inputs: m bits plus the constant column when ``constant_input`` (the paper's code), else m."""
    return config.num_bits + int(config.constant_input)


def learner_inputs(inputs: torch.Tensor, config: BitFlipBenchmarkConfig) -> torch.Tensor:
    """The learner's view of stream inputs (N, m + 1): drops the constant last column unless ``constant_input``."""
    return inputs if config.constant_input else inputs[:, :-1]


def build_learner(config: BitFlipBenchmarkConfig, seed: int) -> nn.Module:
    """The seeded two-layer ReLU learner: Kaiming-uniform weights (ReLU gain / linear gain), zero biases."""
    from lopkit.benchmarks.models import build_mlp

    with rng_sandbox():  # nn.Linear's own init draws from the global RNG; keep it untouched
        model = build_mlp(learner_input_dim(config), (config.width,), 1, activation="relu", norm=None, dropout=0.0)
    hidden, _activation, output = learner_layers(model)
    generator = seeded_generator(seed, _INIT_STREAM)
    with torch.no_grad():
        nn.init.kaiming_uniform_(hidden.weight, a=0.0, mode="fan_in", nonlinearity="relu", generator=generator)
        nn.init.kaiming_uniform_(output.weight, a=0.0, mode="fan_in", nonlinearity="linear", generator=generator)
        nn.init.zeros_(hidden.bias)
        nn.init.zeros_(output.bias)
    return model


def _module_name(model: nn.Module, module: nn.Module) -> str:
    """Name of ``module`` inside ``model`` (as in ``named_modules``)."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError("module is not part of the model")


def make_bitflip_monitor(model: nn.Module, config: BitFlipBenchmarkConfig) -> Monitor:
    """A Monitor on the learner's hidden Linear and ReLU layers with the paper's bit-flipping thresholds."""
    monitor_config = MonitorConfig(
        every=max(1, config.monitor_every),
        duplicate_threshold=config.duplicate_threshold,
        saturation_ratio=config.saturation_ratio,
        saturation_sample_fraction=config.saturation_sample_fraction,
    )
    try:
        hidden, activation, _output = learner_layers(model)
        layers = [_module_name(model, hidden), _module_name(model, activation)]
    except ValueError:  # an architectural mitigation rewrote the learner: monitor its default layers
        layers = None
    return Monitor(model, layers=layers, metrics=config.monitor_metrics, config=monitor_config, max_rows=0)


def method_is_noop(method: Mitigation) -> bool:
    """True when ``method`` is the empty composition or the base no-op Mitigation (no hook does anything)."""
    if isinstance(method, Compose):
        return all(method_is_noop(m) for m in method.methods)
    return type(method) is Mitigation


def next_block_length(step: int, end: int, block_size: int, *periods: int) -> int:
    """Steps until the earliest of ``end``, ``step + block_size`` and the next multiple of each period > 0."""
    stop = min(end, step + block_size)
    for period in periods:
        if period > 0:
            stop = min(stop, (step // period + 1) * period)
    return stop - step


def run_probe_steps(config: BitFlipBenchmarkConfig, seed: int) -> torch.Tensor:
    """The ``probe="run"`` probe's step indices: ``probe_size`` distinct steps of the run, seeded, sorted."""
    generator = seeded_generator(seed, _RUN_PROBE_STREAM, config.probe_seed)
    size = min(config.probe_size, config.num_steps)
    return torch.randperm(config.num_steps, generator=generator)[:size].sort().values


def probe_batch(
    stream: BitFlipStream, config: BitFlipBenchmarkConfig, run_inputs: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Monitor's probe (stream inputs (N, m + 1), teacher targets) for ``config.probe``.

    ``run``: ``run_inputs`` (rows of the whole run, see :func:`run_probe_steps`); ``current``: the current
    distribution; ``uniform``: fixed uniform bits.
    """
    if config.probe == "current":
        return stream.probe_batch(config.probe_size, seed=config.probe_seed)
    if config.probe == "run":
        if run_inputs is None:
            raise ValueError("probe='run' needs the run's probe rows (run_inputs_at(stream config, seed, steps))")
        return run_inputs, stream.targets(run_inputs)
    generator = seeded_generator(config.probe_seed, _UNIFORM_PROBE_STREAM)
    bits = torch.randint(0, 2, (config.probe_size, config.num_bits), generator=generator, dtype=torch.float32)
    inputs = torch.cat([bits, torch.ones(config.probe_size, 1)], dim=1)
    return inputs, stream.targets(inputs)


def monitor_rows(
    monitor: Monitor,
    stream: BitFlipStream,
    config: BitFlipBenchmarkConfig,
    step: int,
    run_inputs: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Benchmark rows of one Monitor measurement on the fixed probe, plus the live-clone rows (see module doc)."""
    stream_inputs, probe_targets = probe_batch(stream, config, run_inputs)
    device = next(monitor.model.parameters()).device  # the probe is drawn on the CPU
    probe_inputs, probe_targets = learner_inputs(stream_inputs, config).to(device), probe_targets.to(device)
    raw = monitor.measure(probe_inputs, probe_targets, mse_loss, step=step)
    task = step // config.flip_period
    rows = [make_row(r["step"], task, r["layer"], r["metric"], r["value"]) for r in raw]
    return rows + clone_rows(monitor.model, probe_inputs, config, step)


def clone_rows(model: nn.Module, probe_inputs: torch.Tensor, config: BitFlipBenchmarkConfig, step: int) -> list[dict]:
    """``live_clone_fraction`` on ``fc1`` and ``act1`` and ``dead_duplicate_fraction`` on ``fc1`` (see module doc)."""
    try:
        hidden, _activation, _output = learner_layers(model)
    except ValueError:  # an architectural method rewrote the learner: no clone rows
        return []
    with torch.no_grad():
        z = hidden(probe_inputs).double()
    h = torch.relu(z)
    dead = dead_unit_mask(h)
    threshold, task = config.duplicate_threshold, step // config.flip_period
    paper_duplicates = duplicate_unit_mask(z, threshold)
    return [
        make_row(step, task, "fc1", "live_clone_fraction", live_clone_fraction(z, threshold, dead)),
        make_row(step, task, "act1", "live_clone_fraction", live_clone_fraction(h, threshold, dead)),
        make_row(step, task, "fc1", "dead_duplicate_fraction", float((paper_duplicates & dead).double().mean())),
    ]


def bin_due(step: int, total_steps: int, bin_size: int, bin_count: int) -> bool:
    """Whether an ``online_mse`` row is due after ``step``: a bin is complete, or the run ends mid-bin."""
    return bin_count > 0 and (step % bin_size == 0 or step == total_steps)


def mse_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error (the benchmark's training and probe loss)."""
    return nn.functional.mse_loss(prediction, target)


def lean_sgd_block(
    params: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    inputs: np.ndarray,
    targets: np.ndarray,
    lr: float,
    loss_sum: float,
    first_step: int = 0,
) -> float:
    """Online SGD (batch 1, MSE) of a 2-layer ReLU net over ``inputs`` in place; returns the updated loss sum.

    The plain lean step: :func:`~lopkit.benchmarks.bitflip_lean.lean_method_block` (whose docstring gives the
    maths) with no method effect. ``params`` are float32 NumPy views ``(W1 (H, D), b1 (H,), w2 (H,), b2 (1,))``.
    """
    return lean_method_block(params, inputs, targets, lr, loss_sum, first_step)


def resolve_constant_column(method: Mitigation, config: BitFlipBenchmarkConfig) -> None:
    """Tell methods whose ``config.constant_column`` is None (``cbp``) whether fc1 has the constant input column."""
    for member in getattr(method, "methods", None) or [method]:
        member_config = getattr(member, "config", None)
        if member_config is not None and getattr(member_config, "constant_column", False) is None:
            member_config.constant_column = config.constant_input


def _overrides(method: Mitigation, hook: str) -> bool:
    """Whether ``method`` (or a member of a composition) overrides the base Mitigation's ``hook``."""
    if isinstance(method, Compose):
        return any(_overrides(m, hook) for m in method.methods)
    return getattr(type(method), hook) is not getattr(Mitigation, hook)


def _needs_autograd_step(method: Mitigation) -> bool:
    """Whether ``method`` (or a member of a composition) needs the training step's autograd graph."""
    if isinstance(method, Compose):
        return any(_needs_autograd_step(m) for m in method.methods)
    return bool(getattr(method, "needs_autograd_step", False))


def lean_supports(method: Mitigation, model: nn.Module) -> bool:
    """Whether the lean engine can train ``model`` with ``method``: a lean kernel, or the plain learner without ``before_step``/``prepare_model``.

    Methods with a kernel of :mod:`lopkit.benchmarks.bitflip_lean` (``cbp``, ``cbp_aggressive``, ``redo``, ``l2``,
    ``l2init``, ``shrink_perturb``, ``noisy_sgd``) run it: no torch forward or hook call per step. For other
    methods the lean engine calls ``on_task_start``, ``loss_term`` (its gradient by autograd, added to the update),
    the forward hooks of fc1 and act1 (one torch forward of the hidden layer per step) and ``after_step``;
    it has no ``.grad`` tensors for ``before_step`` to edit and needs the plain fc1/ReLU/fc2 model.
    """

    if _needs_autograd_step(method) or _overrides(method, "prepare_model"):
        return False
    if has_lean_kernel(method, model):
        return True  # its own kernel (lopkit.benchmarks.bitflip_lean), e.g. noisy_sgd's gradient noise
    if _overrides(method, "before_step"):
        return False
    try:
        hidden, activation, output = learner_layers(model)
    except ValueError:
        return False
    leaves = [m for m in model.modules() if not list(m.children())]
    if any(not isinstance(m, (nn.Linear, nn.ReLU, nn.Flatten, nn.Identity)) for m in leaves):
        return False  # e.g. a norm or dropout layer that the hand-written step would skip
    hooked = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    return all(m is hidden or m is activation for m in hooked) and not output._forward_hooks


@register_benchmark
class BitFlipBenchmark(Benchmark):
    """E3: online regression on a bit-flipping stream; emits binned online MSE and Monitor metrics."""

    name = "bitflip"
    Config = BitFlipBenchmarkConfig
    description = "Bit-flipping online regression (E3): online MSE rises, rank falls, duplicates grow with width."
    presets = {
        # A few seconds: the code paths, not the trend (the paper's code's setup at toy sizes).
        "smoke": {"width": 10, "num_steps": 4000, "flip_period": 500, "bin_size": 500, "monitor_every": 1000},
        # The paper's code's setup (as ``paper``) for 2M steps (200 flips), metrics every 2000 steps: about a
        # minute per width on an idle core with the lean engine.
        "default": {
            "width": 100, "num_steps": 2_000_000, "flip_period": 10_000, "bin_size": 1000, "monitor_every": 2000,
            "threshold_rule": "spec_text", "constant_input": True, "probe": "run",
        },
        # The paper's ("Barriers") code: spec_text teacher, m + 1 inputs, 5M steps, T = 10k, metrics every 1000
        # steps on 128 rows drawn from the whole run, duplicate cosine > 0.98. Widths 5/10/50/100 via width=.
        "paper": {
            "width": 100, "num_steps": 5_000_000, "flip_period": 10_000, "bin_size": 1000, "monitor_every": 1000,
            "threshold_rule": "spec_text", "constant_input": True, "probe": "run",
        },
        # Dohare et al.'s code: dohare_code teacher, m inputs (no constant column), all f slow bits redrawn every T
        # (his cfg/prob.json; flip_mode=one is his cfg/flip_one); width and length are lopkit's choices. His CBP
        # is ``cbp`` with its defaults.
        "dohare": {
            "width": 5, "num_steps": 1_000_000, "flip_period": 10_000, "bin_size": 1000, "monitor_every": 2000,
            "threshold_rule": "dohare_code", "constant_input": False, "probe": "current", "flip_mode": "redraw",
        },
    }

    def __init__(self, config: BitFlipBenchmarkConfig, seed: int, method: Mitigation | list[Mitigation] | None = None):
        super().__init__(config, seed, method)
        self.rng = PrivateRNG(self.seed)
        self.stream = BitFlipStream(stream_config(config), self.seed)
        self.device = check_device(config.device)
        with self.rng.active():  # an architectural method (layernorm, crelu, ...) may draw fresh weights
            self.model = self.method.prepare_model(build_learner(config, self.seed).to(self.device)).to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr)
        resolve_constant_column(self.method, config)
        self.method.attach(self.model, self.optimizer)
        self.switched = False
        self.engine = self._resolve_engine(config.engine)
        if config.switch_step and config.engine == "lean":
            from lopkit.mitigations.registry import build_methods


            switched = build_methods(config.switch_method)
            if _overrides(switched, "before_step") and not has_lean_kernel_type(switched):
                raise ConfigError(
                    f"engine='lean' cannot run switch_method {config.switch_method!r} (it edits gradients in "
                    "before_step); use engine='auto' or engine='autograd'"
                )
        self.monitor = make_bitflip_monitor(self.model, config) if config.monitor_every > 0 else None
        self.run_probe_inputs: torch.Tensor | None = None
        if config.probe == "run" and config.monitor_every > 0:
            self.run_probe_inputs = run_inputs_at(stream_config(config), self.seed, run_probe_steps(config, self.seed))
        self._bin_sum = 0.0
        self._bin_count = 0
        self._initial_measured = False
        self._last_mse = float("nan")

    seed_group_runner: ClassVar[str] = "lopkit.runner.bitflip_group:execute_seed_group"
    """``lopkit run --seeds``: trains the seeds as one vectorised learner when the method allows it (prints which
    path), or returns None and the seeds run one by one; a "module:function" name, loaded when used (the module
    imports this one)."""

    def _resolve_engine(self, engine: str) -> str:
        """``auto`` -> ``lean`` when :func:`lean_supports` the method, else ``autograd``; ``lean`` otherwise errors."""
        supported = method_is_noop(self.method) or lean_supports(self.method, self.model)
        if self.device.type != "cpu":  # the lean engine is NumPy on the CPU
            if engine == "lean":
                raise ConfigError(f"engine='lean' runs on the CPU only; with device={self.device} use engine='auto'")
            return "autograd"
        if engine == "auto":
            return "lean" if supported else "autograd"
        if engine == "lean" and not supported:
            raise ConfigError(
                f"engine='lean' cannot run method {self.method.name!r} (it edits gradients in before_step or "
                "changes the learner); use engine='auto' or engine='autograd'"
            )
        return engine

    def switch_method(self) -> None:
        """Checklist T5: detach the current method and attach ``config.switch_method`` from now on."""
        from lopkit.mitigations.registry import build_methods

        detach = getattr(self.method, "detach", None)
        if callable(detach):
            detach()
        for member in getattr(self.method, "methods", ()):
            if callable(getattr(member, "detach", None)):
                member.detach()
        self.method = build_methods(self.config.switch_method)
        resolve_constant_column(self.method, self.config)
        self.method.attach(self.model, self.optimizer)
        self.switched = True
        self.engine = self._resolve_engine(self.config.engine)

    @property
    def total_steps(self) -> int:
        """``num_steps``."""
        return self.config.num_steps

    def task_at(self, step: int) -> int:
        """Number of flips before the distribution of ``step`` (the ``task`` of rows at that step)."""
        return step // self.config.flip_period

    def run(self, n_steps: int) -> list[dict[str, Any]]:
        """Train for up to ``n_steps`` online steps; return bin and Monitor rows completed on the way."""
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        rows: list[dict[str, Any]] = []
        cfg = self.config
        if self.monitor is not None and self.step == 0 and not self._initial_measured:
            rows += self._measure()
            self._initial_measured = True
        end = min(self.step + n_steps, self.total_steps)
        while self.step < end:
            if cfg.switch_step and not self.switched and self.step >= cfg.switch_step:
                with self.rng.active():
                    self.switch_method()
            stop = end if self.switched or not cfg.switch_step else min(end, cfg.switch_step)
            rows += self._run_phase(stop)
        return rows

    def _run_phase(self, end: int) -> list[dict[str, Any]]:
        """Train with the current method and engine up to step ``end``."""
        rows: list[dict[str, Any]] = []
        cfg = self.config
        noop = method_is_noop(self.method)
        views = lean_param_views(self.model) if self.engine == "lean" else None
        kernel = self.lean_kernel() if views is not None and not noop else None
        periods = kernel.periods() if kernel is not None else ()
        with self.rng.active():
            while self.step < end:
                length = next_block_length(self.step, end, cfg.block_size, cfg.bin_size, cfg.monitor_every, *periods)
                stream_inputs, targets = self.stream.next_batches(length)
                inputs = learner_inputs(stream_inputs, cfg)
                if views is not None and noop:
                    self._bin_sum = lean_sgd_block(
                        views, inputs.numpy(), targets.numpy()[:, 0], cfg.lr, self._bin_sum, self.step
                    )
                elif kernel is not None:
                    self._bin_sum = kernel.run_block(
                        views, inputs.numpy(), targets.numpy()[:, 0], cfg.lr, self._bin_sum, self.step
                    )
                elif views is not None:
                    self._bin_sum = self._lean_hooked_block(views, inputs, targets, self._bin_sum)
                else:
                    self._bin_sum = self._autograd_block(inputs.to(self.device), targets.to(self.device),
                                                         self._bin_sum)
                self._bin_count += length
                self.step += length
                rows += self._after_block()
        return rows

    def lean_kernel(self) -> Any:
        """The lean kernel of the current method (:func:`lopkit.benchmarks.bitflip_lean.lean_kernel`) or None."""

        return lean_kernel(self.method, self.model, self.optimizer, self.config)

    def _lean_hooked_block(
        self, views: tuple[np.ndarray, ...], inputs: torch.Tensor, targets: torch.Tensor, loss_sum: float
    ) -> float:
        """The lean step with the method's hooks (see :func:`lean_supports`); returns the updated loss sum."""
        model, optimizer, method, cfg = self.model, self.optimizer, self.method, self.config
        hidden, activation, _output = learner_layers(model)
        params = [p for p in model.parameters() if p.requires_grad]
        inputs_np, targets_np = inputs.numpy(), targets.numpy()[:, 0]
        model.train()
        for i in range(inputs.shape[0]):
            index = self.step + i
            if index % cfg.flip_period == 0:
                method.on_task_start(model, optimizer, index // cfg.flip_period)
            if hidden._forward_hooks or activation._forward_hooks or hidden._forward_pre_hooks:
                with torch.no_grad():
                    activation(hidden(inputs[i : i + 1].clone()))  # the method's hooks see this step's forward (aligned copy)
            extra = method.loss_term(model)
            extra_grads = None
            if extra is not None:
                extra_grads = torch.autograd.grad(extra, params, allow_unused=True)
            loss_sum = lean_sgd_block(views, inputs_np[i : i + 1], targets_np[i : i + 1], cfg.lr, loss_sum, index)
            if extra_grads is not None:
                with torch.no_grad():
                    for p, g in zip(params, extra_grads):
                        if g is not None:
                            p.sub_(g, alpha=cfg.lr)
            method.after_step(model, optimizer, index)
        return loss_sum

    def _autograd_block(self, inputs: torch.Tensor, targets: torch.Tensor, loss_sum: float) -> float:
        """Generic online SGD over a block with every mitigation hook called; returns the updated loss sum."""
        model, optimizer, method, period = self.model, self.optimizer, self.method, self.config.flip_period
        model.train()
        for i in range(inputs.shape[0]):
            index = self.step + i
            if index % period == 0:
                method.on_task_start(model, optimizer, index // period)
            # a fresh (aligned) copy of the sample: a view into the block changes the float rounding with the chunking
            loss = mse_loss(model(inputs[i : i + 1].clone()), targets[i : i + 1])
            extra = method.loss_term(model)
            total = loss if extra is None else loss + extra
            check_finite_loss("bitflip", total, index, self.config.lr)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            method.before_step(model, optimizer, index)
            optimizer.step()
            method.after_step(model, optimizer, index)
            loss_sum += float(loss.detach())
        return loss_sum

    def _after_block(self) -> list[dict[str, Any]]:
        """Rows due at the current step: a completed (or final) MSE bin and a Monitor measurement."""
        rows: list[dict[str, Any]] = []
        cfg = self.config
        if bin_due(self.step, self.total_steps, cfg.bin_size, self._bin_count):
            self._last_mse = self._bin_sum / self._bin_count
            rows.append(make_row(self.step, self.task_at(self.step), "model", "online_mse", self._last_mse))
            self._bin_sum, self._bin_count = 0.0, 0
        if self.monitor is not None and self.step % cfg.monitor_every == 0:
            rows += self._measure()
        return rows

    def _measure(self) -> list[dict[str, Any]]:
        """Monitor and live-clone rows on the fixed probe (see :func:`probe_batch`)."""
        assert self.monitor is not None
        return monitor_rows(self.monitor, self.stream, self.config, self.step, self.run_probe_inputs)

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, method, stream, bin accumulator, flags and global RNGs (copies, not views)."""
        return {
            "step": self.step,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "stream": self.stream.state_dict(),
            "bin_sum": self._bin_sum,
            "bin_count": self._bin_count,
            "initial_measured": self._initial_measured,
            "last_mse": self._last_mse,
            "rng": self.rng.state,
            "switched": self.switched,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (parameters are copied in place; a saved switch is redone)."""
        if bool(state.get("switched", False)) and not self.switched:
            with self.rng.active():  # as in run(); the saved generator states are restored below
                self.switch_method()
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        self.stream.load_state_dict(state["stream"])
        self.step = int(state["step"])
        self._bin_sum = float(state["bin_sum"])
        self._bin_count = int(state["bin_count"])
        self._initial_measured = bool(state["initial_measured"])
        self._last_mse = float(state["last_mse"])
        self.rng.state = state["rng"]

    def progress(self) -> dict[str, Any]:
        """Current flip count and the last completed bin's online MSE."""
        return {"task": self.task_at(self.step), "online_mse": round(self._last_mse, 4)}

