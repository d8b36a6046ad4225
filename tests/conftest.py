"""Test-wide settings: one intra-op thread (small tensors run faster and tests do not fight over the 2 cores), and
fixtures shared by several test files."""

import sys

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def kill_benchmark():
    """Register the test-only ``toy_kill`` benchmark (tests/sweep_faults.py) for one test, then unregister it."""
    from lopkit.benchmarks.base import BENCHMARKS

    sys.modules.pop("sweep_faults", None)
    import sweep_faults  # noqa: F401  (registers toy_kill; sweep workers import it by module name)

    yield "toy_kill"
    BENCHMARKS.pop("toy_kill", None)
    sys.modules.pop("sweep_faults", None)
