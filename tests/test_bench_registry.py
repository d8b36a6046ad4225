"""The benchmark registry: names -> "module:Class" strings loaded lazily, plus other packages' entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lopkit.benchmarks import registry
from lopkit.benchmarks.base import BENCHMARKS as BASE_BENCHMARKS
from lopkit.benchmarks.base import get_benchmark as base_get_benchmark
from lopkit.configs import ConfigError

SRC = Path(__file__).resolve().parents[1] / "src"


def test_base_reexports_the_registry():
    assert BASE_BENCHMARKS is registry.BENCHMARKS and base_get_benchmark is registry.get_benchmark


def test_every_builtin_spec_loads_the_class_of_that_name():
    for name, spec in registry.BUILTIN_BENCHMARKS.items():
        cls = registry.get_benchmark(name)
        module, _, attr = spec.partition(":")
        assert cls.name == name and cls.__module__ == module and cls.__name__ == attr
    assert registry.benchmark_names() == sorted(set(registry.BUILTIN_BENCHMARKS) | set(registry.BENCHMARKS))


def test_unknown_and_mismatched_names_give_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="unknown benchmark 'nosuch'; available: .*bitflip.*toy"):
        registry.get_benchmark("nosuch")
    monkeypatch.setitem(registry.BUILTIN_BENCHMARKS, "renamed", "lopkit.benchmarks.toy:ToyBenchmark")
    with pytest.raises(ConfigError, match="whose name is 'toy'"):
        registry.get_benchmark("renamed")
    with pytest.raises(ValueError, match="expected 'module:Class'"):
        registry.load_target("lopkit.benchmarks.toy")


def test_a_package_adds_a_benchmark_through_an_entry_point(tmp_path):
    (tmp_path / "lopkit_plugin_demo.py").write_text(textwrap.dedent('''
        import dataclasses
        from lopkit.benchmarks.base import Benchmark, BenchmarkConfig

        @dataclasses.dataclass
        class DemoConfig(BenchmarkConfig):
            steps: int = 3

        class DemoBenchmark(Benchmark):
            name = "plugin_demo"
            Config = DemoConfig
            presets = {"smoke": {}, "default": {}, "paper": {}}
            total_steps = 3
            def run(self, n_steps): return []
            def state_dict(self): return {}
            def load_state_dict(self, state): pass
    '''))
    dist = tmp_path / "lopkit_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lopkit-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lopkit.benchmarks]\nplugin_demo = lopkit_plugin_demo:DemoBenchmark\n")
    code = ("import json, sys\nfrom lopkit.benchmarks.registry import benchmark_names, get_benchmark\n"
            "loaded_before = 'lopkit_plugin_demo' in sys.modules\n"
            "names = benchmark_names()\ncls = get_benchmark('plugin_demo')\n"
            "print(json.dumps([loaded_before, 'plugin_demo' in names, cls.__module__, cls.make_config('smoke').steps]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(tmp_path)])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [False, True, "lopkit_plugin_demo", 3]
