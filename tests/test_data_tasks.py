"""Tests for lopkit.data.tasks: class splits, permutations, random labels and the resumable TaskStream."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from lopkit.data.tasks import (
    ClassSplitTask,
    TaskStream,
    apply_permutation,
    class_split_tasks,
    pixel_permutations,
    random_label_tasks,
)


def test_class_split_is_a_disjoint_cover_and_deterministic():
    tasks = class_split_tasks(10, classes_per_task=2, num_tasks=5, seed=7)
    assert [t.task_id for t in tasks] == list(range(5))
    flat = [c for t in tasks for c in t.classes]
    assert sorted(flat) == list(range(10))  # disjoint and covering
    assert all(len(t.classes) == 2 and t.cycle == 0 for t in tasks)
    assert tasks == class_split_tasks(10, 2, 5, seed=7)
    orders = {tuple(c for t in class_split_tasks(10, 2, 5, seed=s) for c in t.classes) for s in range(6)}
    assert len(orders) == 6  # different seeds, different splits
    assert flat != list(range(10))  # actually shuffled


def test_class_split_default_is_one_pass_and_lists_are_prefixes():
    one_pass = class_split_tasks(200, 5, seed=3)
    assert len(one_pass) == 40
    assert class_split_tasks(200, 5, 7, seed=3) == one_pass[:7]


def test_class_split_cycles_through_reshuffled_orders():
    tasks = class_split_tasks(10, 3, num_tasks=8, seed=0)  # 3 tasks per cycle, 1 class left over each cycle
    assert [t.cycle for t in tasks] == [0, 0, 0, 1, 1, 1, 2, 2]
    for cycle in range(3):
        members = [c for t in tasks if t.cycle == cycle for c in t.classes]
        assert len(members) == len(set(members))  # disjoint within a cycle
    assert [t.classes for t in tasks[:3]] != [t.classes for t in tasks[3:6]]


def test_class_split_from_labels_uses_present_classes():
    labels = torch.tensor([12, 3, 7, 7, 9, 3, 12, 9])
    tasks = class_split_tasks(labels, 2, seed=1)
    assert sorted(c for t in tasks for c in t.classes) == [3, 7, 9, 12]
    with pytest.raises(ValueError, match="exceeds"):
        class_split_tasks(labels, 5)
    with pytest.raises(ValueError):
        class_split_tasks(10, 0)
    with pytest.raises(ValueError):
        class_split_tasks(torch.tensor([0.5, 1.5]), 1)


def test_class_split_task_indexing_matches_brute_force():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=500)
    task = ClassSplitTask(task_id=2, classes=(7, 1, 4))
    expected = [i for i, lab in enumerate(labels) if lab in (7, 1, 4)]
    assert task.sample_indices(labels).tolist() == expected
    assert task.class_mask(10).tolist() == [c in (7, 1, 4) for c in range(10)]
    local = task.local_labels(torch.as_tensor(labels[expected]))
    assert local.tolist() == [(7, 1, 4).index(lab) for lab in labels[expected]]
    with pytest.raises(ValueError, match="not classes"):
        task.local_labels(torch.tensor([0]))
    with pytest.raises(ValueError):
        task.class_mask(5)


def test_pixel_permutations_are_seeded_permutations():
    perms = pixel_permutations(784, 6, seed=5)
    assert perms.shape == (6, 784) and perms.dtype == torch.int64
    for row in perms:
        assert torch.equal(torch.sort(row).values, torch.arange(784))
    assert len({tuple(r.tolist()) for r in perms}) == 6
    assert torch.equal(perms, pixel_permutations(784, 6, seed=5))
    assert not torch.equal(perms, pixel_permutations(784, 6, seed=6))
    with_identity = pixel_permutations(784, 6, seed=5, first_identity=True)
    assert torch.equal(with_identity[0], torch.arange(784))
    assert torch.equal(with_identity[1:], perms[1:])


def test_apply_permutation_matches_numpy_and_handles_images():
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    perm = pixel_permutations(16, 1, seed=0)[0]
    out = apply_permutation(x, perm)
    assert out.shape == x.shape
    expected = x.numpy().reshape(3, 16)[:, perm.numpy()].reshape(3, 1, 4, 4)
    np.testing.assert_array_equal(out.numpy(), expected)
    inverse = torch.argsort(perm)
    torch.testing.assert_close(apply_permutation(out, inverse), x)
    with pytest.raises(ValueError, match="does not match"):
        apply_permutation(x, torch.arange(15))


def test_random_label_tasks():
    labels = random_label_tasks(1000, 10, 3, seed=2)
    assert labels.shape == (3, 1000) and labels.dtype == torch.int64
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert torch.equal(labels, random_label_tasks(1000, 10, 3, seed=2))
    assert not torch.equal(labels[0], labels[1])
    balanced = random_label_tasks(1003, 10, 2, seed=2, balanced=True)
    for row in balanced:
        counts = torch.bincount(row, minlength=10)
        assert int(counts.max()) - int(counts.min()) <= 1 and int(counts.sum()) == 1003


def test_task_stream_epochs_cover_each_index_once_and_reshuffle():
    indices = torch.arange(100, 123)
    stream = TaskStream(indices, batch_size=5, seed=0)
    assert stream.batches_per_epoch == 5
    epoch0 = [stream.next_indices() for _ in range(5)]
    assert [len(b) for b in epoch0] == [5, 5, 5, 5, 3]
    assert sorted(torch.cat(epoch0).tolist()) == indices.tolist()
    epoch1 = torch.cat([stream.next_indices() for _ in range(5)])
    assert sorted(epoch1.tolist()) == indices.tolist()
    assert not torch.equal(torch.cat(epoch0), epoch1)
    assert stream.epoch == 1 and stream.position == 5 and stream.steps == 10


def test_task_stream_drop_last_and_no_shuffle():
    stream = TaskStream(23, batch_size=5, seed=0, drop_last=True, shuffle=False)
    batches = [stream.next_indices() for _ in range(5)]
    assert [b.tolist() for b in batches[:4]] == [list(range(i, i + 5)) for i in range(0, 20, 5)]
    assert batches[4].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="drop_last"):
        TaskStream(3, batch_size=5, drop_last=True)


@pytest.mark.parametrize("resume_after", [0, 3, 5, 7, 12])
def test_task_stream_resumes_exactly(resume_after):
    original = TaskStream(23, batch_size=5, seed=11, task_id=4)
    for _ in range(resume_after):
        original.next_indices()
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    expected = [original.next_indices() for _ in range(14)]
    resumed = TaskStream(23, batch_size=5, seed=11, task_id=4)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert resumed.steps == resume_after
    for want in expected:
        assert torch.equal(resumed.next_indices(), want)


def test_task_stream_rejects_foreign_state_and_seeds_differ():
    a = TaskStream(23, batch_size=5, seed=1)
    with pytest.raises(ValueError, match="different TaskStream"):
        TaskStream(24, batch_size=5, seed=1).load_state_dict(a.state_dict())
    b = TaskStream(23, batch_size=5, seed=2)
    assert not torch.equal(a.next_indices(), b.next_indices())
    c, d = TaskStream(23, 5, seed=1, task_id=0), TaskStream(23, 5, seed=1, task_id=1)
    assert not torch.equal(c.next_indices(), d.next_indices())


def test_task_stream_for_class_split_task_yields_only_task_samples():
    labels = torch.arange(60) % 10
    x = torch.arange(60, dtype=torch.float32).unsqueeze(1)
    task = class_split_tasks(10, 2, seed=0)[1]
    stream = TaskStream.for_task(task, labels, batch_size=4, seed=0)
    assert stream.num_samples == 12
    for _ in range(6):
        xb, yb = stream.next_batch(x, labels)
        assert set(yb.tolist()) <= set(task.classes)
        assert torch.equal(labels[xb.squeeze(1).long()], yb)
