"""Experiment E2, cloning: train a base MLP, clone it x2 (function-preserving), then train base and clone side by side.

Protocol (spec ``lop_paper.md`` section 4.3, scaled from CIFAR-10 to Fashion-MNIST, all 10 classes):

1. Train the base MLP (default 3 x 64 ReLU with BatchNorm before the activation, the paper's MLP shape scaled
   down) for ``base_steps`` minibatch steps on a seeded training subset of ``train_size`` images.
2. Clone it with :func:`lopkit.theory.cloning.clone` (every hidden unit copied ``factor`` times, incoming weights
   divided by the input expansion, BatchNorm statistics duplicated): the clone computes exactly the base
   function and sits on the cloned-unit LoP manifold (Theorem 2.1).
3. Train base and clone for ``paired_steps`` more steps on the *same* minibatches. The clone gets a fresh
   optimizer. ``variant`` picks the clone's training rule:

   - ``sgd``: plain SGD (lr 0.01, momentum ``momentum``, default 0 as the paper's text says; spec section 8.2);
   - ``adam``: Adam (lr 1e-3 unless ``lr`` is set), for base and clone;
   - ``noisy_sgd``: SGD whose gradient gets Gaussian noise before each clone update:
     ``g <- g + eps``, ``eps ~ N(0, (sigma_t * ||g||)^2 I)`` with ``||g||`` the norm of each parameter tensor's
     gradient (as the authors' ``NoisySGD``) and ``sigma_t = noise_sigma0 * noise_decay ** t``, ``t`` counting
     clone steps from 0 (so ``noise_decay = 0`` adds noise on the first step only). The base gets no noise;
   - ``dropout``: Dropout(``dropout_p``) after every hidden activation, inserted *before* cloning, so base and
     clone share the architecture. As in the paper, the base is then also trained with dropout (from step 0);
     base and clone draw independent masks.

   Theory predicts: SGD and Adam keep the clone exactly on the manifold (cloning R^2 = 1 for the whole run,
   checklist T1); noise or dropout break the symmetry, R^2 drops below 1 and the effective rank rises (T2).

Rows (``task`` is always 0; whole-model rows use ``layer="model"``), at step 0, every ``log_every`` steps, at the
cloning step ``base_steps`` and at the last step:

- ``base_loss`` / ``clone_loss``: mean training minibatch loss (train mode, dropout active) over the steps since
  the previous log (the clone's starts at the cloning step);
- ``base_probe_loss`` / ``clone_probe_loss``: eval-mode loss on a fixed probe of ``probe_size`` training images;
- ``base_effective_rank`` / ``clone_effective_rank``: per hidden activation layer (``act1``, ``act2``, ...) on the
  probe (eval mode);
- ``cloning_r2_forward`` / ``cloning_r2_backward``: per hidden activation layer of the clone, the variance-ratio
  cloning R^2 of the activations and of dL/dh on the probe, blocks given by the clone's Partition.

A mitigation passed as ``method`` acts on the clone only (its hooks are called from the cloning step on:
``attach`` and ``on_task_start(task=0)`` when the clone is made, then ``loss_term``/``before_step``/``after_step``
at every clone step, with the clone step index); the base is the untouched reference. Noise of ``noisy_sgd`` is
applied after ``before_step`` and before ``optimizer.step()``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lopkit.benchmarks.base import Benchmark, BenchmarkConfig, make_row, register_benchmark
from lopkit.benchmarks.base import PrivateRNG, check_finite_loss
from lopkit.benchmarks.models import build_mlp
from lopkit.configs import ConfigError, require
from lopkit.data.seeding import derive_seed, seeded_generator
from lopkit.data.tasks import TaskStream
from lopkit.diagnostics.monitor import Monitor, MonitorConfig
from lopkit.mitigations.base import Mitigation, changes_architecture
from lopkit.theory.cloning import clone
from lopkit.theory.partition import Partition

__all__ = [
    "VARIANTS",
    "CloningBenchmark",
    "CloningConfig",
    "activation_layer_names",
    "add_relative_gradient_noise_",
    "noise_scale",
]

VARIANTS = ("sgd", "adam", "noisy_sgd", "dropout")
MODEL_LAYER = "model"
_SUBSET_STREAM, _PROBE_STREAM, _INIT_STREAM, _NOISE_STREAM = 21, 22, 23, 24
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclasses.dataclass
class CloningConfig(BenchmarkConfig):
    """Data subset, base MLP, schedule, clone variant and its hyper-parameters."""

    variant: Literal["sgd", "adam", "noisy_sgd", "dropout"] = "sgd"
    """How the clone is trained (see the module docstring)."""
    dataset: Literal["fashion_mnist", "digits"] = "fashion_mnist"
    """Fashion-MNIST (28x28, 10 classes), or scikit-learn's 8x8 digits (tiny, for quick checks)."""
    train_size: int = 10_000
    """Training images used (a seeded subset of the training split; capped at the split size)."""
    data_seed: int = 0
    """Seed of the training subset and of the probe (shared by every run seed)."""
    hidden: tuple[int, ...] = (64, 64, 64)
    """Hidden widths of the base MLP (the clone's are ``factor`` times larger)."""
    norm: Literal["batch", "layer", "none"] = "batch"
    """Normalisation before each activation (the paper uses BatchNorm for the MLP)."""
    affine: bool = True
    """Learnable normalisation scale and shift."""
    factor: int = 2
    """Width expansion of the clone."""
    batch_size: int = 128
    base_steps: int = 1560
    """Steps of the base alone before cloning."""
    paired_steps: int = 20_000
    """Steps of base and clone side by side after cloning."""
    lr: float | None = None
    """Step size; None: 0.01 for SGD-based variants, 0.001 for adam."""
    momentum: float = 0.0
    """SGD momentum (base and clone; not used by adam)."""
    noise_sigma0: float = 0.01
    """noisy_sgd: initial noise scale relative to each gradient's norm."""
    noise_decay: float = 0.999
    """noisy_sgd: sigma_t = sigma0 * decay**t (0: first step only; 1: constant)."""
    dropout_p: float = 0.1
    """dropout: drop probability after each hidden activation."""
    log_every: int = 500
    """Steps between two logs."""
    probe_size: int = 500
    """Fixed probe of training images for ranks, R^2 and probe losses."""
    dtype: Literal["float32", "float64"] = "float32"
    """Floating point type of models and data."""
    data_dir: str | None = None
    """Fashion-MNIST folder (None: $LOPKIT_FASHION_MNIST_DIR or the Debian path)."""

    def validate(self) -> None:
        """Reject impossible values with a message saying what to change."""
        require(self.train_size >= 2, f"train_size must be >= 2, got {self.train_size}")
        require(self.data_seed >= 0, f"data_seed must be >= 0, got {self.data_seed}")
        require(
            len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden),
            f"hidden must be positive widths such as 64,64,64; got {self.hidden}",
        )
        require(self.factor >= 2, f"factor must be >= 2 (a clone of factor 1 is the base itself), got {self.factor}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.norm != "batch" or self.batch_size >= 2, "norm=batch needs batch_size >= 2")
        require(self.base_steps >= 1, f"base_steps must be >= 1, got {self.base_steps}")
        require(self.paired_steps >= 1, f"paired_steps must be >= 1, got {self.paired_steps}")
        require(self.lr is None or (math.isfinite(self.lr) and self.lr > 0), f"lr must be > 0 or none, got {self.lr}")
        require(0.0 <= self.momentum < 1.0, f"momentum must be in [0, 1), got {self.momentum}")
        require(
            math.isfinite(self.noise_sigma0) and self.noise_sigma0 >= 0,
            f"noise_sigma0 must be a finite number >= 0, got {self.noise_sigma0}",
        )
        require(0.0 <= self.noise_decay <= 1.0, f"noise_decay must be in [0, 1], got {self.noise_decay}")
        require(0.0 < self.dropout_p < 1.0, f"dropout_p must be in (0, 1), got {self.dropout_p}")
        require(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        require(self.probe_size >= 2, f"probe_size must be >= 2, got {self.probe_size}")
        require(
            self.probe_size <= self.train_size,
            f"probe_size ({self.probe_size}) cannot exceed train_size ({self.train_size}); lower probe_size",
        )

    @property
    def step_size(self) -> float:
        """The learning rate in use (``lr`` or the variant's default)."""
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.variant == "adam" else 1e-2


def noise_scale(sigma0: float, decay: float, step: int) -> float:
    """sigma_t = sigma0 * decay**t (with 0**0 = 1, so decay 0 means noise on step 0 only)."""
    return sigma0 * decay**step


@torch.no_grad()
def add_relative_gradient_noise_(params: list[Tensor], sigma: float, generator: torch.Generator) -> None:
    """In place ``g += N(0, (sigma * ||g||)^2 I)`` for the gradient ``g`` of each parameter tensor (Noisy SGD)."""
    if sigma == 0.0:
        return
    for param in params:
        grad = param.grad
        if grad is None:
            continue
        norm = torch.linalg.vector_norm(grad)
        noise = torch.randn(grad.shape, generator=generator, dtype=grad.dtype, device=grad.device)
        grad.add_(noise * (norm * sigma))


def activation_layer_names(model: nn.Module) -> list[str]:
    """Names of the hidden ReLU modules (``act1``, ``act2``, ...) in forward order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.ReLU)]


def _load_data(config: CloningConfig) -> tuple[Tensor, Tensor]:
    """Standardised flattened training images and labels of the configured dataset."""
    if config.dataset == "digits":
        from lopkit.data.digits import load_digits_dataset

        x, y = load_digits_dataset(flatten=True)
        x = (x - x.mean()) / x.std()
        return x, y
    from lopkit.data.fashion_mnist import load_fashion_mnist

    return load_fashion_mnist("train", flatten=True, standardize=True, data_dir=config.data_dir)


@register_benchmark
class CloningBenchmark(Benchmark):
    """E2: base MLP, x2 function-preserving clone, then paired training; logs cloning R^2, losses and ranks."""

    name = "cloning"
    Config = CloningConfig
    description = "Cloning (E2): SGD/Adam keep clones exact (R^2 = 1); noise or dropout escape the clone manifold."
    presets = {
        # Seconds: 2000 images, 2 x 32, a few hundred steps.
        "smoke": {
            "train_size": 2000, "hidden": (32, 32), "batch_size": 64, "base_steps": 200, "paired_steps": 300,
            "log_every": 100, "probe_size": 256,
        },
        # Minutes: 10k images, 3 x 64; 20 epochs of base (1560 steps), then ~256 epochs paired (20k steps):
        # about 1 ms per base step and 3 ms per paired step on one idle core, ~1.2 min per variant.
        "default": {
            "train_size": 10_000, "hidden": (64, 64, 64), "batch_size": 128, "base_steps": 1560,
            "paired_steps": 20_000, "log_every": 500, "probe_size": 500,
        },
        # The paper's protocol on all 60k images: 5 x 128 MLP with BN, 20 epochs base, 500 epochs paired,
        # logs every 5 epochs (469 steps per epoch at batch 128).
        "paper": {
            "train_size": 60_000, "hidden": (128,) * 5, "batch_size": 128, "base_steps": 20 * 469,
            "paired_steps": 500 * 469, "log_every": 5 * 469, "probe_size": 500,
        },
    }  # fmt: skip

    def __init__(self, config: CloningConfig, seed: int, method: Mitigation | list[Mitigation] | None = None):
        super().__init__(config, seed, method)
        if changes_architecture(self.method):
            raise ConfigError(
                f"the cloning benchmark compares a base and its exact clone, so method {self.method.name!r}, which "
                "rewrites the model, cannot be applied; set the architecture with config keys instead "
                "(e.g. --set norm=layer or --set variant=dropout)"
            )
        self.rng = PrivateRNG(self.seed)
        self.dtype = _DTYPES[config.dtype]
        x, y = _load_data(config)
        subset = torch.randperm(x.shape[0], generator=seeded_generator(config.data_seed, _SUBSET_STREAM))
        subset = subset[: min(config.train_size, x.shape[0])].sort().values
        self.train_x, self.train_y = x[subset].to(self.dtype), y[subset]
        probe = torch.randperm(self.train_x.shape[0], generator=seeded_generator(config.data_seed, _PROBE_STREAM))
        probe = probe[: config.probe_size].sort().values
        self.probe_x, self.probe_y = self.train_x[probe], self.train_y[probe]
        self.num_classes = int(y.max()) + 1
        self.base = self._build_base()
        self.base_optimizer = self._make_optimizer(self.base)
        self.base_monitor = self._make_monitor(self.base, None)
        self.stream = TaskStream(self.train_x.shape[0], config.batch_size, seed=self.seed)
        self.noise_generator = seeded_generator(self.seed, _NOISE_STREAM)
        self.clone: nn.Module | None = None
        self.clone_optimizer: torch.optim.Optimizer | None = None
        self.clone_monitor: Monitor | None = None
        self.partition: Partition | None = None
        self._sums = {"base": 0.0, "base_steps": 0, "clone": 0.0, "clone_steps": 0}
        self._initial_logged = False
        self._last: dict[str, float] = {}

    # ------------------------------------------------------------------ construction helpers
    def _build_base(self) -> nn.Module:
        """The seeded base MLP (PyTorch default init), with dropout modules for the dropout variant."""
        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, _INIT_STREAM))
            model = build_mlp(
                self.train_x.shape[1],
                cfg.hidden,
                self.num_classes,
                activation="relu",
                norm=None if cfg.norm == "none" else cfg.norm,
                affine=cfg.affine,
                dropout=cfg.dropout_p if cfg.variant == "dropout" else 0.0,
            )
        return model.to(self.dtype)

    def _make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Adam for the adam variant, SGD (with ``momentum``) otherwise."""
        if self.config.variant == "adam":
            return torch.optim.Adam(model.parameters(), lr=self.config.step_size)
        return torch.optim.SGD(model.parameters(), lr=self.config.step_size, momentum=self.config.momentum)

    def _make_monitor(self, model: nn.Module, partition: Partition | None) -> Monitor:
        """Effective rank (and, for the clone, cloning R^2) on the hidden activations, plus the probe loss."""
        layers = activation_layer_names(model)
        metrics = ["effective_rank", "loss"]
        blocks = None
        if partition is not None:
            metrics += ["cloning_r2_forward", "cloning_r2_backward"]
            blocks = {name: partition[name] for name in layers}
        return Monitor(model, layers=layers, metrics=metrics, partition=blocks, config=MonitorConfig(seed=self.seed),
                       max_rows=0)

    def _make_clone(self) -> None:
        """Clone the base now, give the clone a fresh optimizer and monitor, and attach the method to it."""
        self.clone, self.partition = clone(self.base, self.config.factor)
        self.clone_optimizer = self._make_optimizer(self.clone)
        self.clone_monitor = self._make_monitor(self.clone, self.partition)

    def _start_clone(self) -> None:
        """Make the clone and hand it to the method (``attach``, then ``on_task_start(task=0)``)."""
        self._make_clone()
        self.method.attach(self.clone, self.clone_optimizer)
        self.method.on_task_start(self.clone, self.clone_optimizer, 0)

    # ------------------------------------------------------------------ Benchmark API
    @property
    def total_steps(self) -> int:
        """``base_steps + paired_steps``."""
        return self.config.base_steps + self.config.paired_steps

    def run(self, n_steps: int) -> list[dict[str, Any]]:
        """Advance by up to ``n_steps`` steps (a paired step trains base and clone once each)."""
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        rows: list[dict[str, Any]] = []
        end = min(self.step + n_steps, self.total_steps)
        with self.rng.active():
            if not self._initial_logged:
                rows += self._log()
                self._initial_logged = True
            while self.step < end:
                self._train_step()
                self.step += 1
                if self._log_due():
                    rows += self._log()
        return rows

    def _log_due(self) -> bool:
        """Logs fall on multiples of ``log_every``, the cloning step and the last step."""
        return self.step % self.config.log_every == 0 or self.step in (self.config.base_steps, self.total_steps)

    def _train_step(self) -> None:
        """One minibatch step of the base and, once it exists, of the clone on the same minibatch."""
        indices = self.stream.next_indices()
        inputs, targets = self.train_x[indices], self.train_y[indices]
        self._sums["base"] += self._sgd_step(self.base, self.base_optimizer, inputs, targets)
        self._sums["base_steps"] += 1
        if self.clone is None:
            return
        clone_step = self.step - self.config.base_steps
        self._sums["clone"] += self._sgd_step(
            self.clone, self.clone_optimizer, inputs, targets, method=self.method, clone_step=clone_step
        )
        self._sums["clone_steps"] += 1

    def _sgd_step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        inputs: Tensor,
        targets: Tensor,
        method: Mitigation | None = None,
        clone_step: int = 0,
    ) -> float:
        """Forward, backward, (method hooks and noise for the clone), update; returns the minibatch loss."""
        model.train()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        extra = method.loss_term(model) if method is not None else None
        total = loss if extra is None else loss + extra
        check_finite_loss("cloning", total, self.step, self.config.lr, "clone" if method is not None else "base")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if method is not None:
            method.before_step(model, optimizer, clone_step)
            if self.config.variant == "noisy_sgd":
                sigma = noise_scale(self.config.noise_sigma0, self.config.noise_decay, clone_step)
                add_relative_gradient_noise_(list(model.parameters()), sigma, self.noise_generator)
        optimizer.step()
        if method is not None:
            method.after_step(model, optimizer, clone_step)
        return float(loss.detach())

    # ------------------------------------------------------------------ logging
    def _log(self) -> list[dict[str, Any]]:
        """Training-loss means since the last log, then probe metrics of the base and (if any) the clone."""
        rows: list[dict[str, Any]] = []
        for which in ("base", "clone"):
            count = self._sums[f"{which}_steps"]
            if count:
                mean = self._sums[which] / count
                rows.append(make_row(self.step, 0, MODEL_LAYER, f"{which}_loss", mean))
                self._last[f"{which}_loss"] = mean
                self._sums[which], self._sums[f"{which}_steps"] = 0.0, 0
        if self.step == self.config.base_steps and self.clone is None:
            self._start_clone()  # made here so that its starting point is logged at the cloning step
        rows += self._probe_rows("base", self.base_monitor)
        if self.clone_monitor is not None:
            rows += self._probe_rows("clone", self.clone_monitor)
        return rows

    def _probe_rows(self, which: str, monitor: Monitor) -> list[dict[str, Any]]:
        """Monitor rows on the probe, renamed ``{which}_effective_rank`` / ``{which}_probe_loss``."""
        raw = monitor.measure(self.probe_x, self.probe_y, nn.functional.cross_entropy, step=self.step)
        renamed = {"effective_rank": f"{which}_effective_rank", "loss": f"{which}_probe_loss"}
        rows = [make_row(self.step, 0, r["layer"], renamed.get(r["metric"], r["metric"]), r["value"]) for r in raw]
        for metric in ("cloning_r2_forward", "cloning_r2_backward"):
            found = [r["value"] for r in rows if r["metric"] == metric]
            if found:
                self._last[metric] = sum(found) / len(found)  # mean over layers, for the progress bar
        return rows

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Models, optimizers, method, data position, noise generator, loss sums, flags and global RNGs."""
        clone_state = None
        if self.clone is not None:
            assert self.clone_optimizer is not None
            clone_state = {
                "model": _copy_state(self.clone.state_dict()),
                "optimizer": self.clone_optimizer.state_dict(),
            }
        return {
            "step": self.step,
            "base": _copy_state(self.base.state_dict()),
            "base_optimizer": self.base_optimizer.state_dict(),
            "clone": clone_state,
            "method": self.method.state_dict(),
            "stream": self.stream.state_dict(),
            "noise_generator": self.noise_generator.get_state(),
            "sums": dict(self._sums),
            "initial_logged": self._initial_logged,
            "last": dict(self._last),
            "rng": self.rng.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (a saved clone is rebuilt with the same architecture)."""
        self.base.load_state_dict(state["base"])
        self.base_optimizer.load_state_dict(state["base_optimizer"])
        if state["clone"] is not None:
            self._make_clone()  # right architecture and partition; weights come from the state
            assert self.clone is not None and self.clone_optimizer is not None
            self.clone.load_state_dict(state["clone"]["model"])
            self.clone_optimizer.load_state_dict(state["clone"]["optimizer"])
            self.method.attach(self.clone, self.clone_optimizer)  # its saved state is loaded just below
        else:
            self.clone = self.clone_optimizer = self.clone_monitor = self.partition = None
        self.method.load_state_dict(state["method"])
        self.stream.load_state_dict(state["stream"])
        self.noise_generator.set_state(state["noise_generator"])
        self.step = int(state["step"])
        self._sums = dict(state["sums"])
        self._initial_logged = bool(state["initial_logged"])
        self._last = dict(state["last"])
        self.rng.state = state["rng"]

    def progress(self) -> dict[str, Any]:
        """Phase, latest losses and cloning R^2."""
        info: dict[str, Any] = {"phase": "paired" if self.clone is not None else "base"}
        for key in ("base_loss", "clone_loss", "cloning_r2_forward"):
            if key in self._last:
                info[key] = round(self._last[key], 4)
        return info


def _copy_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached copies of a module state dict (so later training does not change a saved state)."""
    return {key: value.detach().clone() for key, value in state.items()}

