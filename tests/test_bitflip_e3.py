"""E3 fidelity: paper/dohare presets, run probe, live-clone rows, lean engine with hooks and the T5 method switch."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from lopkit.benchmarks.bitflip import BitFlipBenchmark, lean_supports, run_probe_steps, stream_config
from lopkit.configs import ConfigError
from lopkit.data.bitflip import BitFlipStream, run_inputs_at
from lopkit.mitigations.registry import build_methods

SMALL = {"width": 12, "num_steps": 1700, "flip_period": 300, "bin_size": 250, "monitor_every": 500, "block_size": 128}


def make(overrides: dict | None = None, seed: int = 0, method=None, preset: str = "smoke") -> BitFlipBenchmark:
    """A small bit-flipping benchmark (seconds)."""
    config = BitFlipBenchmark.make_config(preset, {**SMALL, **(overrides or {})})
    return BitFlipBenchmark(config, seed, method)


def all_rows(bench: BitFlipBenchmark, chunk: int = 10_000) -> list[dict]:
    rows: list[dict] = []
    while not bench.done:
        rows += bench.run(chunk)
    return rows


def test_paper_and_dohare_presets_follow_their_references():
    paper = BitFlipBenchmark.make_config("paper")
    assert (paper.threshold_rule, paper.constant_input, paper.probe) == ("spec_text", True, "run")
    assert (paper.num_steps, paper.flip_period, paper.monitor_every, paper.duplicate_threshold) == (
        5_000_000, 10_000, 1000, 0.98)
    default = BitFlipBenchmark.make_config("default")
    assert (default.threshold_rule, default.constant_input, default.probe) == ("spec_text", True, "run")
    dohare = BitFlipBenchmark.make_config("dohare")
    assert (dohare.threshold_rule, dohare.constant_input, dohare.flip_mode) == ("dohare_code", False, "redraw")
    for preset in BitFlipBenchmark.presets:
        assert BitFlipBenchmark.make_config(preset).threshold_rule != "count_with_bias"


def test_dohare_learner_sees_m_inputs_and_trains():
    bench = make({"num_steps": 600, "monitor_every": 300}, preset="dohare")
    assert bench.model.fc1.in_features == bench.config.num_bits
    rows = all_rows(bench)
    assert any(r["metric"] == "online_mse" for r in rows)
    paper = make({"num_steps": 600, "monitor_every": 300}, preset="paper")
    assert paper.model.fc1.in_features == paper.config.num_bits + 1


def test_run_probe_rows_are_inputs_of_the_run():
    bench = make({"probe_size": 16})
    steps = run_probe_steps(bench.config, 0)
    assert len(set(steps.tolist())) == 16 and int(steps.max()) < bench.config.num_steps
    stream = BitFlipStream(stream_config(bench.config), 0)
    x, _ = stream.next_batches(bench.config.num_steps)
    assert torch.equal(bench.run_probe_inputs, x[steps])
    # past and future flip states: the probe spans several flip periods
    assert len({int(s) // bench.config.flip_period for s in steps}) > 1
    other = make({"probe_size": 16}, seed=1)
    assert not torch.equal(run_probe_steps(other.config, 1), steps)


@pytest.mark.parametrize("flip_mode", ["one", "redraw"])
def test_run_inputs_at_matches_stream_in_any_order(flip_mode):
    config = stream_config(BitFlipBenchmark.make_config("smoke", {**SMALL, "flip_mode": flip_mode}))
    stream = BitFlipStream(config, 4)
    x, _ = stream.next_batches(3000)
    idx = torch.tensor([2999, 0, 299, 300, 1500, 0])
    assert torch.equal(run_inputs_at(config, 4, idx), x[idx])


def test_clone_rows_on_both_layers():
    rows = all_rows(make())
    step_rows = {(r["layer"], r["metric"]) for r in rows if r["step"] == 500}
    for key in [("fc1", "duplicate_fraction"), ("act1", "duplicate_fraction"), ("fc1", "live_clone_fraction"),
                ("act1", "live_clone_fraction"), ("fc1", "dead_duplicate_fraction"), ("fc1", "effective_rank")]:
        assert key in step_rows


def test_lean_engine_with_cbp_matches_autograd_engine():
    def run(engine):
        bench = make({"engine": engine, "num_steps": 800, "monitor_every": 400, "width": 8}, seed=2,
                     method=build_methods("cbp:replacement_rate=0.01:maturity=20"))
        rows = all_rows(bench)
        return bench, rows

    lean, lean_rows = run("lean")
    auto, auto_rows = run("autograd")
    assert lean.engine == "lean" and auto.engine == "autograd"
    assert lean.method.total_replaced == auto.method.total_replaced > 0
    for p, q in zip(lean.model.parameters(), auto.model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5)
    a = [r["value"] for r in lean_rows if r["metric"] == "online_mse"]
    b = [r["value"] for r in auto_rows if r["metric"] == "online_mse"]
    np.testing.assert_allclose(a, b, rtol=1e-4)


def test_lean_engine_with_loss_term_matches_autograd_engine():
    def run(engine):
        bench = make({"engine": engine, "num_steps": 500, "monitor_every": 0, "width": 8}, seed=3,
                     method=build_methods("l2init:strength=0.5"))
        all_rows(bench)
        return bench

    lean, auto = run("lean"), run("autograd")
    for p, q in zip(lean.model.parameters(), auto.model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", ["layernorm", "dropout", "crelu", "regrama", "infer", "cchain",
                                  "cbp+regrama"])
def test_gradient_editing_and_architectural_methods_need_autograd(spec):
    bench = make(method=build_methods(spec))
    assert bench.engine == "autograd" and not lean_supports(bench.method, bench.model)
    with pytest.raises(ConfigError, match="lean"):
        make({"engine": "lean"}, method=build_methods(spec))


SWITCH = {"num_steps": 1700, "switch_step": 900, "switch_method": "cbp_aggressive:maturity=20"}


def test_switch_changes_method_at_the_step():
    bench = make(SWITCH)
    bench.run(900)
    assert not bench.switched and bench.step == 900
    before = {k: v.clone() for k, v in bench.model.state_dict().items()}
    bench.run(50)
    assert bench.switched and bench.method.name == "cbp_aggressive"
    assert bench.method.total_replaced > 0  # maturity 20 reached within 50 steps
    assert not torch.equal(before["head.weight"], bench.model.state_dict()["head.weight"])


def test_interrupted_run_across_the_switch_gives_the_uninterrupted_rows():
    reference = all_rows(make(SWITCH))
    for stop in (600, 900, 1300):  # checkpoint before, at and after the switch
        first = make(SWITCH)
        rows = first.run(stop)
        state = first.state_dict()
        resumed = make(SWITCH)
        resumed.load_state_dict(state)
        assert resumed.switched == (stop > 900)
        rows += all_rows(resumed, chunk=333)
        assert rows == reference


def test_switch_config_is_validated():
    with pytest.raises(ConfigError, match="together"):
        make({"switch_step": 100})
    with pytest.raises(ConfigError):
        make({"switch_step": 100, "switch_method": "no_such_method"})
    with pytest.raises(ConfigError, match="lean"):
        make({"switch_step": 100, "switch_method": "upgd", "engine": "lean"})
    with pytest.raises(ConfigError, match="architecture"):
        make({"switch_step": 100, "switch_method": "layernorm"})
    with pytest.raises(ConfigError, match="below num_steps"):
        make({"switch_step": 5000, "switch_method": "cbp"})


def test_clone_rows_count_dead_duplicates_and_live_clones_by_hand():
    from lopkit.benchmarks.bitflip import build_learner, clone_rows

    config = BitFlipBenchmark.make_config("smoke", {"width": 4})
    model = build_learner(config, 0)
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(config.num_bits + 1, generator=gen) + 0.1  # positive weights: positive pre-activations
    with torch.no_grad():
        model.fc1.weight.copy_(torch.stack([-w, -2 * w, w, 3 * w]))  # 0, 1: dead and parallel; 2, 3: live clones
        model.fc1.bias.zero_()
    inputs = torch.cat([torch.randint(0, 2, (64, config.num_bits), generator=gen).float(), torch.ones(64, 1)], 1)
    rows = {(r["layer"], r["metric"]): r["value"] for r in clone_rows(model, inputs, config, step=0)}
    assert rows[("fc1", "dead_duplicate_fraction")] == pytest.approx(1 / 4)  # unit 0 (its later twin is unit 1)
    assert rows[("fc1", "live_clone_fraction")] == pytest.approx(1 / 4)  # unit 2 (Pearson 1 with unit 3)
    assert rows[("act1", "live_clone_fraction")] == pytest.approx(1 / 4)
