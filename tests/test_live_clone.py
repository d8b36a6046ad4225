"""live_clone_fraction: centred similarity, dead units excluded, denominator all units (hand examples)."""

from __future__ import annotations

import pytest
import torch

from lopkit.diagnostics.similarity import duplicate_fraction, live_clone_fraction


def test_live_clone_fraction_hand_example():
    # columns: a live pair (unit 0 = unit 1 / 2), two dead units with the same small wiggle, and an offset pair
    # that is uncentred-cosine similar (~1) but uncorrelated once centred
    h = torch.tensor(
        [
            [1.0, 2.0, -5.0, -4.0, 10.0, 10.0],
            [2.0, 4.0, -5.1, -4.1, 10.1, 10.0],
            [3.0, 6.0, -5.0, -4.0, 10.0, 10.1],
            [4.0, 8.0, -5.2, -4.2, 10.1, 10.1],
        ]
    )
    dead = torch.tensor([False, False, True, True, False, False])
    # paper rule (uncentred cosine > 0.98): units 0, 2 and 4 have a later duplicate
    assert duplicate_fraction(h, 0.98) == pytest.approx(3 / 6)
    # centred, dead excluded: only unit 0 (Pearson 1 with unit 1); units 4/5 have Pearson 0
    assert live_clone_fraction(h, 0.98, dead) == pytest.approx(1 / 6)
    # without the dead mask the dead pair's identical wiggle counts as a clone too
    assert live_clone_fraction(h, 0.98) == pytest.approx(2 / 6)


def test_live_clone_fraction_checks_mask_size_and_threshold():
    h = torch.randn(8, 3)
    with pytest.raises(ValueError, match="dead mask"):
        live_clone_fraction(h, 0.98, torch.tensor([True, False]))
    with pytest.raises(ValueError):
        live_clone_fraction(h, 1.5)
