"""Every run is a function of its seed: the same rows in every process, and after a resume (issue 12, defect 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lopkit
from lopkit.benchmarks.base import get_benchmark
from lopkit.mitigations.base import Compose, Mitigation
from lopkit.mitigations.registry import NO_OP_NAMES, available_methods
from lopkit.runner.execute import execute_run, resolve_methods
from lopkit.runner.store import ResultStore
from lopkit.seeding import derive_seed, stable_key

SRC = str(Path(lopkit.__file__).resolve().parents[1])

# hyper-parameters that make the reset methods act within a few dozen steps (so their generator is used)
FAST_SPECS = {
    "cbp": "cbp:maturity=5:replacement_rate=0.05",
    "cbp_aggressive": "cbp_aggressive:maturity=5",
    "redo": "redo:every=20:window_steps=10:tau=0.5",
    "reset_frozen": "reset_frozen:every=20:window_steps=10:eps=0.5:sample_fraction=0.5",
    "break_clones": "break_clones:every=20:window_steps=10:threshold=0.0",
    "reset": "reset:every=30",
    "regrama": "regrama:every=20:window_steps=10:tau=0.5",
    "snr": "snr:maturity=20:threshold=0.01",
    "swr": "swr:every=5:rate=0.05",
    "ccbp": "ccbp:every=10",
}
RESET_METHODS = set(FAST_SPECS)
SHORT = {
    "bitflip": {"num_steps": 80, "flip_period": 40, "bin_size": 20, "monitor_every": 40},
    "class_split": {"num_tasks": 2, "steps_per_task": 15},
}
# batch norm cannot train on bitflip's single-sample online steps; proper_adam needs Adam, bitflip trains with SGD
UNSUPPORTED = {("bitflip", "batchnorm"), ("bitflip", "proper_adam")}

DIGEST_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    import torch
    torch.set_num_threads(1)
    from lopkit.benchmarks.base import get_benchmark
    from lopkit.runner.execute import resolve_methods
    plan = json.loads(sys.argv[1])
    out = {}
    for bench, overrides in plan["short"].items():
        cls = get_benchmark(bench)
        config = cls.make_config("smoke", overrides)
        for name in plan["methods"]:
            if [bench, name] in plan["unsupported"]:
                continue
            methods = resolve_methods(plan["specs"].get(name, name))
            benchmark = cls(config, 3, methods)
            rows = benchmark.run(benchmark.total_steps)
            text = json.dumps([[r["step"], r["task"], r["layer"], r["metric"], float(r["value"]).hex()] for r in rows])
            replaced = sum(getattr(m, "total_replaced", 0) for m in methods)
            out[bench + "/" + name] = [hashlib.sha256(text.encode()).hexdigest(), len(rows), replaced]
    print(json.dumps(out))
    """
)


def registered_methods() -> list[str]:
    """Every registered mitigation (the no-op baselines are one run without a method)."""
    return ["sgd"] + [m for m in available_methods() if m not in NO_OP_NAMES]


def run_digests(hash_seed: str) -> subprocess.Popen:
    """Start a fresh interpreter that runs every method on the short benchmarks and prints row digests."""
    plan = {"short": SHORT, "methods": registered_methods(), "specs": FAST_SPECS, "unsupported": sorted(UNSUPPORTED)}
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", DIGEST_SCRIPT, json.dumps(plan)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_every_method_gives_bit_identical_rows_in_two_separate_processes():
    first, second = run_digests("1"), run_digests("2")  # different hash salts, different process seeds
    outputs = []
    for proc in (first, second):
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    a, b = outputs
    expected = {f"{bench}/{m}" for bench in SHORT for m in registered_methods() if (bench, m) not in UNSUPPORTED}
    assert set(a) == set(b) == expected
    for key in sorted(a):
        assert a[key][1] > 0, f"{key}: no rows"
        if key.split("/")[1] in RESET_METHODS:
            assert a[key][2] > 0, f"{key}: the method never reset a unit, so its generator was not exercised"
    differing = [key for key in sorted(a) if a[key] != b[key]]
    assert differing == [], f"rows differ between processes for {differing}"


def test_methods_draw_from_the_run_seed_through_the_seeding_helper():
    cbp, noisy = resolve_methods("cbp,noisy_sgd")
    composed = Compose([cbp, noisy])
    composed.seed_from_run(7)
    assert cbp.method_seed() == derive_seed(7, stable_key("cbp"), 0)
    assert noisy.method_seed() == derive_seed(7, stable_key("noisy_sgd"), 1)
    single = resolve_methods("cbp")[0]
    single.seed_from_run(7)
    other = resolve_methods("cbp")[0]
    other.seed_from_run(8)
    assert single.method_seed() != other.method_seed()
    assert single.method_seed(explicit=5) == other.method_seed(explicit=5)  # a config seed wins over the run's


def test_the_benchmark_hands_its_seed_to_the_methods():
    cls = get_benchmark("toy")
    config = cls.make_config("smoke")
    method = resolve_methods("cbp")[0]
    cls(config, 11, [method])
    assert method.method_seed() == derive_seed(11, stable_key("cbp"))


RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from lopkit.benchmarks.base import get_benchmark
    from lopkit.runner.execute import execute_run
    from lopkit.runner.store import ResultStore
    folder, spec, overrides, stop = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    cls = get_benchmark("bitflip")
    result = execute_run(ResultStore(folder), cls, cls.make_config("smoke", overrides), 0, [spec], checkpoint_every=25,
                         progress=False, stop_after_steps=stop)
    print(result.status, result.step)
    """
)


@pytest.mark.parametrize("stop", [37, 61])
def test_reset_method_resumed_in_another_process_gives_the_uninterrupted_rows(tmp_path, stop):
    overrides = SHORT["bitflip"]
    spec = FAST_SPECS["cbp"]
    cls = get_benchmark("bitflip")
    config = cls.make_config("smoke", overrides)
    reference = cls(config, 0, resolve_methods(spec))
    expected = sorted(tuple(r[k] for k in ("step", "task", "layer", "metric", "value"))
                      for r in reference.run(reference.total_steps))
    assert reference.method.total_replaced > 0

    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONHASHSEED": "5", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, str(tmp_path), spec, json.dumps(overrides), str(stop)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["paused", str(stop)]

    store = ResultStore(tmp_path)
    result = execute_run(store, cls, config, 0, [spec], checkpoint_every=25, progress=False)
    assert (result.status, result.resumed_from) == ("finished", stop)
    frame = store.metrics()
    got = sorted(zip(frame["step"], frame["task"], frame["layer"], frame["metric"], frame["value"]))
    store.close()
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a[:4] == b[:4] and (a[4] == b[4] or (a[4] != a[4] and b[4] != b[4])), (a, b)


def test_no_benchmark_or_method_reads_the_process_seed():
    """Static guard: torch.initial_seed() is the process's seed, never a run's."""
    offenders = [str(p) for p in Path(SRC, "lopkit").rglob("*.py") if "torch.initial_seed()" in p.read_text()]
    assert offenders == []


def test_benchmarks_reject_a_negative_seed():
    cls = get_benchmark("toy")
    with pytest.raises(Exception, match="seed must be >= 0"):
        cls(cls.make_config("smoke"), -1)


def test_a_method_without_a_run_seed_is_deterministic():
    a, b = resolve_methods("noisy_sgd")[0], resolve_methods("noisy_sgd")[0]
    assert isinstance(a, Mitigation) and a.method_seed() == b.method_seed() == derive_seed(0, stable_key("noisy_sgd"))
