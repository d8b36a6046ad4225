"""Offline datasets (Fashion-MNIST from Debian, sklearn digits, user-supplied IDX folders) and continual task streams."""

from lopkit.data.bitflip import BitFlipConfig, BitFlipStream, ltu_thresholds
from lopkit.data.digits import load_digits_dataset
from lopkit.data.errors import DatasetNotFoundError, IdxFormatError
from lopkit.data.fashion_mnist import fashion_mnist_dir, load_fashion_mnist, load_mnist
from lopkit.data.idx import read_idx, write_idx
from lopkit.data.tasks import (
    ClassSplitTask,
    TaskStream,
    apply_permutation,
    class_split_tasks,
    pixel_permutations,
    random_label_tasks,
)

__all__ = [
    "BitFlipConfig", "BitFlipStream", "ltu_thresholds", "load_digits_dataset", "DatasetNotFoundError", "IdxFormatError",
    "fashion_mnist_dir", "load_fashion_mnist", "load_mnist", "read_idx", "write_idx", "ClassSplitTask", "TaskStream",
    "apply_permutation", "class_split_tasks", "pixel_permutations", "random_label_tasks",
]
