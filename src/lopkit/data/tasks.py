"""Pure, seeded builders of continual-learning task streams, plus a resumable minibatch stream.

Builders return *descriptions* of tasks (class ids, index permutations, label tensors), never copies of
the data, so a 40-task stream over Fashion-MNIST costs a few kilobytes. Every builder is a pure function
of its arguments: the same seed gives the same tasks, on any machine, independently of global RNG state.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lopkit.data.seeding import seeded_generator

__all__ = [
    "ClassSplitTask",
    "TaskStream",
    "apply_permutation",
    "class_split_tasks",
    "pixel_permutations",
    "random_label_tasks",
]

# Stream ids passed to seeded_generator so that different builders never share random numbers.
_CLASS_SPLIT_STREAM = 1
_PERMUTATION_STREAM = 2
_RANDOM_LABEL_STREAM = 3
_MINIBATCH_STREAM = 4


def _positive_int(value: Any, name: str) -> int:
    """Validate that ``value`` is a positive int and return it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class ClassSplitTask:
    """One class-split task: the global class ids it trains on (labels stay global, as with a shared head)."""

    task_id: int
    classes: tuple[int, ...]
    cycle: int = 0  # which pass over a reshuffled class order produced this task

    def class_mask(self, num_classes: int) -> torch.Tensor:
        """Bool mask (num_classes,) of this task's classes, e.g. to mask logits for masked cross-entropy."""
        num_classes = _positive_int(num_classes, "num_classes")
        if max(self.classes) >= num_classes:
            raise ValueError(f"task uses class {max(self.classes)} but num_classes={num_classes}")
        mask = torch.zeros(num_classes, dtype=torch.bool)
        mask[list(self.classes)] = True
        return mask

    def sample_indices(self, labels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Ascending indices of the samples whose label is one of this task's classes."""
        labels = torch.as_tensor(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D (N,), got shape {tuple(labels.shape)}")
        members = torch.isin(labels, torch.tensor(self.classes, dtype=labels.dtype))
        return torch.nonzero(members, as_tuple=False).flatten()

    def local_labels(self, labels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Map global labels to 0..len(classes)-1 in the order of ``classes`` (for a per-task head)."""
        labels = torch.as_tensor(labels, dtype=torch.int64)
        classes = torch.tensor(self.classes, dtype=torch.int64)
        hits = labels.unsqueeze(-1) == classes
        if not bool(hits.any(-1).all()):
            bad = sorted(set(labels[~hits.any(-1)].tolist()))[:5]
            raise ValueError(f"labels {bad} are not classes of task {self.task_id} {self.classes}")
        return hits.to(torch.int64).argmax(-1)


def _class_ids(labels_or_num_classes: int | torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
    """Class ids: arange(n) for an int, else the sorted unique values of a label array."""
    if isinstance(labels_or_num_classes, (int, np.integer)) and not isinstance(labels_or_num_classes, bool):
        return torch.arange(_positive_int(labels_or_num_classes, "num_classes"))
    labels = torch.as_tensor(labels_or_num_classes)
    if labels.numel() == 0 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError("pass a number of classes or a non-empty integer label array")
    return torch.unique(labels.flatten().to(torch.int64))


def class_split_tasks(
    labels_or_num_classes: int | torch.Tensor | np.ndarray | Sequence[int],
    classes_per_task: int,
    num_tasks: int | None = None,
    seed: int = 0,
) -> list[ClassSplitTask]:
    """Shuffle the classes with ``seed`` and split them into disjoint groups of ``classes_per_task``.

    ``num_tasks=None`` gives one pass (``num_classes // classes_per_task`` tasks). When more tasks are
    asked for than one pass holds, the classes are reshuffled (the generator simply continues) and split
    again, cycle after cycle: tasks are disjoint *within* a cycle, and a class may recur in later cycles.
    If ``classes_per_task`` does not divide the number of classes, the ``num_classes % classes_per_task``
    classes left at the end of a cycle's order are not used in that cycle. The list for ``num_tasks=k`` is
    always a prefix of the list for any larger ``num_tasks``.
    """
    classes = _class_ids(labels_or_num_classes)
    per_task = _positive_int(classes_per_task, "classes_per_task")
    if per_task > classes.numel():
        raise ValueError(f"classes_per_task={per_task} exceeds the {classes.numel()} available classes")
    per_cycle = classes.numel() // per_task
    total = per_cycle if num_tasks is None else _positive_int(num_tasks, "num_tasks")
    generator = seeded_generator(seed, _CLASS_SPLIT_STREAM)
    tasks: list[ClassSplitTask] = []
    cycle = 0
    while len(tasks) < total:
        order = classes[torch.randperm(classes.numel(), generator=generator)]
        for group in range(per_cycle):
            if len(tasks) == total:
                break
            chosen = order[group * per_task : (group + 1) * per_task]
            tasks.append(ClassSplitTask(len(tasks), tuple(int(c) for c in chosen), cycle))
        cycle += 1
    return tasks


def pixel_permutations(
    num_features: int, num_tasks: int, seed: int = 0, *, first_identity: bool = False
) -> torch.Tensor:
    """Feature permutations for permuted-input tasks: a LongTensor (num_tasks, num_features).

    Row ``t`` is task ``t``'s permutation (apply with :func:`apply_permutation`). With ``first_identity``
    task 0 sees the original inputs; the other rows are the same as without the flag.
    """
    num_features = _positive_int(num_features, "num_features")
    num_tasks = _positive_int(num_tasks, "num_tasks")
    generator = seeded_generator(seed, _PERMUTATION_STREAM)
    perms = torch.stack([torch.randperm(num_features, generator=generator) for _ in range(num_tasks)])
    if first_identity:
        perms[0] = torch.arange(num_features)
    return perms


def apply_permutation(x: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Permute each sample's features: x (N, D) or (N, *dims) with prod(dims) == len(permutation)."""
    if x.ndim < 2:
        raise ValueError(f"x must have a leading batch dimension, got shape {tuple(x.shape)}")
    flat = x.reshape(x.shape[0], -1)
    if permutation.ndim != 1 or permutation.numel() != flat.shape[1]:
        raise ValueError(
            f"permutation of length {permutation.numel()} does not match {flat.shape[1]} features per sample"
        )
    return flat[:, permutation].reshape(x.shape)


def random_label_tasks(
    num_samples: int, num_classes: int, num_tasks: int, seed: int = 0, *, balanced: bool = False
) -> torch.Tensor:
    """Random labels for shuffled-label tasks: a LongTensor (num_tasks, num_samples) in 0..num_classes-1.

    Row ``t`` replaces the true labels of the (fixed) sample set in task ``t``. Labels are i.i.d. uniform,
    or with ``balanced`` a random permutation of an (almost) equal number of each class.
    """
    num_samples = _positive_int(num_samples, "num_samples")
    num_classes = _positive_int(num_classes, "num_classes")
    num_tasks = _positive_int(num_tasks, "num_tasks")
    generator = seeded_generator(seed, _RANDOM_LABEL_STREAM)
    if not balanced:
        return torch.randint(num_classes, (num_tasks, num_samples), generator=generator)
    base = torch.arange(num_samples) % num_classes
    return torch.stack([base[torch.randperm(num_samples, generator=generator)] for _ in range(num_tasks)])


class TaskStream:
    """Seeded, resumable stream of minibatch indices over one task's samples, epoch after epoch.

    Each epoch visits the task's samples in a fresh order drawn from a private ``torch.Generator``
    (seeded from ``seed`` and ``task_id``). ``state_dict()`` records the generator state at the start of
    the current epoch plus the position inside it, so ``load_state_dict`` resumes mid-epoch and the
    following batches are exactly those the uninterrupted stream would have produced.
    """

    def __init__(
        self,
        indices: torch.Tensor | np.ndarray | Sequence[int] | int,
        batch_size: int,
        seed: int = 0,
        *,
        task_id: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if isinstance(indices, (int, np.integer)) and not isinstance(indices, bool):
            indices = torch.arange(_positive_int(indices, "number of samples"))
        self.indices = torch.as_tensor(indices, dtype=torch.int64).flatten().clone()
        if self.indices.numel() == 0:
            raise ValueError("a TaskStream needs at least one sample index")
        self.batch_size = _positive_int(batch_size, "batch_size")
        if drop_last and self.batch_size > self.indices.numel():
            raise ValueError(
                f"batch_size={self.batch_size} > {self.indices.numel()} samples with drop_last=True "
                "gives no batch at all; lower batch_size or set drop_last=False"
            )
        self.seed, self.task_id, self.shuffle, self.drop_last = seed, int(task_id), bool(shuffle), bool(drop_last)
        self._generator = seeded_generator(seed, _MINIBATCH_STREAM, self.task_id)
        self.epoch = 0  # index of the epoch being consumed
        self.position = 0  # batches already taken from the current epoch
        self.steps = 0  # batches taken in total
        self._epoch_start_state = self._generator.get_state()
        self._order = self._draw_order()

    @classmethod
    def for_task(
        cls, task: ClassSplitTask, labels: torch.Tensor | np.ndarray, batch_size: int, seed: int = 0, **kwargs: Any
    ) -> TaskStream:
        """Stream over the samples of a class-split task (its ``task_id`` also seeds the order)."""
        return cls(task.sample_indices(labels), batch_size, seed, task_id=task.task_id, **kwargs)

    @property
    def num_samples(self) -> int:
        """Number of samples in the task."""
        return int(self.indices.numel())

    @property
    def batches_per_epoch(self) -> int:
        """Minibatches per epoch (the last one is smaller unless ``drop_last``)."""
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _draw_order(self) -> torch.Tensor:
        """The current epoch's visiting order (positions into ``indices``)."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=self._generator)

    def next_indices(self) -> torch.Tensor:
        """Dataset indices of the next minibatch (starts a new reshuffled epoch when one ends)."""
        if self.position == self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            self._epoch_start_state = self._generator.get_state()
            self._order = self._draw_order()
        start = self.position * self.batch_size
        batch = self.indices[self._order[start : start + self.batch_size]]
        self.position += 1
        self.steps += 1
        return batch

    def next_batch(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Index each of ``tensors`` (e.g. X, y) with the next minibatch's indices."""
        idx = self.next_indices()
        return tuple(t[idx] for t in tensors)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Endless iterator of minibatch index tensors."""
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict[str, Any]:
        """Position and RNG state, enough to resume mid-epoch with identical batches."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "steps": self.steps,
            "epoch_start_generator_state": self._epoch_start_state.clone(),
            "num_samples": self.num_samples,
            "index_checksum": int(self.indices.sum()),
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` (the stream must be over the same samples)."""
        expected = {
            "num_samples": self.num_samples,
            "index_checksum": int(self.indices.sum()),
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }
        mismatched = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if mismatched:
            raise ValueError(f"state_dict is from a different TaskStream (saved, current): {mismatched}")
        if not 0 <= int(state["position"]) <= self.batches_per_epoch:
            raise ValueError(f"position {state['position']} outside 0..{self.batches_per_epoch}")
        self._generator.set_state(state["epoch_start_generator_state"].clone())
        self._epoch_start_state = self._generator.get_state()
        self._order = self._draw_order()
        self.epoch, self.position, self.steps = int(state["epoch"]), int(state["position"]), int(state["steps"])
