"""The ``device`` setting: validated in the typed configs, threaded through benchmarks, methods and the Monitor.

CI has no GPU: the CPU tests check the validation (``device=cuda`` without CUDA is one clear error line) and that
every benchmark puts its model and data on the device its config names (with ``torch.device("meta")`` standing in
for a GPU); the CUDA tests run the real thing and skip cleanly without a CUDA device.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lopkit.benchmarks.registry import BUILTIN_BENCHMARKS, get_benchmark
from lopkit.configs import ConfigError, build_config, check_device, config_field_types

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: benchmarks with a CUDA path; the others accept only device=cpu
CUDA_BENCHMARKS = ("toy", "bitflip", "cloning", "class_split", "permuted", "random_labels")


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend this machine has no CUDA device (also on a machine that has one)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("value", ["cpu", "CPU", " cpu ", torch.device("cpu")])
def test_cpu_is_accepted(value) -> None:
    assert check_device(value) == torch.device("cpu")


@pytest.mark.parametrize("value", ["gpu", "mps", "cuda:x", "cpu:0:1", "", None, 3])
def test_unknown_devices_are_one_clear_error(value) -> None:
    with pytest.raises(ConfigError, match="must be 'cpu' or 'cuda'") as info:
        check_device(value)
    assert "\n" not in str(info.value)


def test_cuda_without_a_cuda_device_is_one_clear_error(no_cuda) -> None:
    for value in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="use device=cpu") as info:
            check_device(value)
        assert "\n" not in str(info.value) and value in str(info.value)


def test_cpu_only_callers_refuse_cuda_even_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="not supported here"):
        check_device("cuda", supported=("cpu",))


@pytest.mark.parametrize("name", sorted(BUILTIN_BENCHMARKS))
def test_every_benchmark_config_has_a_validated_device(name: str, no_cuda) -> None:
    cls = get_benchmark(name)
    assert "device" in config_field_types(cls.Config)
    assert cls.Config().device == "cpu"
    for bad, message in (("gpu", "must be 'cpu' or 'cuda'"), ("cuda", "device=cuda")):
        with pytest.raises(ConfigError, match=message):
            build_config(cls.Config, {"device": bad})


@pytest.mark.parametrize("name", sorted(set(BUILTIN_BENCHMARKS) - set(CUDA_BENCHMARKS)))
def test_cpu_only_benchmarks_say_so(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="not supported here"):
        build_config(get_benchmark(name).Config, {"device": "cuda"})


def test_bitflip_lean_engine_on_cuda_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="engine=lean runs in NumPy on the CPU"):
        build_config(get_benchmark("bitflip").Config, {"device": "cuda", "engine": "lean"})


def test_cli_prints_one_error_line_for_cuda_without_cuda(capsys, tmp_path, no_cuda) -> None:
    from lopkit.cli import main

    out = tmp_path / "exp"
    code = main(["run", "toy", "--set", "device=cuda", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and captured.out == "" and not out.exists()
    assert len(err) == 1 and err[0].startswith("error:") and "device=cuda" in err[0] and "device=cpu" in err[0]


# ---------------------------------------------------------------------------------------------- threading (CPU)
def _meta_device(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    """Make the benchmark module's check_device answer torch.device('meta'): a stand-in accelerator."""
    monkeypatch.setattr(f"{module}.check_device", lambda value, *a, **k: torch.device("meta"))


@pytest.mark.parametrize(
    ("module", "name", "overrides"),
    [
        ("lopkit.benchmarks.toy", "toy", {}),
        ("lopkit.benchmarks.bitflip", "bitflip", {"num_steps": 100, "monitor_every": 50}),
        ("lopkit.benchmarks.cloning", "cloning",
         {"dataset": "digits", "train_size": 200, "hidden": (8,), "probe_size": 20, "base_steps": 4,
          "paired_steps": 4, "log_every": 4}),
    ],
)
def test_benchmarks_put_model_and_data_on_the_configured_device(monkeypatch, module, name, overrides) -> None:
    """With the device setting answering 'meta', every parameter and every data tensor built lands there."""
    _meta_device(monkeypatch, module)
    cls = get_benchmark(name)
    bench = cls(cls.make_config("smoke", overrides), seed=0)
    assert bench.device == torch.device("meta")
    models = [getattr(bench, attr) for attr in ("model", "base") if isinstance(getattr(bench, attr, None), nn.Module)]
    assert models
    for model in models:
        assert all(p.device.type == "meta" for p in model.parameters())
    for attr in ("train_x", "train_y", "probe_x", "probe_y"):
        if hasattr(bench, attr):
            assert getattr(bench, attr).device.type == "meta", attr
    if name == "bitflip":
        assert bench.engine == "autograd"  # the NumPy lean engine is CPU-only
    if name == "cloning":
        assert all(t.device.type == "meta" for t in (bench._sums["base"], bench._sums["clone"]))


def test_toy_batches_follow_the_device(monkeypatch) -> None:
    """Inputs, teacher and probe of the toy are moved to the device before they meet the model."""
    _meta_device(monkeypatch, "lopkit.benchmarks.toy")
    cls = get_benchmark("toy")
    bench = cls(cls.make_config("smoke"), seed=0)
    seen = []
    bench.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].device.type))
    with pytest.raises(Exception):  # a meta loss has no value: the step stops at the finiteness check
        bench.run(1)
    assert seen == ["meta"] and all(t.device.type == "meta" for t in bench.teacher(0))


def test_cpu_runs_are_unchanged_by_an_explicit_device() -> None:
    """device=cpu given explicitly gives the same rows as the default."""
    cls = get_benchmark("toy")
    a = cls(cls.make_config("smoke"), seed=3).run(50)
    b = cls(cls.make_config("smoke", {"device": "cpu"}), seed=3).run(50)
    assert a == b


# ---------------------------------------------------------------------------------------------- CUDA
def _all_tensors(obj) -> list[torch.Tensor]:
    """Every tensor inside nested dicts/lists/tuples."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _all_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _all_tensors(v)]
    return []


def _round_trip(state: dict) -> dict:
    """A state saved and loaded back onto the CPU, as the results store does (map_location='cpu')."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=False)


@needs_cuda
@pytest.mark.parametrize("method", ["sgd", "cbp", "redo", "l2", "l2init", "shrink_perturb", "noisy_sgd",
                                    "hare_tortoise", "cchain", "spectral", "layernorm"])
def test_toy_on_cuda_with_each_method_resumes_from_a_cpu_state(method: str) -> None:
    from lopkit.mitigations.registry import build_methods

    cls = get_benchmark("toy")
    config = cls.make_config("smoke", {"device": "cuda"})
    methods = [] if method == "sgd" else build_methods(method)
    bench = cls(config, seed=1, method=methods)
    first = bench.run(30)
    state = _round_trip(bench.state_dict())
    resumed = cls(config, seed=1, method=[] if method == "sgd" else build_methods(method))
    resumed.load_state_dict(state)
    rest = resumed.run(config.num_tasks * config.steps_per_task)
    assert all(p.device.type == "cuda" for p in resumed.model.parameters())
    assert all(t.device.type == "cuda" for t in _all_tensors(resumed.optimizer.state_dict()["state"])
               if t.ndim > 0)
    uninterrupted = cls(config, seed=1, method=[] if method == "sgd" else build_methods(method)).run(10_000)
    assert [r["metric"] for r in first + rest] == [r["metric"] for r in uninterrupted]
    for got, want in zip(first + rest, uninterrupted):
        assert got["value"] == pytest.approx(want["value"], rel=1e-4, abs=1e-6)


@needs_cuda
def test_toy_rows_on_cuda_match_the_cpu() -> None:
    cls = get_benchmark("toy")
    cpu = cls(cls.make_config("smoke"), seed=2).run(10_000)
    gpu = cls(cls.make_config("smoke", {"device": "cuda"}), seed=2).run(10_000)
    assert [(r["step"], r["metric"]) for r in cpu] == [(r["step"], r["metric"]) for r in gpu]
    for a, b in zip(cpu, gpu):
        assert b["value"] == pytest.approx(a["value"], rel=1e-3, abs=1e-5)


@needs_cuda
def test_bitflip_and_cloning_run_on_cuda() -> None:
    bitflip = get_benchmark("bitflip")
    bench = bitflip(bitflip.make_config("smoke", {"device": "cuda", "num_steps": 600, "monitor_every": 300}), seed=0)
    rows = bench.run(600)
    assert bench.engine == "autograd" and rows and all(p.is_cuda for p in bench.model.parameters())
    cloning = get_benchmark("cloning")
    bench = cloning(cloning.make_config("smoke", {"device": "cuda", "dataset": "digits", "train_size": 300,
                                                   "hidden": (8,), "probe_size": 40, "base_steps": 6,
                                                   "paired_steps": 6, "log_every": 6}), seed=0)
    rows = bench.run(12)
    assert rows and bench.clone is not None and all(p.is_cuda for p in bench.clone.parameters())


@needs_cuda
def test_monitor_on_cuda_matches_the_cpu() -> None:
    from lopkit.diagnostics.monitor import Monitor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    cpu = Monitor(model).measure(x, y, nn.CrossEntropyLoss())
    model.cuda()
    gpu = Monitor(model).measure(x.cuda(), y.cuda(), nn.CrossEntropyLoss())
    assert [(r["layer"], r["metric"]) for r in cpu] == [(r["layer"], r["metric"]) for r in gpu]
    for a, b in zip(cpu, gpu):
        assert b["value"] == pytest.approx(a["value"], rel=1e-3, abs=1e-4), (a["layer"], a["metric"])


@needs_cuda
def test_vectorised_bitflip_seeds_on_cuda() -> None:
    from lopkit.benchmarks.vmap_seeds import run_bitflip_seeds

    bitflip = get_benchmark("bitflip")
    config = bitflip.make_config("smoke", {"device": "cuda", "num_steps": 200, "monitor_every": 0})
    rows = run_bitflip_seeds(config, [0, 1, 2], engine="func")
    cpu = run_bitflip_seeds(bitflip.make_config("smoke", {"num_steps": 200, "monitor_every": 0}), [0, 1, 2],
                            engine="func")
    for seed in (0, 1, 2):
        assert [r["value"] for r in rows[seed]] == pytest.approx([r["value"] for r in cpu[seed]], rel=1e-3)
