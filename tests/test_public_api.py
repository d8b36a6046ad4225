"""``import lopkit as lk``: the everyday names, loaded on first use (PEP 562)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lopkit as lk

SRC = Path(__file__).resolve().parents[1] / "src"


def test_every_public_name_resolves_to_its_defining_module():
    from lopkit.benchmarks.registry import get_benchmark
    from lopkit.diagnostics.monitor import Monitor, MonitorConfig
    from lopkit.mitigations.registry import build_methods
    from lopkit.mitigations.resets import ContinualBackprop
    from lopkit.runner.store import ResultStore
    from lopkit.theory.cloning import clone
    from lopkit.theory.partition import Partition

    expected = {"Monitor": Monitor, "MonitorConfig": MonitorConfig, "clone": clone, "Partition": Partition,
                "build_methods": build_methods, "ContinualBackprop": ContinualBackprop,
                "get_benchmark": get_benchmark, "ResultStore": ResultStore}
    for name, value in expected.items():
        assert getattr(lk, name) is value and name in lk.__all__
    for name in lk.__all__:
        assert getattr(lk, name) is not None


def test_every_registered_method_class_is_public():
    from lopkit.mitigations.registry import METHODS, available_methods

    available_methods()  # imports every method module
    assert {cls.__name__ for cls in METHODS.values()} <= set(lk.__all__)


def test_dir_and_unknown_names():
    assert set(lk.__all__) <= set(dir(lk)) and "TYPE_CHECKING" not in dir(lk)
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        lk.nosuch  # noqa: B018


def test_import_lopkit_imports_nothing_else():
    code = ("import json, sys\nbefore = set(sys.modules)\nimport lopkit\n"
            "print(json.dumps(sorted(set(sys.modules) - before)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["lopkit"]
