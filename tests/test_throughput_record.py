"""``--record`` of benchmarks/throughput_bitflip.py and throughput_vmap_seeds.py: which figures become README rows."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    """Import a benchmark script by path (the folder is scripts, not a package; they import ``_record``)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"_script_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture()
def readme(tmp_path: Path) -> Path:
    record = load_script("_record")
    path = tmp_path / "README.md"
    path.write_text(f"# figures\n\n{record.START}\n| key | script | figure | command | machine | date |\n"
                    f"|---|---|---|---|---|---|\n{record.END}\n")
    return path


def test_throughput_bitflip_rows_follow_what_ran(readme: Path) -> None:
    script = load_script("throughput_bitflip")
    results = {"engines": {("lean", 0): 52000.0, ("lean", 1000): 40000.0, ("autograd", 0): 3000.0},
               "methods": {"sgd": 50000.0, "cbp": 20000.0, "l2": 45000.0}, "load": "load average 2.00 1.00 1.00"}
    rows = dict(script.recorded_figures(results, 100, 1000, 20000, 3))
    assert list(rows) == ["throughput_bitflip/engines/width100", "throughput_bitflip/methods/width100",
                          "throughput_bitflip/cbp_ratio/width100"]
    assert "lean 52000 steps/s (Monitor off)" in rows["throughput_bitflip/engines/width100"]
    assert "cbp 20000 (0.40x); l2 45000 (0.90x)" in rows["throughput_bitflip/methods/width100"]
    assert rows["throughput_bitflip/cbp_ratio/width100"].startswith("cbp / plain = 0.40 (target >= 0.5: MISSED)")
    results["methods"]["cbp"] = 30000.0
    assert "0.60 (target >= 0.5: met)" in dict(script.recorded_figures(results, 100, 1000, 20000, 3))[
        "throughput_bitflip/cbp_ratio/width100"]
    # --skip-engines and a method list without cbp: only the methods row
    skipped = {"engines": {}, "methods": {"sgd": 50000.0, "redo": 40000.0}, "load": "load average 1"}
    assert [key for key, _ in script.recorded_figures(skipped, 50, 1000, 20000, 3)] == [
        "throughput_bitflip/methods/width50"]
    for key, figure in script.recorded_figures(results, 100, 1000, 20000, 3):
        script.record(key, "throughput_bitflip.py", figure, threads=1, command="python benchmarks/x.py", readme=readme)
    text = readme.read_text()
    assert text.count("| throughput_bitflip/") == 3 and "1 thread(s)" in text


def test_throughput_vmap_seeds_rows_follow_what_ran(readme: Path) -> None:
    script = load_script("throughput_vmap_seeds")
    args = argparse.Namespace(seeds=8, steps=1000, width=100, monitor_every=0, method="cbp", method_steps=500,
                              repeats=3)
    timings = {"sequential": 8.0, "seed group": 2.0}
    rows = dict(script.recorded_figures(args, timings, (10000.0, 25000.0), "load average 3.0"))
    assert list(rows) == ["throughput_vmap_seeds/plain/8seeds/width100", "throughput_vmap_seeds/cbp/8seeds/width100"]
    assert "seed group 4000 seed-steps/s (4.00x)" in rows["throughput_vmap_seeds/plain/8seeds/width100"]
    assert "Monitor every never" in rows["throughput_vmap_seeds/plain/8seeds/width100"]
    assert "= 2.50x (target >= 3.0x for 8 seeds: MISSED)" in rows["throughput_vmap_seeds/cbp/8seeds/width100"]
    skipped = script.recorded_figures(args, None, (10000.0, 40000.0), "load average 3.0")  # --skip-plain
    assert [key for key, _ in skipped] == ["throughput_vmap_seeds/cbp/8seeds/width100"]
    assert "4.00x (target >= 3.0x for 8 seeds: met)" in skipped[0][1]
    for key, figure in skipped:
        script.record(key, "throughput_vmap_seeds.py", figure, threads=1, command="python benchmarks/y.py",
                      readme=readme)
    assert "| throughput_vmap_seeds/cbp/8seeds/width100 | throughput_vmap_seeds.py |" in readme.read_text()
