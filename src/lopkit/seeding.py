"""The one seeding helper of lopkit: every random stream derives from a run's seed and integer stream keys.

``derive_seed(seed, *keys)`` gives statistically independent child seeds (numpy SeedSequence);
``seeded_generator`` wraps one in a torch Generator; ``stable_key`` turns a name (a mitigation, a stage)
into an integer key that is the same in every process (unlike Python's salted ``hash()``);
``seed_global_rngs`` seeds python/numpy/torch's global generators from one seed; ``rng_sandbox`` and
:class:`RNGSandbox` are the one way to keep draws from the global generators apart from the rest of the
process. This module imports only numpy and torch, so any part of lopkit can use it.
"""

from __future__ import annotations

import contextlib
import random
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = [
    "RNGSandbox",
    "capture_rng_state",
    "derive_seed",
    "restore_rng_state",
    "rng_sandbox",
    "seed_global_rngs",
    "seeded_generator",
    "stable_key",
]

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


def capture_rng_state(cuda_device: torch.device | str | int | None = None) -> dict[str, Any]:
    """The global random states (python, numpy, torch CPU and, if given, one CUDA device's), to restore later."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if cuda_device is not None:
        state["cuda"] = torch.cuda.get_rng_state(cuda_device)
    return state


def restore_rng_state(state: dict[str, Any], cuda_device: torch.device | str | int | None = None) -> None:
    """Inverse of :func:`capture_rng_state` (a saved CUDA state goes back to ``cuda_device``, default the current)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], "cuda" if cuda_device is None else cuda_device)


@contextlib.contextmanager
def rng_sandbox(cuda_device: torch.device | str | int | None = None) -> Iterator[None]:
    """Run the body, then put the global generators back as they were: its draws leave no trace outside."""
    outer = capture_rng_state(cuda_device)
    try:
        yield
    finally:
        restore_rng_state(outer, cuda_device)


class RNGSandbox:
    """A private global-RNG state, installed only inside :meth:`active`, that advances there and is saved in ``state``.

    Code that draws from the global generators (dropout, a mitigation's noise) then gives the same numbers
    whatever else runs in the process, and ``state`` is what a checkpoint saves.
    """

    def __init__(self, state: dict[str, Any] | None = None, cuda_device: torch.device | str | int | None = None):
        self.cuda_device = cuda_device
        self.state = capture_rng_state(cuda_device) if state is None else state

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Install the private state, run the body, save the advanced state and restore the caller's."""
        outer = capture_rng_state(self.cuda_device)
        restore_rng_state(self.state, self.cuda_device)
        try:
            yield
        finally:
            self.state = capture_rng_state(self.cuda_device)
            restore_rng_state(outer, self.cuda_device)
