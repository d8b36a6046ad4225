"""Tests for lopkit.data.bitflip: teacher thresholds, flip schedule, resume and the vectorised path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from lopkit.data.bitflip import BitFlipConfig, BitFlipStream, ltu_thresholds

SMALL = BitFlipConfig(flip_period=100)  # paper sizes, but a flip every 100 steps so tests see many flips


def _brute_force_thresholds(weights: np.ndarray, beta: float, rule: str) -> list[float]:
    """theta_i computed with Python loops from the rule's definition (last weight column = bias)."""
    out = []
    for row in weights:
        bits, bias = [float(w) for w in row[:-1]], float(row[-1])
        negatives = sum(1 for w in bits if w < 0)
        if rule == "count_with_bias":
            s = negatives + (1 if bias < 0 else 0)
        elif rule == "dohare_code":
            s = (len(bits) - sum(bits) + bias) / 2  # literal FixLTUNet formula
        else:
            s = negatives - 0.5 * bias
        out.append((len(bits) + 1) * beta - s)
    return out


@pytest.mark.parametrize("rule", ["count_with_bias", "dohare_code", "spec_text"])
def test_thresholds_match_brute_force(rule):
    stream = BitFlipStream(BitFlipConfig(threshold_rule=rule), seed=3)
    w = stream.input_weights.numpy()
    assert w.shape == (100, 21) and set(np.unique(w)) == {-1.0, 1.0}
    np.testing.assert_allclose(stream.thresholds.numpy(), _brute_force_thresholds(w, 0.7, rule), atol=1e-5)
    np.testing.assert_allclose(ltu_thresholds(stream.input_weights, 0.7, rule).numpy(), stream.thresholds.numpy())


def test_spec_text_rule_is_count_rule_shifted_by_half():
    w = BitFlipStream(seed=0).input_weights
    diff = ltu_thresholds(w, 0.7, "spec_text") - ltu_thresholds(w, 0.7, "count_with_bias")
    torch.testing.assert_close(diff, torch.full((100,), 0.5))


def test_targets_match_brute_force_teacher():
    stream = BitFlipStream(seed=5)
    x, y = stream.next_batches(300)
    w, theta = stream.input_weights.tolist(), stream.thresholds.tolist()
    w_out, b_out = stream.output_weights.tolist(), float(stream.output_bias)
    for xi, yi in zip(x.tolist(), y[:, 0].tolist()):
        h = [1.0 if sum(a * b for a, b in zip(wi, xi)) >= t else 0.0 for wi, t in zip(w, theta)]
        assert yi == sum(a * b for a, b in zip(w_out, h)) + b_out
    assert set(np.unique(stream.output_weights.numpy())) <= {-1.0, 1.0} and float(stream.output_bias) in (-1.0, 1.0)
    assert float(y.std()) > 0.1  # the teacher is not constant on this distribution


def _flip_changes(x: torch.Tensor, f: int) -> torch.Tensor:
    """Number of flipping bits that changed between consecutive rows (rows = steps)."""
    return (x[1:, :f] != x[:-1, :f]).sum(dim=1)


@pytest.mark.parametrize("config", [SMALL, BitFlipConfig()], ids=["T=100", "T=10000"])
def test_exactly_one_flipping_bit_changes_at_each_boundary(config):
    stream = BitFlipStream(config, seed=1)
    n = 3 * config.flip_period + 17
    x, _ = stream.next_batches(n)
    changes = _flip_changes(x, config.num_flipping_bits)
    steps = torch.arange(1, n)  # row r of `changes` compares step r-1 with step r
    at_boundary = steps % config.flip_period == 0
    assert torch.all(changes[at_boundary] == 1)
    assert torch.all(changes[~at_boundary] == 0)
    assert stream.num_flips == 3


def test_flip_schedule_in_step_by_step_path_and_state_is_for_next_step():
    stream = BitFlipStream(SMALL, seed=2)
    previous = None
    for step in range(350):
        before = stream.flip_bits
        x, _ = stream.next_batch(1)
        assert torch.equal(x[0, :15], before)  # the batch uses the state reported before the call
        if previous is not None:
            changed = int((x[0, :15] != previous).sum())
            assert changed == (1 if step % 100 == 0 else 0)
        previous = x[0, :15]
    assert stream.step == 350 and stream.num_flips == 3


def test_random_bits_vary_and_bias_column_is_constant():
    x, _ = BitFlipStream(SMALL, seed=4).next_batches(2000)
    random_part = x[:, 15:20]
    means = random_part.mean(0)
    assert torch.all((means > 0.4) & (means < 0.6))
    assert torch.all((random_part[1:] != random_part[:-1]).float().mean(0) > 0.4)  # resampled every step
    assert torch.all(x[:, 20] == 1.0)
    assert set(torch.unique(x).tolist()) == {0.0, 1.0}


def test_vectorised_path_equals_step_path():
    fast, slow = BitFlipStream(SMALL, seed=9), BitFlipStream(SMALL, seed=9)
    xs, ys = [], []
    for chunk in [37, 1, 250, 100, 612]:  # crosses boundaries, lands exactly on some
        x, y = fast.next_batches(chunk)
        xs.append(x)
        ys.append(y)
    x_fast, y_fast = torch.cat(xs), torch.cat(ys)
    steps = [slow.next_batch(1) for _ in range(len(x_fast))]
    torch.testing.assert_close(x_fast, torch.cat([s[0] for s in steps]), rtol=0, atol=0)
    torch.testing.assert_close(y_fast, torch.cat([s[1] for s in steps]), rtol=0, atol=0)
    assert (fast.step, fast.num_flips, fast.last_flipped_bit) == (slow.step, slow.num_flips, slow.last_flipped_bit)
    assert torch.equal(fast.flip_bits, slow.flip_bits)
    assert torch.equal(fast.next_batch(1)[0], slow.next_batch(1)[0])


def test_resume_reproduces_the_stream():
    original = BitFlipStream(SMALL, seed=21)
    original.next_batches(1234)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    expected = [original.next_batch(1) for _ in range(150)] + [original.next_batches(400)]
    resumed = BitFlipStream(SMALL, seed=999)  # different seed: everything must come from the state
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert resumed.step == 1234
    got = [resumed.next_batch(1) for _ in range(150)] + [resumed.next_batches(400)]
    for (xe, ye), (xg, yg) in zip(expected, got):
        assert torch.equal(xe, xg) and torch.equal(ye, yg)


def test_load_state_rejects_other_config():
    state = BitFlipStream(SMALL, seed=0).state_dict()
    with pytest.raises(ValueError, match="config"):
        BitFlipStream(BitFlipConfig(), seed=0).load_state_dict(state)


def test_probe_batch_is_fixed_current_and_does_not_advance():
    stream = BitFlipStream(SMALL, seed=6)
    twin = BitFlipStream(SMALL, seed=6)
    stream.next_batches(150)
    twin.next_batches(150)
    x1, y1 = stream.probe_batch(128, seed=0)
    x2, _ = stream.probe_batch(128, seed=0)
    assert x1.shape == (128, 21) and y1.shape == (128, 1)
    assert torch.equal(x1, x2) and not torch.equal(x1, stream.probe_batch(128, seed=1)[0])
    assert torch.all(x1[:, :15] == stream.flip_bits)
    assert stream.step == 150 and torch.equal(stream.next_batch(1)[0], twin.next_batch(1)[0])


def test_minibatch_shares_one_step():
    stream = BitFlipStream(SMALL, seed=8)
    x, y = stream.next_batch(16)
    assert x.shape == (16, 21) and y.shape == (16, 1) and stream.step == 1
    assert torch.all(x[:, :15] == x[0, :15])


def test_seeds_give_different_teachers():
    a, b = BitFlipStream(seed=0), BitFlipStream(seed=1)
    assert not torch.equal(a.input_weights, b.input_weights)
    assert torch.equal(a.input_weights, BitFlipStream(seed=0).input_weights)


@pytest.mark.parametrize("flipping", [0, 6])
def test_edge_sizes(flipping):
    config = BitFlipConfig(num_bits=6, num_flipping_bits=flipping, flip_period=5, hidden_units=7)
    fast, slow = BitFlipStream(config, seed=0), BitFlipStream(config, seed=0)
    x, y = fast.next_batches(23)
    assert x.shape == (23, 7) and y.shape == (23, 1)
    assert torch.equal(x, torch.cat([slow.next_batch(1)[0] for _ in range(23)]))
    assert fast.num_flips == (4 if flipping else 0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_flipping_bits=21), dict(num_bits=0), dict(flip_period=0), dict(hidden_units=0),
     dict(threshold_rule="other"), dict(beta=float("nan")), dict(num_flipping_bits=-1)],
)  # fmt: skip
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        BitFlipConfig(**kwargs)


def test_bad_call_arguments():
    stream = BitFlipStream(SMALL)
    for call in (lambda: stream.next_batch(0), lambda: stream.next_batches(0), lambda: stream.probe_batch(0)):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError, match="x must be"):
        stream.targets(torch.zeros(3, 20))


def test_redraw_mode_redraws_all_slow_bits_and_vectorised_path_matches():
    config = BitFlipConfig(flip_period=50, flip_mode="redraw")
    slow, fast = BitFlipStream(config, seed=2), BitFlipStream(config, seed=2)
    xs = torch.cat([slow.next_batch(1)[0] for _ in range(400)])
    xf, _ = fast.next_batches(400)
    assert torch.equal(xs, xf)
    states = {tuple(xs[k * 50, :15].tolist()) for k in range(8)}
    assert len(states) > 2  # new slow bits at boundaries
    changed = [(xs[k * 50, :15] != xs[k * 50 - 1, :15]).sum().item() for k in range(1, 8)]
    assert max(changed) > 1  # more than one bit can change at a boundary (unlike flip_mode="one")
    assert all((xs[k * 50 : (k + 1) * 50, :15] == xs[k * 50, :15]).all() for k in range(8))
    with pytest.raises(ValueError, match="flip_mode"):
        BitFlipConfig(flip_mode="sometimes")
