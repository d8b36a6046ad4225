"""Test-wide settings: one intra-op thread (small tensors run faster and tests do not fight over the 2 cores), and
fixtures shared by several test files."""

import importlib
import sys

import pytest
import torch

torch.set_num_threads(1)


def registered_test_benchmark(module: str, name: str):
    """Import the tests/ module that registers benchmark ``name``, yield the name, then unregister it.

    Spawned workers import the module by name (it is registered outside lopkit), so it is imported afresh here.
    """
    from lopkit.benchmarks.base import BENCHMARKS

    sys.modules.pop(module, None)
    importlib.import_module(module)
    yield name
    BENCHMARKS.pop(name, None)
    sys.modules.pop(module, None)


@pytest.fixture
def kill_benchmark():
    """Register the test-only ``toy_kill`` benchmark (tests/sweep_faults.py) for one test, then unregister it."""
    yield from registered_test_benchmark("sweep_faults", "toy_kill")
