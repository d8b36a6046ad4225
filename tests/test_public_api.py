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


def _modules_loaded_by(code: str) -> set[str]:
    """The modules a fresh interpreter (source tree on the path) imports while it runs ``code``."""
    script = (f"import json, sys\nbefore = set(sys.modules)\n{code}\n"
              "print(json.dumps(sorted(set(sys.modules) - before)))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_import_lopkit_imports_nothing_else():
    assert _modules_loaded_by("import lopkit") == {"lopkit", "lopkit._lazy"}


@pytest.mark.parametrize("code", [
    "import lopkit.moe, lopkit.kws",
    "import contextlib, io\nfrom lopkit.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n    main([])",
])
def test_packages_and_cli_help_load_no_torch_or_pandas(code):
    heavy = {"torch", "pandas", "numpy"} & _modules_loaded_by(code)
    assert not heavy, f"{code!r} loaded {sorted(heavy)}"


def test_seed_system_names_and_submodules_load_on_first_use():
    import lopkit.kws as kws
    import lopkit.moe as moe
    from lopkit.kws.metrics import det_curve
    from lopkit.moe.model import MoETransformer

    assert moe.MoETransformer is MoETransformer and kws.det_curve is det_curve
    for package in (moe, kws):
        assert set(package.__all__) <= set(dir(package)) and "TYPE_CHECKING" not in dir(package)
        for name in package.__all__:
            assert getattr(package, name) is not None
    assert moe.scoring.__name__ == "lopkit.moe.scoring" and lk.theory.__name__ == "lopkit.theory"
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        moe.nosuch  # noqa: B018
