"""The one seeding helper of lopkit: every random stream derives from a run's seed and integer stream keys.

``derive_seed(seed, *keys)`` gives statistically independent child seeds (numpy SeedSequence);
``seeded_generator`` wraps one in a torch Generator; ``stable_key`` turns a name (a mitigation, a stage)
into an integer key that is the same in every process (unlike Python's salted ``hash()``);
``seed_global_rngs`` seeds python/numpy/torch's global generators from one seed. This module imports
only numpy and torch, so any part of lopkit can use it.
"""

from __future__ import annotations

import random
import zlib

import numpy as np
import torch

__all__ = ["derive_seed", "seeded_generator", "stable_key", "seed_global_rngs"]

# stream keys of the global generators seeded by seed_global_rngs
_PYTHON_KEY, _NUMPY_KEY, _TORCH_KEY = 0x5059, 0x4E50, 0x5448


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


def stable_key(name: str) -> int:
    """An integer stream key for ``name`` that is identical in every process and Python version (CRC-32)."""
    return zlib.crc32(str(name).encode("utf-8"))


def seed_global_rngs(seed: int, *keys: int) -> None:
    """Seed python's, numpy's and torch's global generators with independent children of ``(seed, *keys)``."""
    random.seed(derive_seed(seed, *keys, _PYTHON_KEY))
    np.random.seed(derive_seed(seed, *keys, _NUMPY_KEY) % (2**32))
    torch.manual_seed(derive_seed(seed, *keys, _TORCH_KEY))
