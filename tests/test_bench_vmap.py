"""Tests of the seed-vectorised bit-flipping runner: per-seed rows equal separate benchmark runs."""

from __future__ import annotations

import math

import pytest

from lopkit.benchmarks.bitflip import BitFlipBenchmark
from lopkit.benchmarks.vmap_seeds import run_bitflip_seeds
from lopkit.configs import ConfigError

CONFIG = {"width": 16, "num_steps": 1500, "flip_period": 400, "bin_size": 250, "monitor_every": 500, "block_size": 300}
SEEDS = [0, 4, 9]


@pytest.fixture(scope="module")
def sequential_rows() -> dict[int, list[dict]]:
    """Rows of separate benchmark runs, one per seed."""
    config = BitFlipBenchmark.make_config("smoke", CONFIG)
    return {seed: BitFlipBenchmark(config, seed).run(config.num_steps) for seed in SEEDS}


def assert_rows_close(expected: list[dict], actual: list[dict], rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """Same keys in the same order; values equal within a relative tolerance (NaN matches NaN)."""
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert (e["step"], e["task"], e["layer"], e["metric"]) == (a["step"], a["task"], a["layer"], a["metric"])
        if math.isnan(e["value"]):
            assert math.isnan(a["value"]), (e, a)
        else:
            assert math.isclose(e["value"], a["value"], rel_tol=rtol, abs_tol=atol), (e, a)


@pytest.mark.parametrize("engine", ["func", "lean"])
def test_vectorised_rows_match_separate_runs(engine, sequential_rows):
    config = BitFlipBenchmark.make_config("smoke", CONFIG)
    rows = run_bitflip_seeds(config, SEEDS, engine=engine)
    assert sorted(rows) == SEEDS
    for seed in SEEDS:
        assert_rows_close(sequential_rows[seed], rows[seed])
    # Different seeds really are different runs.
    first = [r["value"] for r in rows[0] if r["metric"] == "online_mse"]
    other = [r["value"] for r in rows[4] if r["metric"] == "online_mse"]
    assert first != other


def test_n_steps_stops_early_like_a_partial_run():
    config = BitFlipBenchmark.make_config("smoke", {**CONFIG, "monitor_every": 0})
    rows = run_bitflip_seeds(config, [2], engine="lean", n_steps=600)[2]
    partial = BitFlipBenchmark(config, 2).run(600)
    assert_rows_close(partial, rows)
    assert [r["step"] for r in rows] == [250, 500]  # no partial bin: the run is not finished


def test_bad_arguments():
    config = BitFlipBenchmark.make_config("smoke", CONFIG)
    with pytest.raises(ValueError, match="empty"):
        run_bitflip_seeds(config, [])
    with pytest.raises(ValueError, match="distinct"):
        run_bitflip_seeds(config, [1, 1])
    with pytest.raises(ValueError, match="engine"):
        run_bitflip_seeds(config, [1], engine="jit")
    with pytest.raises(ConfigError):
        run_bitflip_seeds({"width": 3}, [1])
