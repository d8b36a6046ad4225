"""scikit-learn's bundled 8x8 digits (1,797 images), available offline, as tensors in [0, 1]."""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["load_digits_dataset"]


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Read sklearn's bundled digits once: images (1797, 8, 8) in 0..16 and labels (1797,)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


def load_digits_dataset(
    flatten: bool = True, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load sklearn's digits: X (1797, 64) or (1797, 1, 8, 8) scaled from 0..16 to [0, 1], y (1797,) int64."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be floating point (values are scaled to [0, 1]), got {dtype}")
    images, labels = _digits_arrays()
    x = torch.from_numpy(images / 16.0).to(dtype)
    x = x.reshape(x.shape[0], -1) if flatten else x.unsqueeze(1)
    return x, torch.from_numpy(labels.copy())
