"""Continual adaptation of a deployed keyword spotter: benchmark ``kws_continual``.

A HEiMDaL CNN (trained by ``kws_train`` and exported by the pipeline, or freshly initialised) is adapted to a
sequence of tasks, one after the other, with the same optimiser (kept across tasks, as a deployed device would):

- ``task_kind="voices"``: the train clips of one corpus are grouped by voice; the voices are shuffled (seeded) and
  split into ``n_tasks`` disjoint groups; task k trains on the clips of group k (new speakers / accents);
- ``task_kind="keywords"``: task k is a new wake word, the corpus ``keyword_corpora[k]`` (built with that keyword;
  its train split trains, its val split tests). The detection head keeps its meaning ("the current wake word").

Each task's clips are split 80/20 (seeded) into adaptation and held-out test clips (keywords: train/val).
Rows, all independent of how the run is chunked: ``online_loss`` bins (``log_every`` steps); at each task end
``task_final_loss`` (held-out loss), ``task_test_auc`` (ROC AUC of the clips' max score, threshold-free),
``task_test_accuracy`` (clip accuracy, max sigmoid > 0.5), ``task_test_frr`` and ``task_test_far`` (miss / false-alarm rates on held-out positives / negatives at 0.5); and the lopkit
:class:`~lopkit.diagnostics.monitor.Monitor` rows (the pointwise conv of every BC-ResBlock, the classifier's
pointwise conv and the head: effective/stable ranks, duplicate fraction, weight and gradient norms; probe loss) on a fixed probe of the task's clips at each
task start and end. A lopkit mitigation (``--method l2init``, ``shrink_perturb``, ``cbp``...) plugs in through the
usual hooks; ``on_task_start`` is called at each task boundary. Plasticity loss shows as a falling
``task_test_accuracy`` / rising ``task_final_loss`` on later tasks at equal budget.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from lopkit.benchmarks.base import Benchmark, BenchmarkConfig, PrivateRNG, make_row, register_benchmark
from lopkit.configs import ConfigError, check_device, config_to_dict, require
from lopkit.kws.metrics import clip_auc  # noqa: F401  (re-exported; defined with the other metrics)
from lopkit.schedules import BaseLambdaLR, warmup_cosine_scheduler
from lopkit.seeding import seeded_generator
from lopkit.kws.train import (
    SplitFeatures,
    augment_features,
    build_model,
    load_split_features,
    warmup_steps_of,
)

__all__ = ["KWSContinualBenchmark", "KWSContinualConfig", "TaskData", "clip_auc", "load_exported_model", "voice_groups"]

MODEL = "model"


@dataclasses.dataclass
class KWSContinualConfig(BenchmarkConfig):
    """Settings of a continual wake-word adaptation run."""

    task_kind: Literal["voices", "keywords"] = "voices"
    """voices: disjoint voice groups of corpus_dir; keywords: one corpus per new wake word (keyword_corpora)."""
    corpus_dir: str = ""
    """Corpus of the voice tasks (its train split)."""
    keyword_corpora: tuple[str, ...] = ()
    """Corpus folders, one per keyword task, in task order."""
    n_tasks: int = 4
    """Number of voice groups (voices tasks; keyword tasks use len(keyword_corpora))."""
    init_model: str = ""
    """Exported model file (models/heimdal.pt of the pipeline) to start from; empty: a fresh CNN."""
    tau: float = 1.0
    """Width of a fresh CNN (ignored with init_model)."""
    steps_per_task: int = 100
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    """Warm-up share of each task (the schedule restarts at each task)."""
    delta: int = 15
    margin: int = 5
    offset_weight: float = 1.0
    augment: bool = True
    probe_size: int = 32
    monitor: bool = True
    log_every: int = 20
    held_out_fraction: float = 0.2

    device: str = "cpu"
    """Only ``cpu``: this benchmark has no CUDA path yet (``device=cuda`` is one clear error)."""

    def validate(self) -> None:
        """Reject impossible values with a message that says how to fix them."""
        check_device(self.device, supported=("cpu",))
        if self.task_kind == "voices":
            require(bool(self.corpus_dir), "task_kind=voices needs corpus_dir=PATH (a corpus built by 'lopkit kws build')")
            require(self.n_tasks >= 1, f"n_tasks must be >= 1, got {self.n_tasks}")
        else:
            require(len(self.keyword_corpora) >= 1, "task_kind=keywords needs keyword_corpora=DIR1,DIR2,...")
        require(self.steps_per_task >= 1, f"steps_per_task must be >= 1, got {self.steps_per_task}")
        require(self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}")
        require(math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(self.probe_size >= 2, f"probe_size must be >= 2, got {self.probe_size}")
        require(0 < self.held_out_fraction < 1, f"held_out_fraction must be in (0, 1), got {self.held_out_fraction}")
        require(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")


@dataclasses.dataclass
class TaskData:
    """One adaptation task: features, labels and window targets of its adaptation and held-out clips."""

    name: str
    train: dict[str, Tensor]
    test: dict[str, Tensor]


def voice_groups(voices: list[str], n_groups: int, seed: int) -> list[list[str]]:
    """Distinct voices shuffled with ``seed`` and dealt round-robin into ``n_groups`` disjoint groups."""
    distinct = sorted(set(voices))
    if len(distinct) < n_groups:
        raise ConfigError(f"only {len(distinct)} distinct voices for {n_groups} voice tasks; lower n_tasks")
    order = torch.randperm(len(distinct), generator=seeded_generator(seed, 31)).tolist()
    return [[distinct[i] for i in order[g::n_groups]] for g in range(n_groups)]


def _targets(data: SplitFeatures, index: Tensor, delta: int, margin: int) -> dict[str, Tensor]:
    """Features and alignment-window targets of the clips ``index``."""
    from lopkit.kws.losses import batch_frame_targets

    starts = [float("nan") if math.isnan(s) else round(100 * s) for s in data.start_s[index].tolist()]
    ends = [float("nan") if math.isnan(e) else round(100 * e) for e in data.end_s[index].tolist()]
    labels, valid = batch_frame_targets(data.n_frames, starts, ends, delta, margin)
    return {"feats": data.feats[index], "label": data.label[index], "y": labels, "valid": valid,
            "start": torch.tensor([0.0 if math.isnan(s) else s for s in starts])}


def load_exported_model(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A model exported by the pipeline (``models/<kind>.pt``): (model in eval mode, the export dict)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no exported model at {path}; run the pipeline's train and evaluate stages first")
    export = torch.load(path, map_location="cpu", weights_only=False)  # a CUDA export loads anywhere
    config = export["config"]
    model = build_model(config["model_kind"], config["tau"], config["n_mels"], config["offset_scale"],
                        config["dropout"], export.get("meta", {}).get("n_classes"), config.get("context_pool_frames", 0))
    model.load_state_dict(export["model"])
    return model.eval(), export


@register_benchmark
class KWSContinualBenchmark(Benchmark):
    """Adapt a keyword spotter to new voices or new wake words in sequence; Monitor rows per task."""

    name = "kws_continual"
    Config: ClassVar[type[KWSContinualConfig]] = KWSContinualConfig
    description = "Continual adaptation of a HEiMDaL keyword spotter to new voices / wake words (issue 7)"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"n_tasks": 2, "steps_per_task": 6, "batch_size": 8, "probe_size": 8, "log_every": 3,
                  "augment": False},
        "mini": {"n_tasks": 4, "steps_per_task": 40, "batch_size": 32, "probe_size": 32, "log_every": 10},
        "default": {"n_tasks": 6, "steps_per_task": 100, "batch_size": 32, "probe_size": 64, "log_every": 20},
        "paper": {"n_tasks": 10, "steps_per_task": 500, "batch_size": 64, "probe_size": 64, "log_every": 50},
    }

    def __init__(self, config: KWSContinualConfig, seed: int, method=None):
        super().__init__(config, seed, method)
        self.config: KWSContinualConfig = config
        self.tasks = self._build_tasks()
        self._rng = PrivateRNG(self.seed)
        with self._rng.active():
            if config.init_model:
                model, export = load_exported_model(config.init_model)
                if export["config"]["model_kind"] == "dnn_hmm":
                    raise ConfigError("init_model must be a CNN (heimdal*) export, not the dnn_hmm baseline")
                self.offset_scale = float(export["config"]["offset_scale"])
            else:
                from lopkit.kws.features import FeatureStats

                model = build_model("heimdal", config.tau, 40, 0.01, 0.1)
                model.set_feature_stats(FeatureStats.fit(self.tasks[0].train["feats"].float()))
                self.offset_scale = 0.01
            self.model = self.method.prepare_model(model)
            self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=config.lr,
                                               weight_decay=config.weight_decay)
            self.method.attach(self.model, self.optimizer)
        self.monitor = None
        if config.monitor:
            from lopkit.diagnostics.monitor import Monitor, MonitorConfig

            layers = [name for name, _ in self.model.named_modules()
                      if name.endswith(".pointwise") or name in ("classifier_pointwise", "head")] or None
            self.monitor = Monitor(self.model, layers, max_rows=0, config=MonitorConfig(
                seed=self.seed, rank_max_samples=256, warn_constant_units=False))
        self._bin = {"loss": 0.0, "steps": 0.0}
        self._task_started = False
        self._last: dict[str, float] = {}
        self._scheduler: BaseLambdaLR | None = None

    # ------------------------------------------------------------------ tasks
    def _build_tasks(self) -> list[TaskData]:
        config = self.config
        tasks: list[TaskData] = []
        if config.task_kind == "voices":
            data = load_split_features(config.corpus_dir, "train")
            groups = voice_groups(data.voice, config.n_tasks, self.seed)
            for k, group in enumerate(groups):
                members = torch.tensor([i for i, v in enumerate(data.voice) if v in set(group)], dtype=torch.long)
                order = members[torch.randperm(members.numel(), generator=seeded_generator(self.seed, 32, k))]
                n_test = max(1, int(round(config.held_out_fraction * order.numel())))
                tasks.append(TaskData(f"voices:{'+'.join(group)}",
                                      _targets(data, order[n_test:], config.delta, config.margin),
                                      _targets(data, order[:n_test], config.delta, config.margin)))
        else:
            for corpus in config.keyword_corpora:
                from lopkit.kws.train import keyword_of

                train = load_split_features(corpus, "train")
                test = load_split_features(corpus, "val")
                tasks.append(TaskData(f"keyword:{keyword_of(corpus)}",
                                      _targets(train, torch.arange(len(train)), config.delta, config.margin),
                                      _targets(test, torch.arange(len(test)), config.delta, config.margin)))
        for task in tasks:
            if task.train["label"].numel() < config.batch_size:
                raise ConfigError(f"task {task.name} has {task.train['label'].numel()} clips, fewer than "
                                  f"batch_size={config.batch_size}; lower batch_size or use fewer tasks")
        return tasks

    # ------------------------------------------------------------------ Benchmark API
    @property
    def total_steps(self) -> int:
        """steps_per_task x number of tasks."""
        return self.config.steps_per_task * len(self.tasks)

    @property
    def task(self) -> int:
        """Index of the current task."""
        return min(self.step // self.config.steps_per_task, len(self.tasks) - 1)

    def _loss_fn(self, output: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
        from lopkit.kws.losses import heimdal_loss

        return heimdal_loss(output["detect"], output.get("offset"), targets["y"], targets["valid"], targets["start"],
                            self.config.offset_weight, self.offset_scale).total

    def _probe(self, task: TaskData) -> tuple[Tensor, dict[str, Tensor]]:
        n = min(self.config.probe_size, task.test["label"].numel())
        targets = {k: v[:n] for k, v in task.test.items() if k != "feats"}
        return task.test["feats"][:n].float(), targets

    def _measure(self, task_index: int) -> list[dict[str, Any]]:
        if self.monitor is None:
            return []
        inputs, targets = self._probe(self.tasks[task_index])
        rows = self.monitor.measure(inputs, targets, self._loss_fn, step=self.step)
        return [make_row(r["step"], task_index, r["layer"], r["metric"], r["value"]) for r in rows]

    def run(self, n_steps: int) -> list[dict[str, Any]]:
        """Adapt for at most ``n_steps`` steps; returns loss bins, task-end evaluations and Monitor rows."""
        target = min(self.step + int(n_steps), self.total_steps)
        rows: list[dict[str, Any]] = []
        with self._rng.active():
            while self.step < target:
                task_index = self.task
                if not self._task_started:
                    rows += self._measure(task_index)
                    self.method.on_task_start(self.model, self.optimizer, task_index)
                    self._task_started = True
                rows += self._train_step(task_index)
                if self.step % self.config.steps_per_task == 0:
                    rows += self._end_task(task_index)
        return rows

    def _train_step(self, task_index: int) -> list[dict[str, Any]]:
        config = self.config
        task = self.tasks[task_index]
        step_in_task = self.step % config.steps_per_task
        n = task.train["label"].numel()
        per_epoch = n // config.batch_size
        epoch, position = divmod(step_in_task, per_epoch)
        order = torch.randperm(n, generator=seeded_generator(self.seed, 33, task_index, epoch))
        index = order[position * config.batch_size:(position + 1) * config.batch_size]
        batch = {k: v[index] for k, v in task.train.items()}
        feats = batch["feats"].float()
        if config.augment:
            feats = augment_features(feats, seeded_generator(self.seed, 34, self.step))
        if self._scheduler is None:  # sets the rate of this step; stepped after each optimiser step
            self._scheduler = warmup_cosine_scheduler(
                self.optimizer, config.lr, config.steps_per_task,
                warmup_steps_of(config.steps_per_task, config.warmup_fraction),
                period=config.steps_per_task, start_step=self.step)
        self.model.train()
        loss = self._loss_fn(self.model(feats), batch)
        extra = self.method.loss_term(self.model)
        total = loss if extra is None else loss + extra
        if not bool(torch.isfinite(total)):
            raise FloatingPointError(f"kws_continual: non-finite loss at step {self.step} (task {task_index}); lower lr")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.method.before_step(self.model, self.optimizer, self.step)
        self.optimizer.step()
        self.method.after_step(self.model, self.optimizer, self.step)
        self._scheduler.step()
        self.step += 1
        self._bin["loss"] += float(loss.detach())
        self._bin["steps"] += 1
        if self._bin["steps"] >= config.log_every or self.step % config.steps_per_task == 0:
            value = self._bin["loss"] / self._bin["steps"]
            self._bin = {"loss": 0.0, "steps": 0.0}
            self._last["loss"] = value
            return [make_row(self.step, task_index, MODEL, "online_loss", value)]
        return []

    @torch.no_grad()
    def _end_task(self, task_index: int) -> list[dict[str, Any]]:
        task = self.tasks[task_index]
        self.model.eval()
        test = task.test
        output = self.model(test["feats"].float())
        loss = float(self._loss_fn(output, test))
        clip_score = torch.sigmoid(output["detect"]).max(dim=1).values
        fired = clip_score > 0.5
        label = test["label"].bool()
        auc = clip_auc(clip_score[label], clip_score[~label])
        accuracy = float((fired == label).float().mean())
        frr = float((~fired[label]).float().mean()) if label.any() else math.nan
        far = float(fired[~label].float().mean()) if (~label).any() else math.nan
        self.model.train()
        self._task_started = False
        self._last.update(task=task_index, accuracy=accuracy)
        rows = [make_row(self.step, task_index, MODEL, name, value) for name, value in
                (("task_final_loss", loss), ("task_test_accuracy", accuracy), ("task_test_auc", auc),
                 ("task_test_frr", frr), ("task_test_far", far))]
        return rows + self._measure(task_index)

    def progress(self) -> dict[str, Any]:
        """Current task and the latest loss / accuracy."""
        return dict(self._last)

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, method, step, loss bin, task flag and private RNG."""
        return copy.deepcopy({
            "benchmark": self.name, "config": config_to_dict(self.config), "seed": self.seed, "step": self.step,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(), "bin": self._bin, "task_started": self._task_started,
            "last": self._last, "rng": self._rng.state,
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state of the same config and seed."""
        if state.get("config") != config_to_dict(self.config) or state.get("seed") != self.seed:
            raise ValueError("state_dict belongs to another kws_continual run; resume with the same config and seed")
        state = copy.deepcopy(state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        self.step = int(state["step"])
        self._bin, self._task_started = state["bin"], bool(state["task_started"])
        self._last, self._rng.state = state["last"], state["rng"]
        self._scheduler = None
