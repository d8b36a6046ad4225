"""Seed derivation shared by the data streams: independent child seeds from one user seed."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["derive_seed", "seeded_generator"]


def derive_seed(seed: int, *keys: int) -> int:
    """Derive a 63-bit seed from ``seed`` and integer ``keys`` (e.g. a stream id, a task id).

    Uses numpy's SeedSequence, so different (seed, keys) give statistically independent streams
    (unlike ``seed + k``, which makes seed 0's second stream equal to seed 1's first).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    entropy = [int(seed), *(int(k) for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def seeded_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU torch.Generator seeded with :func:`derive_seed` of ``seed`` and ``keys``."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))
