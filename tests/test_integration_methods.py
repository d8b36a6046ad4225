"""Architectural mitigations reach the benchmarks' models (or are refused with a clear error)."""

import pytest
from torch import nn

from lopkit.benchmarks.base import get_benchmark
from lopkit.configs import ConfigError
from lopkit.mitigations.base import changes_architecture
from lopkit.mitigations.registry import build_methods


def test_changes_architecture_flags_only_model_rewriting_methods():
    assert changes_architecture(build_methods("layernorm"))
    assert changes_architecture(build_methods("cbp,crelu"))
    assert not changes_architecture(build_methods("cbp,l2init"))
    assert not changes_architecture(build_methods("sgd"))


def test_bitflip_trains_the_model_prepared_by_an_architectural_method():
    bench = get_benchmark("bitflip")
    run = bench(bench.make_config("smoke", {"num_steps": 200, "monitor_every": 100}), 0, build_methods("layernorm"))
    assert any(isinstance(m, nn.LayerNorm) for m in run.model.modules())
    rows = run.run(run.total_steps)
    assert {"online_mse", "effective_rank"} <= {r["metric"] for r in rows}


def test_cloning_refuses_architectural_methods():
    bench = get_benchmark("cloning")
    with pytest.raises(ConfigError, match="rewrites the model"):
        bench(bench.make_config("smoke"), 0, build_methods("dropout"))
