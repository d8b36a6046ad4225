"""Tests of the bit-flipping benchmark (E3): resumability, chunk independence, lean engine, hooks, config."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

from lopkit.benchmarks.base import BENCHMARKS, ROW_KEYS
from lopkit.benchmarks.bitflip import BitFlipBenchmark, build_learner, learner_layers, probe_batch, stream_config
from lopkit.configs import ConfigError
from lopkit.data.bitflip import BitFlipStream
from lopkit.mitigations.base import Mitigation

SMALL = {"width": 12, "num_steps": 1700, "flip_period": 300, "bin_size": 250, "monitor_every": 500, "block_size": 128}


def make(overrides: dict | None = None, seed: int = 0, method=None) -> BitFlipBenchmark:
    """A small bit-flipping benchmark (seconds)."""
    config = BitFlipBenchmark.make_config("smoke", {**SMALL, **(overrides or {})})
    return BitFlipBenchmark(config, seed, method)


def run_in_chunks(bench: BitFlipBenchmark, chunks: list[int]) -> list[dict]:
    """All rows from running ``bench`` chunk by chunk, then to the end."""
    rows: list[dict] = []
    for n in chunks:
        rows += bench.run(n)
    while not bench.done:
        rows += bench.run(10_000)
    return rows


def rows_equal(a: list[dict], b: list[dict]) -> bool:
    """Row lists equal, treating NaN values as equal to each other."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if {k: v for k, v in x.items() if k != "value"} != {k: v for k, v in y.items() if k != "value"}:
            return False
        if not (x["value"] == y["value"] or (np.isnan(x["value"]) and np.isnan(y["value"]))):
            return False
    return True


def test_registered_with_presets():
    assert BENCHMARKS["bitflip"] is BitFlipBenchmark
    for preset in ("smoke", "default", "paper"):
        BitFlipBenchmark.make_config(preset)
    paper = BitFlipBenchmark.make_config("paper")
    assert (paper.num_steps, paper.flip_period, paper.lr, paper.probe_size) == (5_000_000, 10_000, 0.01, 128)
    assert (paper.num_bits, paper.num_flipping_bits, paper.teacher_width, paper.beta) == (20, 15, 100, 0.7)


def test_rows_schema_bins_and_monitor_schedule():
    bench = make()
    rows = run_in_chunks(bench, [])
    assert all(tuple(r) == ROW_KEYS for r in rows)
    mse = [r for r in rows if r["metric"] == "online_mse"]
    # Bins every 250 steps plus the final partial bin at 1700.
    assert [r["step"] for r in mse] == [250, 500, 750, 1000, 1250, 1500, 1700]
    assert all(r["task"] == r["step"] // 300 and r["layer"] == "model" for r in mse)
    rank_steps = [r["step"] for r in rows if r["metric"] == "effective_rank" and r["layer"] == "act1"]
    assert rank_steps == [0, 500, 1000, 1500]
    metrics = {(r["layer"], r["metric"]) for r in rows}
    expected = [("act1", "dead_fraction"), ("act1", "duplicate_fraction"), ("fc1", "weight_norm"), ("model", "loss")]
    assert set(expected) <= metrics


def test_chunking_does_not_change_rows():
    whole = run_in_chunks(make(), [])
    chunked = run_in_chunks(make(), [1, 249, 1, 333, 0, 500, 77])
    assert rows_equal(whole, chunked)


def test_block_size_does_not_change_rows():
    assert rows_equal(run_in_chunks(make({"block_size": 4096}), []), run_in_chunks(make({"block_size": 7}), []))


def test_resume_from_state_dict_is_exact():
    reference = make(seed=3)
    expected = run_in_chunks(reference, [])

    first = make(seed=3)
    rows = first.run(613)  # mid-bin, mid-flip period
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    first.run(200)  # the saved state must not move with the live run
    buffer.seek(0)
    resumed = make(seed=3)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    rows += run_in_chunks(resumed, [])
    assert rows_equal(expected, rows)
    for p, q in zip(reference.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def _autograd_reference(config, seed: int, n_steps: int) -> tuple[nn.Module, list[float]]:
    """Independent plain PyTorch loop: model from build_learner, SGD, MSE, batch-1 stream."""
    model = build_learner(config, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    stream = BitFlipStream(stream_config(config), seed)
    losses = []
    for _ in range(n_steps):
        x, y = stream.next_batch(1)
        loss = ((model(x) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model, losses


@pytest.mark.parametrize("engine", ["lean", "autograd"])
def test_engines_match_plain_autograd_loop(engine):
    n_steps = 600
    bench = make({"engine": engine, "num_steps": n_steps, "bin_size": 200, "monitor_every": 0, "width": 20}, seed=5)
    assert bench.engine == engine
    rows = bench.run(n_steps)
    model, losses = _autograd_reference(bench.config, 5, n_steps)
    for p, q in zip(bench.model.parameters(), model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    bins = [r["value"] for r in rows if r["metric"] == "online_mse"]
    expected = [float(np.mean(losses[i : i + 200])) for i in range(0, n_steps, 200)]
    np.testing.assert_allclose(bins, expected, rtol=1e-5)


def test_learner_init_is_kaiming_uniform_with_zero_biases():
    config = BitFlipBenchmark.make_config("smoke", {"width": 400})
    hidden, activation, output = learner_layers(build_learner(config, 0))
    assert isinstance(activation, nn.ReLU) and hidden.weight.shape == (400, 21) and output.weight.shape == (1, 400)
    assert float(hidden.bias.abs().max()) == 0.0 and float(output.bias.abs().max()) == 0.0
    bound_hidden, bound_output = np.sqrt(6 / 21), np.sqrt(3 / 400)  # gain sqrt(2) (ReLU) and 1 (linear)
    assert float(hidden.weight.abs().max()) <= bound_hidden
    assert float(hidden.weight.abs().max()) > 0.95 * bound_hidden  # uniform over the full range
    assert float(output.weight.abs().max()) <= bound_output
    assert torch.equal(learner_layers(build_learner(config, 0))[0].weight, hidden.weight)
    assert not torch.equal(learner_layers(build_learner(config, 1))[0].weight, hidden.weight)


class Recorder(Mitigation):
    """Records the hook calls it receives."""

    name = "recorder"

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def attach(self, model, optimizer):
        self.calls.append(("attach", -1))

    def on_task_start(self, model, optimizer, task):
        self.calls.append(("task", task))

    def loss_term(self, model):
        self.calls.append(("loss", -1))
        return None

    def before_step(self, model, optimizer, step):
        assert all(p.grad is not None for p in model.parameters())
        self.calls.append(("before", step))

    def after_step(self, model, optimizer, step):
        self.calls.append(("after", step))


def test_mitigation_hooks_are_called_in_order():
    recorder = Recorder()
    bench = make({"num_steps": 650, "monitor_every": 0}, method=recorder)
    assert bench.engine == "autograd"
    bench.run(650)
    calls = recorder.calls
    assert calls[0] == ("attach", -1)
    assert [c for c in calls if c[0] == "task"] == [("task", 0), ("task", 1), ("task", 2)]
    assert [c[1] for c in calls if c[0] == "before"] == list(range(650))
    assert [c[1] for c in calls if c[0] == "after"] == list(range(650))
    first_step = calls[1:5]
    assert first_step == [("task", 0), ("loss", -1), ("before", 0), ("after", 0)]


def test_noop_method_list_uses_lean_engine_and_lean_with_method_is_an_error():
    assert make(method=[]).engine == "lean"
    assert make(method=[Mitigation()]).engine == "lean"
    with pytest.raises(ConfigError, match="lean"):
        make({"engine": "lean"}, method=Recorder())


def test_loss_term_changes_training_but_not_online_mse_definition():
    class L2(Mitigation):
        name = "l2"

        def loss_term(self, model):
            return 0.0 * sum((p**2).sum() for p in model.parameters())

    with_term = run_in_chunks(make({"monitor_every": 0}, method=L2()), [])
    plain = run_in_chunks(make({"monitor_every": 0, "engine": "autograd"}), [])
    np.testing.assert_allclose([r["value"] for r in with_term], [r["value"] for r in plain], rtol=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        {"width": 0},
        {"num_flipping_bits": 21},
        {"lr": -0.1},
        {"bin_size": 0},
        {"monitor_every": -1},
        {"probe_size": 1},
        {"threshold_rule": "nope"},
        {"monitor_metrics": ("effective_rank", "not_a_metric")},
        {"engine": "fast"},
        {"widht": 10},
        {"width": "ten"},
    ],
)
def test_bad_config_raises_config_error(overrides):
    with pytest.raises(ConfigError):
        BitFlipBenchmark.make_config("smoke", overrides)


def test_run_never_passes_total_and_monitor_off():
    bench = make({"monitor_every": 0, "num_steps": 300})
    rows = bench.run(10_000)
    assert bench.step == 300 and bench.done
    assert bench.run(10) == []
    assert {r["metric"] for r in rows} == {"online_mse"}


def test_state_dict_is_a_copy():
    bench = make({"monitor_every": 0})
    bench.run(100)
    state = bench.state_dict()
    saved = copy.deepcopy(state["model"])
    bench.run(100)
    for key, value in state["model"].items():
        assert torch.equal(value, saved[key])


class RandomKick(Mitigation):
    """Draws from the global torch RNG after every step (like a reset method would)."""

    name = "kick"

    def after_step(self, model, optimizer, step):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-4)


def test_global_rng_is_private_to_the_benchmark():
    torch.manual_seed(123)
    first = run_in_chunks(make({"monitor_every": 0, "num_steps": 400}, method=RandomKick()), [])
    caller_draw = torch.rand(3)
    torch.manual_seed(999)  # a different caller state must not change the run
    noise = torch.rand(5)  # noqa: F841  (the caller consumes numbers between chunks)
    second = make({"monitor_every": 0, "num_steps": 400}, method=RandomKick())
    rows = second.run(150)
    torch.rand(7)
    rows += run_in_chunks(second, [])
    assert rows_equal(first, rows)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), caller_draw)  # the run did not consume the caller's numbers


def test_probes_current_and_uniform():
    bench = make({"probe": "uniform"})
    x0, y0 = probe_batch(bench.stream, bench.config)
    bench.run(700)  # two flips happen
    x1, y1 = probe_batch(bench.stream, bench.config)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)  # fixed whatever the flip state
    assert x0.shape == (128, 21) and bool((x0[:, -1] == 1).all())
    assert float(x0[:, :20].std(dim=0).min()) > 0  # every bit varies, flipping bits included
    stream = bench.stream
    hidden = ((x0 @ stream.input_weights.T) >= stream.thresholds).float()  # the teacher, computed here
    torch.testing.assert_close(y0[:, 0], hidden @ stream.output_weights + stream.output_bias)
    current_config = BitFlipBenchmark.make_config("smoke", {**SMALL, "probe": "current"})
    xc, _ = probe_batch(stream, current_config)
    assert float(xc[:, :15].std(dim=0).max()) == 0 and torch.equal(xc[0, :15], stream.flip_bits)
    assert float(xc[:, 15:20].std(dim=0).min()) > 0
