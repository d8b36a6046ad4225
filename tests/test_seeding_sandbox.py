"""lopkit.seeding's RNG sandbox: the one way to keep draws from the global generators apart."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from lopkit.benchmarks.base import PrivateRNG, seed_everything
from lopkit.seeding import RNGSandbox, capture_rng_state, restore_rng_state, rng_sandbox

SRC = Path(__file__).resolve().parents[1] / "src" / "lopkit"


def _draw() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_sandbox_leaves_no_trace_outside():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = _draw()
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    with rng_sandbox():
        inside = _draw()
        torch.manual_seed(99)
    assert inside == expected
    assert _draw() == expected  # the body's draws and reseeding are undone


def test_rng_sandbox_restores_after_an_exception():
    before = capture_rng_state()
    try:
        with rng_sandbox():
            _draw()
            raise KeyError("stop")
    except KeyError:
        pass
    after = capture_rng_state()
    assert torch.equal(before["torch"], after["torch"]) and before["python"] == after["python"]


def test_private_sandbox_advances_only_inside():
    sandbox = RNGSandbox(capture_rng_state())
    outside = capture_rng_state()
    with sandbox.active():
        first = _draw()
    with sandbox.active():
        second = _draw()
    assert first != second  # the private state advanced between the two visits
    assert torch.equal(capture_rng_state()["torch"], outside["torch"])
    restore_rng_state(outside)
    assert _draw() == first  # it started from the state it was given


def test_private_rng_equals_seed_everything():
    private = PrivateRNG(7)
    with private.active():
        got = _draw()
    with rng_sandbox():
        seed_everything(7)
        expected = _draw()
    assert got == expected


def test_no_other_rng_sandbox_in_the_library():
    """Static guard: global RNG state is saved and restored only through lopkit.seeding."""
    allowed = {"seeding.py"}
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if str(p.relative_to(SRC)) not in allowed
                 and any(s in p.read_text() for s in ("fork_rng(", "random.getstate()", "torch.get_rng_state()"))]
    assert offenders == []
