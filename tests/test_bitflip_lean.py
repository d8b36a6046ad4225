"""Methods inside the bit-flipping lean engine (lopkit.benchmarks.bitflip_lean): rows equal the autograd engine's."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from lopkit.benchmarks.bitflip import BitFlipBenchmark, lean_supports
from lopkit.benchmarks.bitflip_lean import ema_sequence
from lopkit.mitigations.registry import build_methods

SHORT = {"width": 16, "num_steps": 1600, "flip_period": 500, "bin_size": 250, "monitor_every": 500, "block_size": 700}

# every method of the issue, with hyper-parameters that make it act within 1600 steps
METHODS = [
    "cbp:replacement_rate=0.01:maturity=20",
    "cbp:schedule=accumulate:replacement_rate=0.003:maturity=5",
    "cbp:init=kaiming_normal:bias_correction=true:replacement_rate=0.01",  # the method's own _replace
    "cbp_aggressive:maturity=20",
    "redo:every=200:window_steps=50:tau=0.2",
    "l2:strength=0.01",
    "l2init:strength=0.5",
    "shrink_perturb:every=3:sigma=0.05",
    "shrink_perturb:when=task:first_task=true",
    "noisy_sgd:sigma0=0.1:decay=0.9995",
]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dead-layer NaN warnings of the Monitor
        yield


def run(spec: str, engine: str, overrides: dict | None = None, seed: int = 3) -> tuple[BitFlipBenchmark, list[dict]]:
    config = BitFlipBenchmark.make_config("smoke", {**SHORT, **(overrides or {}), "engine": engine})
    bench = BitFlipBenchmark(config, seed, build_methods(spec))
    return bench, bench.run(config.num_steps)


def assert_rows_close(expected: list[dict], actual: list[dict], rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert (e["step"], e["layer"], e["metric"]) == (a["step"], a["layer"], a["metric"])
        if math.isnan(e["value"]):
            assert math.isnan(a["value"]), (e, a)
        else:
            assert math.isclose(e["value"], a["value"], rel_tol=rtol, abs_tol=atol), (e, a)


def _counters(method) -> dict:
    keys = ("total_replaced", "events", "applications", "t")
    return {k: getattr(method, k) for k in keys if hasattr(method, k)}


def _generator_state(method) -> torch.Tensor | None:
    if getattr(method, "generator", None) is not None:
        return method.generator.get_state()
    noise = getattr(method, "noise", None)
    if noise is not None and getattr(noise, "_generator", None) is not None:
        return noise._generator.get_state()
    return None


@pytest.mark.parametrize("spec", METHODS)
def test_lean_kernel_rows_equal_autograd_rows(spec):
    lean, lean_rows = run(spec, "lean")
    reference, reference_rows = run(spec, "autograd")
    auto = BitFlipBenchmark(BitFlipBenchmark.make_config("smoke", SHORT), 3, build_methods(spec))
    assert lean.lean_kernel() is not None and auto.engine == "lean" and lean_supports(lean.method, lean.model)
    assert_rows_close(reference_rows, lean_rows)
    for p, q in zip(lean.model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5)
    assert _counters(lean.method) == _counters(reference.method)
    assert any(v for k, v in _counters(lean.method).items()) or spec.startswith("l2")  # the method acted
    lean_state, reference_state = _generator_state(lean.method), _generator_state(reference.method)
    assert (lean_state is None) == (reference_state is None)
    if lean_state is not None:
        assert torch.equal(lean_state, reference_state)  # the same draws, in the same order


def test_lean_cbp_without_the_constant_column():
    spec = "cbp:replacement_rate=0.01:maturity=20"
    overrides = {"constant_input": False, "threshold_rule": "dohare_code", "probe": "current"}
    lean, lean_rows = run(spec, "lean", overrides)
    reference, reference_rows = run(spec, "autograd", overrides)
    assert lean.method.total_replaced == reference.method.total_replaced > 0
    assert_rows_close(reference_rows, lean_rows)


def test_lean_cbp_resume_in_chunks_gives_the_same_rows():
    spec = "cbp:replacement_rate=0.01:maturity=20"
    _, reference = run(spec, "lean")
    config = BitFlipBenchmark.make_config("smoke", {**SHORT, "engine": "lean"})
    first = BitFlipBenchmark(config, 3, build_methods(spec))
    rows = first.run(777)
    resumed = BitFlipBenchmark(config, 3, build_methods(spec))
    resumed.load_state_dict(first.state_dict())
    while not resumed.done:
        rows += resumed.run(333)
    assert_rows_close(reference, rows, rtol=1e-6, atol=1e-8)


def test_ema_sequence_is_the_recursion():
    rng = np.random.default_rng(0)
    values, start, eta = rng.random((150, 7)), rng.random(7), 0.99
    expected, y = [], start.copy()
    for row in values:
        y = eta * y + (1.0 - eta) * row
        expected.append(y.copy())
    np.testing.assert_allclose(ema_sequence(values, start, eta), np.array(expected), rtol=1e-13)
