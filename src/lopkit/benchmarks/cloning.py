"""Experiment E2, cloning: train a base MLP, clone it x2 (function-preserving), then train base and clone side by side.

``model=resnet`` / ``model=vit`` run the same protocol on the small ResNet / ViT of
:mod:`lopkit.benchmarks.architectures` (cloned by :func:`lopkit.theory.cloning.clone`; presets ``resnet``, ``vit``);
their R^2 rows cover every module of the clone's Partition (channels, token features, attention heads).

Protocol (spec ``lop_paper.md`` section 4.3, scaled from CIFAR-10 to Fashion-MNIST, all 10 classes):

1. Train the base MLP (default 3 x 64 ReLU with BatchNorm before the activation, the paper's MLP shape scaled
   down) for ``base_steps`` minibatch steps on a seeded training subset of ``train_size`` images.
2. Clone it with :func:`lopkit.theory.cloning.clone` (every hidden unit copied ``factor`` times, incoming weights
   divided by the input expansion, BatchNorm statistics duplicated): the clone computes exactly the base
   function and sits on the cloned-unit LoP manifold (Theorem 2.1).
3. Train base and clone for ``paired_steps`` more steps on the *same* minibatches. The clone gets a fresh
   optimizer. ``variant`` picks the clone's training rule:

   - ``sgd``: SGD (lr 0.01, momentum ``momentum``: the field defaults to 0 as the paper's text says, the ``default``
     and ``paper`` presets use the authors' code's 0.9; spec section 8.2, ``fidelity_notes.md`` E2);
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
- ``cloning_r2_<definition>_forward`` / ``cloning_r2_<definition>_backward``: per hidden module of the clone
  (every module the Partition names: linear ``fc*``, norm ``norm*``, activation ``act*`` and dropout ``drop*``
  outputs, as the authors measure; :func:`module_kind` maps a name to its kind), the cloning R^2 of the module
  output and of dL/d(output) on the probe (eval mode, so a dropout output equals its activation's), blocks given
  by the clone's Partition. ``<definition>`` is ``std_ratio_barriers`` (1 - mean(std within clone blocks / std
  across the layer): the authors' code, what their figures plot) and/or ``variance_ratio`` (the paper's text),
  chosen by ``r2_definition``. Forward and backward are kept apart: the authors' code's "mean" key sums the
  forward values only but divides by the forward + backward count (exact clones score ~0.5), which lopkit does
  not copy.

Speed: the paired loop keeps the loss sums as tensors and checks them for NaN/inf only at each log (a
divergence raises ``DivergedError`` at the first log after it), uses foreach optimizer updates, and measures
the probe metrics only at logs; ``r2_every`` thins the clone R^2 further.

Several runs (seeds, or an lr grid) of the MLP with ``sgd``/``adam`` train as one learner with
:class:`CloningSeedGroup` (``lopkit run cloning --seeds N`` picks it; :func:`cloning_refusal` says when it cannot).

A mitigation passed as ``method`` acts on the clone only (its hooks are called from the cloning step on:
``attach`` and ``on_task_start(task=0)`` when the clone is made, then ``loss_term``/``before_step``/``after_step``
at every clone step, with the clone step index); the base is the untouched reference. Noise of ``noisy_sgd`` is
applied after ``before_step`` and before ``optimizer.step()``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from lopkit.benchmarks.base import Benchmark, BenchmarkConfig, make_row, register_benchmark
from lopkit.benchmarks.base import MemberGroup, PrivateRNG, check_finite_loss, differing_fields_refusal, stacked_sgd_
from lopkit.benchmarks.architectures import build_resnet, build_vit
from lopkit.benchmarks.models import build_mlp
from lopkit.configs import ConfigError, check_device, require
from lopkit.data.digits import load_digits_dataset
from lopkit.data.fashion_mnist import load_fashion_mnist
from lopkit.data.tasks import TaskStream
from lopkit.diagnostics.cloning import R2_DEFINITIONS, cloning_r2
from lopkit.diagnostics.monitor import Monitor, MonitorConfig
from lopkit.mitigations.base import Mitigation, changes_architecture
from lopkit.mitigations.perturbation import add_relative_gradient_noise_, noise_scale
from lopkit.seeding import derive_seed, rng_sandbox, seeded_generator
from lopkit.theory.cloning import clone
from lopkit.theory.invariance import probe_clone_tensors
from lopkit.theory.partition import Partition

__all__ = [
    "VARIANTS",
    "CloningBenchmark",
    "CloningConfig",
    "R2_DEFINITIONS",
    "activation_layer_names",
    "add_relative_gradient_noise_",
    "CloningSeedGroup",
    "VARYING_FIELDS",
    "cloning_refusal",
    "module_kind",
    "noise_scale",
    "r2_metric_name",
]

VARIANTS = ("sgd", "adam", "noisy_sgd", "dropout")
MODEL_LAYER = "model"
_SUBSET_STREAM, _PROBE_STREAM, _INIT_STREAM, _NOISE_STREAM = 21, 22, 23, 24
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_KIND_PREFIXES = (("fc", "linear"), ("norm", "norm"), ("act", "activation"), ("drop", "dropout"))


@dataclasses.dataclass
class CloningConfig(BenchmarkConfig):
    """Data subset, base MLP, schedule, clone variant and its hyper-parameters."""

    run_id_neutral: ClassVar[tuple[str, ...]] = (
        "device", "channels", "model", "vit_depth", "vit_dim", "vit_heads", "vit_patch",
    )
    """Fields added after runs had been stored (left out of the run id at their default; see BenchmarkConfig)."""

    variant: Literal["sgd", "adam", "noisy_sgd", "dropout"] = "sgd"
    """How the clone is trained (see the module docstring)."""
    dataset: Literal["fashion_mnist", "digits"] = "fashion_mnist"
    """Fashion-MNIST (28x28, 10 classes), or scikit-learn's 8x8 digits (tiny, for quick checks)."""
    train_size: int = 10_000
    """Training images used (a seeded subset of the training split; capped at the split size)."""
    data_seed: int = 0
    """Seed of the training subset and of the probe (shared by every run seed)."""
    model: Literal["mlp", "resnet", "vit"] = "mlp"
    """Base model: the MLP, or the small ResNet / ViT of ``lopkit.benchmarks.architectures`` (images, not flat)."""
    hidden: tuple[int, ...] = (64, 64, 64)
    """Hidden widths of the base MLP (the clone's are ``factor`` times larger)."""
    channels: tuple[int, ...] = (8, 16)
    """ResNet: stage channels (one basic block per stage, stride 2 from the second stage on)."""
    vit_dim: int = 16
    """ViT: residual-stream width (the clone's is ``factor`` times larger; heads are cloned as whole heads)."""
    vit_depth: int = 2
    """ViT: transformer blocks."""
    vit_heads: int = 4
    """ViT: attention heads per block (head_dim = vit_dim // vit_heads)."""
    vit_patch: int = 7
    """ViT: patch size (it must divide the image side: 28 for Fashion-MNIST, 8 for digits)."""
    norm: Literal["batch", "layer", "none"] = "batch"
    """Normalisation before each activation (the paper uses BatchNorm for the MLP and ResNet, LayerNorm for the
    ViT; the ViT takes "layer" or "none" only)."""
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
    """SGD momentum (base and clone; not used by adam). Paper text: 0; the authors' code: 0.9 (presets)."""
    noise_sigma0: float = 0.01
    """noisy_sgd: initial noise scale relative to each gradient's norm."""
    noise_decay: float = 0.999
    """noisy_sgd: sigma_t = sigma0 * decay**t (0: first step only; 1: constant)."""
    dropout_p: float = 0.1
    """dropout: drop probability after each hidden activation."""
    log_every: int = 500
    """Steps between two logs."""
    r2_definition: Literal["std_ratio_barriers", "variance_ratio", "both"] = "both"
    """Cloning R^2 definition(s) logged: the authors' code's std ratio, the paper text's variance ratio, or both."""
    r2_every: int = 0
    """Steps between two clone R^2 measurements (0: at every log); it must be a multiple of log_every."""
    probe_size: int = 500
    """Fixed probe of training images for ranks, R^2 and probe losses."""
    dtype: Literal["float32", "float64"] = "float32"
    """Floating point type of models and data."""
    data_dir: str | None = None
    """Fashion-MNIST folder (None: $LOPKIT_FASHION_MNIST_DIR or the Debian path)."""
    device: str = "cpu"
    """Where models and data live: ``cpu``, ``cuda`` or ``cuda:N`` (subsets and minibatch order are drawn on the CPU)."""

    def validate(self) -> None:
        """Reject impossible values with a message saying what to change."""
        check_device(self.device)
        require(self.train_size >= 2, f"train_size must be >= 2, got {self.train_size}")
        require(self.data_seed >= 0, f"data_seed must be >= 0, got {self.data_seed}")
        require(
            len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden),
            f"hidden must be positive widths such as 64,64,64; got {self.hidden}",
        )
        require(self.model in ("mlp", "resnet", "vit"), f"model must be mlp, resnet or vit, got {self.model!r}")
        require(
            len(self.channels) >= 1 and all(c >= 1 for c in self.channels) and len(self.channels) <= 4,
            f"channels must be 1 to 4 positive stage widths such as 8,16; got {self.channels}",
        )
        if self.model == "vit":
            require(self.norm in ("layer", "none"), f"model=vit takes norm=layer or norm=none, got {self.norm!r}")
            for name in ("vit_dim", "vit_depth", "vit_heads", "vit_patch"):
                require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
            require(self.vit_dim % self.vit_heads == 0,
                    f"vit_dim ({self.vit_dim}) must be divisible by vit_heads ({self.vit_heads})")
            side = 8 if self.dataset == "digits" else 28
            require(side % self.vit_patch == 0, f"vit_patch must divide the image side {side}, got {self.vit_patch}")
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
        require(
            self.r2_definition in (*R2_DEFINITIONS, "both"),
            f"r2_definition must be one of {', '.join((*R2_DEFINITIONS, 'both'))}, got {self.r2_definition!r}",
        )
        require(
            self.r2_every >= 0 and self.r2_every % self.log_every == 0,
            f"r2_every must be 0 or a multiple of log_every ({self.log_every}), got {self.r2_every}",
        )
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

    @property
    def r2_definitions(self) -> tuple[str, ...]:
        """The cloning R^2 definitions to log, in a fixed order."""
        return R2_DEFINITIONS if self.r2_definition == "both" else (self.r2_definition,)


def r2_metric_name(definition: str, direction: str) -> str:
    """Row metric name of a cloning R^2, e.g. ``cloning_r2_std_ratio_barriers_forward``."""
    return f"cloning_r2_{definition}_{direction}"


def module_kind(name: str) -> str:
    """Kind of a hidden module from its name: ``linear`` (fc*), ``norm``, ``activation`` (act*) or ``dropout``."""
    for prefix, kind in _KIND_PREFIXES:
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            return kind
    return "other"


def activation_layer_names(model: nn.Module) -> list[str]:
    """Names of the hidden ReLU/GELU modules (``act1``, ``block1.mlp.act``, ...) in forward order."""
    return [name for name, module in model.named_modules() if isinstance(module, (nn.ReLU, nn.GELU))]


def _load_data(config: CloningConfig) -> tuple[Tensor, Tensor]:
    """Standardised training images (flat for the MLP, ``(N, 1, H, W)`` otherwise) and labels of the dataset."""
    flatten = config.model == "mlp"
    if config.dataset == "digits":
        x, y = load_digits_dataset(flatten=flatten)
        x = (x - x.mean()) / x.std()
        return x, y
    return load_fashion_mnist("train", flatten=flatten, standardize=True, data_dir=config.data_dir)


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
        # Tens of minutes: 10k images, 3 x 64, the authors' momentum 0.9; 20 epochs of base (1560 steps), then
        # ~1280 epochs paired (100k steps, about half the paper's ~195k paired steps); see docs/results_e2.md for
        # the measured step rate.
        "default": {
            "train_size": 10_000, "hidden": (64, 64, 64), "batch_size": 128, "base_steps": 1560,
            "paired_steps": 100_000, "log_every": 1000, "probe_size": 500, "momentum": 0.9,
        },
        # T1/T2 on the small ResNet (BatchNorm, stages of 8/16 channels, clone 16/32) and ViT (LayerNorm, dim 16,
        # 4 heads, 2 blocks; the clone has dim 32 and 8 heads of the same width), Fashion-MNIST subsets, sized
        # for 2 CPU cores (ResNet: ~10-20 minutes; ViT: a few minutes); the variant is chosen with --set variant=...
        "resnet": {
            "model": "resnet", "channels": (8, 16), "norm": "batch", "train_size": 5000, "batch_size": 64,
            "base_steps": 300, "paired_steps": 2000, "log_every": 200, "probe_size": 256, "momentum": 0.9,
        },
        "vit": {
            "model": "vit", "vit_dim": 16, "vit_depth": 2, "vit_heads": 4, "norm": "layer", "train_size": 10_000,
            "batch_size": 128, "base_steps": 1000, "paired_steps": 10_000, "log_every": 500, "probe_size": 256,
            "momentum": 0.9,
        },
        "resnet_smoke": {
            "model": "resnet", "channels": (4, 8), "norm": "batch", "train_size": 512, "batch_size": 32,
            "base_steps": 20, "paired_steps": 30, "log_every": 10, "probe_size": 64,
        },
        "vit_smoke": {
            "model": "vit", "vit_dim": 8, "vit_depth": 1, "vit_heads": 2, "norm": "layer", "train_size": 512,
            "batch_size": 32, "base_steps": 20, "paired_steps": 30, "log_every": 10, "probe_size": 64,
        },
        # The paper's protocol on all 60k images: its 5 x 128 MLP with BN, the authors' momentum 0.9, 20 epochs
        # base, 500 epochs paired, logs every 5 epochs (469 steps per epoch at batch 128). Fashion-MNIST stands
        # in for CIFAR-10.
        "paper": {
            "train_size": 60_000, "hidden": (128,) * 5, "batch_size": 128, "base_steps": 20 * 469,
            "paired_steps": 500 * 469, "log_every": 5 * 469, "probe_size": 500, "momentum": 0.9,
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
        self.device = check_device(config.device)
        x, y = _load_data(config)
        subset = torch.randperm(x.shape[0], generator=seeded_generator(config.data_seed, _SUBSET_STREAM))
        subset = subset[: min(config.train_size, x.shape[0])].sort().values
        self.train_x, self.train_y = x[subset].to(self.device, self.dtype), y[subset].to(self.device)
        probe = torch.randperm(self.train_x.shape[0], generator=seeded_generator(config.data_seed, _PROBE_STREAM))
        probe = probe[: config.probe_size].sort().values.to(self.device)
        self.probe_x, self.probe_y = self.train_x[probe], self.train_y[probe]
        self.num_classes = int(y.max()) + 1
        self.base = self._build_base()
        self.base_optimizer = self._make_optimizer(self.base)
        self.base_monitor = self._make_monitor(self.base)
        self.stream = TaskStream(self.train_x.shape[0], config.batch_size, seed=self.seed)
        self.noise_generator = seeded_generator(self.seed, _NOISE_STREAM)
        self.clone: nn.Module | None = None
        self.clone_optimizer: torch.optim.Optimizer | None = None
        self.clone_monitor: Monitor | None = None
        self.partition: Partition | None = None
        self._sums = self._zero_sums()
        self._initial_logged = False
        self._last: dict[str, float] = {}

    # ------------------------------------------------------------------ construction helpers
    def _build_base(self) -> nn.Module:
        """The seeded base model (PyTorch default init), with dropout modules for the dropout variant."""
        cfg = self.config
        dropout = cfg.dropout_p if cfg.variant == "dropout" else 0.0
        with rng_sandbox():
            torch.manual_seed(derive_seed(self.seed, _INIT_STREAM))
            if cfg.model == "resnet":  # dropout before the head
                model = build_resnet(self.train_x.shape[1], cfg.channels, 1, self.num_classes, cfg.norm, dropout)
                return model.to(self.dtype)
            if cfg.model == "vit":  # dropout on the attention weights and the MLP hidden features
                model = build_vit(self.train_x.shape[1], tuple(self.train_x.shape[2:]), cfg.vit_patch, cfg.vit_dim,
                                  cfg.vit_depth, cfg.vit_heads, None, 2, self.num_classes, cfg.norm, dropout)
                return model.to(self.dtype)
            model = build_mlp(
                self.train_x.shape[1],
                cfg.hidden,
                self.num_classes,
                activation="relu",
                norm=None if cfg.norm == "none" else cfg.norm,
                affine=cfg.affine,
                dropout=cfg.dropout_p if cfg.variant == "dropout" else 0.0,
            )
        return model.to(self.device, self.dtype)

    def _zero_sums(self) -> dict[str, Any]:
        """Running training-loss sums (tensors, so the loop never waits on a Python float) and step counts."""
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        return {"base": zero.clone(), "base_steps": 0, "clone": zero.clone(), "clone_steps": 0}

    def _make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Adam for the adam variant, SGD (with ``momentum``) otherwise; foreach updates (same maths, fewer calls)."""
        if self.config.variant == "adam":
            return torch.optim.Adam(model.parameters(), lr=self.config.step_size, foreach=True)
        return torch.optim.SGD(
            model.parameters(), lr=self.config.step_size, momentum=self.config.momentum, foreach=True
        )

    def _make_monitor(self, model: nn.Module) -> Monitor:
        """Effective rank on the hidden activations, plus the probe loss."""
        layers = activation_layer_names(model)
        return Monitor(model, layers=layers, metrics=["effective_rank", "loss"], config=MonitorConfig(seed=self.seed),
                       max_rows=0)

    def _make_clone(self) -> None:
        """Clone the base now, give the clone a fresh optimizer and monitor, and attach the method to it."""
        self.clone, self.partition = clone(self.base, self.config.factor)
        self.clone_optimizer = self._make_optimizer(self.clone)
        self.clone_monitor = self._make_monitor(self.clone)

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
        indices = self.stream.next_indices().to(self.device)
        inputs, targets = self.train_x.index_select(0, indices), self.train_y.index_select(0, indices)
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
        """Forward, backward, (method hooks and noise for the clone), update; returns the minibatch loss tensor.

        Finiteness is checked at the next log (on the loss sums), not here, to keep the loop free of syncs.
        """
        if not model.training:
            model.train()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        extra = method.loss_term(model) if method is not None else None
        total = loss if extra is None else loss + extra
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
        return loss.detach()

    # ------------------------------------------------------------------ logging
    def _log(self) -> list[dict[str, Any]]:
        """Training-loss means since the last log, then probe metrics of the base and (if any) the clone."""
        rows: list[dict[str, Any]] = []
        for which in ("base", "clone"):
            count = self._sums[f"{which}_steps"]
            if count:
                mean = float(self._sums[which]) / count
                check_finite_loss("cloning", mean, self.step, self.config.lr,
                                  f"{which} mean training loss over the {count} steps up to here; or lower the noise scale")
                rows.append(make_row(self.step, 0, MODEL_LAYER, f"{which}_loss", mean))
                self._last[f"{which}_loss"] = mean
                self._sums[which], self._sums[f"{which}_steps"] = self._sums[which].new_zeros(()), 0
        if self.step == self.config.base_steps and self.clone is None:
            self._start_clone()  # made here so that its starting point is logged at the cloning step
        rows += self._probe_rows("base", self.base_monitor)
        if self.clone_monitor is not None:
            rows += self._probe_rows("clone", self.clone_monitor)
            if self._r2_due():
                rows += self._r2_rows()
        return rows

    def _r2_due(self) -> bool:
        """R^2 at every log (``r2_every`` 0), else on multiples of ``r2_every``, the cloning and the last step."""
        every = self.config.r2_every
        return every == 0 or self.step % every == 0 or self.step in (self.config.base_steps, self.total_steps)

    def _r2_rows(self) -> list[dict[str, Any]]:
        """Cloning R^2 of every partitioned module of the clone, forward and backward, per configured definition."""
        assert self.clone is not None and self.partition is not None
        _, tensors = probe_clone_tensors(
            self.clone, self.partition, self.probe_x, self.probe_y, nn.functional.cross_entropy
        )
        rows = []
        for definition in self.config.r2_definitions:
            for direction, index in (("forward", 0), ("backward", 1)):
                metric = r2_metric_name(definition, direction)
                values = []
                for name, pair in tensors.items():
                    value = cloning_r2(pair[index], self.partition[name], definition=definition)
                    rows.append(make_row(self.step, 0, name, metric, value))
                    values.append(value)
                self._last[metric] = sum(values) / len(values)  # mean over modules, for the progress bar
        return rows

    def _probe_rows(self, which: str, monitor: Monitor) -> list[dict[str, Any]]:
        """Monitor rows on the probe, renamed ``{which}_effective_rank`` / ``{which}_probe_loss``."""
        raw = monitor.measure(self.probe_x, self.probe_y, nn.functional.cross_entropy, step=self.step)
        renamed = {"effective_rank": f"{which}_effective_rank", "loss": f"{which}_probe_loss"}
        return [make_row(self.step, 0, r["layer"], renamed.get(r["metric"], r["metric"]), r["value"]) for r in raw]

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
            "sums": {key: value.clone() if isinstance(value, Tensor) else value for key, value in self._sums.items()},
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
        self._sums = self._zero_sums()
        for key, value in state["sums"].items():  # float sums of older checkpoints load too
            self._sums[key] = (torch.as_tensor(value, dtype=torch.float64).to(self.device).clone()
                               if key in ("base", "clone") else value)
        self._initial_logged = bool(state["initial_logged"])
        self._last = dict(state["last"])
        self.rng.state = state["rng"]

    def progress(self) -> dict[str, Any]:
        """Phase, latest losses and cloning R^2."""
        info: dict[str, Any] = {"phase": "paired" if self.clone is not None else "base"}
        for key in ("base_loss", "clone_loss", *(r2_metric_name(d, "forward") for d in self.config.r2_definitions)):
            if key in self._last:
                info[key] = round(self._last[key], 4)
        return info


def _copy_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached copies of a module state dict (so later training does not change a saved state)."""
    return {key: value.detach().clone() for key, value in state.items()}



# --------------------------------------------------------------------------- several runs as one learner

#: Config fields that may differ between the members of one :class:`CloningSeedGroup` (they change no shape).
VARYING_FIELDS: tuple[str, ...] = ("lr",)


class _StackedModels:
    """The same MLP of S members (base or clone) as stacked parameters and BatchNorm statistics, with its optimizer.

    Each member's module parameters and buffers become views of its slice, so the member's Monitor, R^2 probes,
    evaluations and ``state_dict`` see the current values. The update is PyTorch's SGD (momentum) or Adam formula
    on the stacked tensors, one lr per member; :meth:`member_state` / :meth:`load_members` convert the state to and
    from each member's own torch optimizer layout.
    """

    def __init__(self, models: list[nn.Module], variant: str, lrs: list[float], momentum: float):
        self.template = models[0]
        self.names = [name for name, _ in self.template.named_parameters()]
        self.params = {
            n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]).requires_grad_(True)
            for n in self.names
        }
        self.buffers = {
            n: torch.stack([dict(m.named_buffers())[n].detach() for m in models])
            for n, b in self.template.named_buffers() if not n.endswith("num_batches_tracked")
        }
        for index, model in enumerate(models):
            for name, parameter in model.named_parameters():
                parameter.data = self.params[name].detach()[index]
            for name, module in model.named_modules():
                for key in list(module._buffers):
                    full = f"{name}.{key}" if name else key
                    if full in self.buffers:
                        module._buffers[key] = self.buffers[full][index]
        self.models, self.variant, self.momentum = models, variant, momentum
        groups: dict[float, list[int]] = {}
        for index, lr in enumerate(lrs):
            groups.setdefault(float(lr), []).append(index)
        self.lr_groups = [(lr, None if len(groups) == 1 else members) for lr, members in groups.items()]
        self.state: list[dict[str, Any]] = [{} for _ in self.names]

    def forward(self, x: Tensor) -> Tensor:
        """Train-mode forward of every member on its own batch: ``x`` (S, B, ...) -> logits (S, B, C)."""
        members = x.shape[0]
        x = x.reshape(members, x.shape[1], -1)
        for name, module in self.template.named_children():
            if isinstance(module, nn.Flatten):
                continue
            if isinstance(module, nn.Linear):
                x = torch.baddbmm(self.params[f"{name}.bias"].unsqueeze(1), x,
                                  self.params[f"{name}.weight"].transpose(1, 2))
            elif isinstance(module, nn.BatchNorm1d):  # per-member batch statistics: members side by side as channels
                batch, width = x.shape[1], x.shape[2]
                flat = x.transpose(0, 1).reshape(batch, members * width)
                weight = self.params[f"{name}.weight"].reshape(-1) if module.affine else None
                bias = self.params[f"{name}.bias"].reshape(-1) if module.affine else None
                flat = nn.functional.batch_norm(
                    flat, self.buffers[f"{name}.running_mean"].view(-1), self.buffers[f"{name}.running_var"].view(-1),
                    weight, bias, True, module.momentum, module.eps)
                x = flat.reshape(batch, members, width).transpose(0, 1)
                for model in self.models:
                    model.get_submodule(name).num_batches_tracked.add_(1)
            elif isinstance(module, nn.LayerNorm):
                x = nn.functional.layer_norm(x, module.normalized_shape, eps=module.eps)
                if module.elementwise_affine:
                    x = x * self.params[f"{name}.weight"].unsqueeze(1) + self.params[f"{name}.bias"].unsqueeze(1)
            elif isinstance(module, nn.ReLU):
                x = torch.relu(x)
            else:
                raise ValueError(f"layer {name} ({type(module).__name__}) has no vectorised forward")
        return x

    @torch.no_grad()
    def step(self) -> None:
        """One optimizer update of every member from the stacked ``.grad``."""
        params = [self.params[n] for n in self.names]
        grads = [p.grad for p in params]
        if self.variant == "adam":
            from torch.optim.adam import adam

            if not self.state[0]:
                for param, state in zip(params, self.state):
                    state.update(step=0, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
            step = self.state[0]["step"]
            for lr, members in self.lr_groups:
                pick = (lambda ts: ts) if members is None else (lambda ts: [t[m] for t in ts for m in members])
                chosen = pick([p.detach() for p in params])
                adam(chosen, pick(grads), pick([s["exp_avg"] for s in self.state]),
                     pick([s["exp_avg_sq"] for s in self.state]), [],
                     [torch.tensor(float(step)) for _ in chosen], foreach=True, amsgrad=False, beta1=0.9,
                     beta2=0.999, lr=lr, weight_decay=0.0, eps=1e-8, maximize=False)
            for state in self.state:
                state["step"] = step + 1
            return
        for param, grad, state in zip(params, grads, self.state):
            stacked_sgd_(param, grad, state, self.lr_groups, self.momentum)

    def member_state(self, index: int) -> dict[int, dict[str, Any]]:
        """Member ``index``'s slice in the ``state`` layout of its own torch optimizer's ``state_dict``."""
        out: dict[int, dict[str, Any]] = {}
        for k, state in enumerate(self.state):
            if self.variant == "adam" and state:
                out[k] = {"step": torch.tensor(float(state["step"])), "exp_avg": state["exp_avg"][index].clone(),
                          "exp_avg_sq": state["exp_avg_sq"][index].clone()}
            elif "momentum_buffer" in state:
                out[k] = {"momentum_buffer": state["momentum_buffer"][index].clone()}
        return out

    def load_members(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Take the members' own torch optimizer states (loaded from checkpoints) into the stacked state, then clear them."""
        for k, name in enumerate(self.names):
            states = [dict(opt.state.get(dict(model.named_parameters())[name], {}))
                      for opt, model in zip(optimizers, self.models)]
            if not any(states):
                self.state[k] = {}
                continue
            if not all(states):
                raise ValueError("the members' optimizer states differ in which parameters they hold")
            if self.variant == "adam":
                steps = {int(float(s["step"])) for s in states}
                if len(steps) != 1:
                    raise ValueError(f"the members' Adam steps differ ({sorted(steps)})")
                self.state[k] = {"step": steps.pop(), "exp_avg": torch.stack([s["exp_avg"] for s in states]),
                                 "exp_avg_sq": torch.stack([s["exp_avg_sq"] for s in states])}
            else:
                self.state[k] = {"momentum_buffer": torch.stack([s["momentum_buffer"] for s in states])}
        for opt in optimizers:
            opt.state.clear()


def cloning_refusal(configs: list[CloningConfig], methods: Any = None) -> str | None:
    """Why these cloning runs cannot train as one :class:`CloningSeedGroup`, in one line (None when they can)."""
    if not configs:
        return "no runs to vectorise"
    present = [m for m in (methods or []) if type(m) is not Mitigation]
    if present:
        return f"method {', '.join(m.name for m in present)} is not vectorised for cloning (it acts on each clone)"
    first = configs[0]
    if first.model != "mlp":
        return f"model={first.model} is not vectorised for cloning (only the MLP is)"
    if first.variant in ("dropout", "noisy_sgd"):
        return f"variant={first.variant} is not vectorised (each run draws its own masks or noise per step)"
    if first.variant == "adam" and first.norm == "batch":
        return ("variant=adam with norm=batch is not vectorised: the biases before BatchNorm have zero gradients up "
                "to rounding noise, which Adam turns into full steps, so no batched computation reproduces the runs")
    if first.device != "cpu":
        return f"device={first.device} is not vectorised for cloning yet (the CPU is)"
    return differing_fields_refusal(configs, VARYING_FIELDS)


class CloningSeedGroup(MemberGroup):
    """S cloning runs (MLP, sgd or adam, seeds and/or an lr grid) trained as one learner; rows and states per member.

    One ordinary :class:`CloningBenchmark` per member keeps its data subset, minibatch stream, probes, Monitors,
    loss sums and logs; the training steps of the bases, and after the cloning step of the clones, run on
    stacked parameters (:class:`_StackedModels`): every member's minibatch from its own stream, one batched
    forward (BatchNorm with each member's own batch statistics and running averages), one backward of the summed
    member losses and one update. Logs (and the cloning itself) run per member on its own modules, under its run's
    RNG. Rows and states equal the separate runs' to float32 rounding.
    """

    def __init__(self, benchmark_cls: type[CloningBenchmark], members: list[tuple[CloningConfig, int]],
                 methods: Any = None):
        members = list(members)
        if not members:
            raise ValueError("no runs to vectorise: pass at least one (config, seed)")
        reason = cloning_refusal([config for config, _ in members], methods)
        if reason is not None:
            raise ValueError(f"cannot vectorise these cloning runs: {reason}")
        self.benchmarks = [benchmark_cls(config, seed) for config, seed in members]
        self.config = self.benchmarks[0].config
        self.lrs = [bench.config.step_size for bench in self.benchmarks]
        self._stack()

    def _stack(self) -> None:
        """Stack the bases (and the clones, once made) of the members."""
        cfg, benches = self.config, self.benchmarks
        self.base = _StackedModels([b.base for b in benches], cfg.variant, self.lrs, cfg.momentum)
        self.clone = None
        if benches[0].clone is not None:
            self.clone = _StackedModels([b.clone for b in benches], cfg.variant, self.lrs, cfg.momentum)

    def _logs(self) -> list[list[dict[str, Any]]]:
        """Every member's log at this step (under its own RNG); stacks the clones when the log made them."""
        rows = []
        for bench in self.benchmarks:
            with bench.rng.active():
                rows.append(bench._log())
        if self.clone is None and self.benchmarks[0].clone is not None:
            cfg = self.config
            self.clone = _StackedModels([b.clone for b in self.benchmarks], cfg.variant, self.lrs, cfg.momentum)
        return rows

    def run(self, n_steps: int) -> list[list[dict[str, Any]]]:
        """Advance every member by up to ``n_steps`` steps; per member, the rows its own ``run`` would return."""
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        rows: list[list[dict[str, Any]]] = [[] for _ in self.benchmarks]
        end = min(self.step + n_steps, self.total_steps)
        if not self.benchmarks[0]._initial_logged:
            for out, new in zip(rows, self._logs()):
                out += new
            for bench in self.benchmarks:
                bench._initial_logged = True
        while self.step < end:
            self._train_step()
            for bench in self.benchmarks:
                bench.step += 1
            if self.benchmarks[0]._log_due():
                for out, new in zip(rows, self._logs()):
                    out += new
        return rows

    def _train_step(self) -> None:
        """One minibatch step of every member's base and (once made) clone, on that member's own minibatch."""
        inputs, targets = [], []
        for bench in self.benchmarks:
            indices = bench.stream.next_indices().to(bench.device)
            inputs.append(bench.train_x.index_select(0, indices))  # index_select: advanced indexing's values, faster
            targets.append(bench.train_y.index_select(0, indices))
        x, y = torch.stack(inputs), torch.stack(targets)
        for which, stacked in (("base", self.base), ("clone", self.clone)):
            if stacked is None:
                continue
            logits = stacked.forward(x)
            members, batch = y.shape
            losses = nn.functional.cross_entropy(logits.reshape(members * batch, -1), y.reshape(-1),
                                                 reduction="none").reshape(members, batch).mean(dim=1)
            for param in stacked.params.values():
                param.grad = None
            losses.sum().backward()
            stacked.step()
            for bench, loss in zip(self.benchmarks, losses.detach()):
                bench._sums[which] += loss
                bench._sums[f"{which}_steps"] += 1

    def state_dicts(self) -> list[dict[str, Any]]:
        """Each member's state, what its separate run's ``state_dict`` holds (loadable by either path)."""
        states = []
        for index, bench in enumerate(self.benchmarks):
            state = bench.state_dict()
            state["base_optimizer"]["state"] = self.base.member_state(index)
            if self.clone is not None:
                state["clone"]["optimizer"]["state"] = self.clone.member_state(index)
            states.append(state)
        return states

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """Restore every member from a state of its run (written here or by a separate run), all at one step."""
        self._check_member_states(states)
        for bench, state in zip(self.benchmarks, states):
            bench.load_state_dict(state)
        self._stack()
        self.base.load_members([b.base_optimizer for b in self.benchmarks])
        if self.clone is not None:
            self.clone.load_members([b.clone_optimizer for b in self.benchmarks])
