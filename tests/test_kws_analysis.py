"""The keyword-part occlusion test (lopkit.kws.analysis): spans, the occlusion value, and that it tells a model
that remembers the keyword's start from one that hears only its last frames."""

from __future__ import annotations

import pytest
import torch

PHONES = [["sil", 0.05, 0.28, -1, 0], ["h", 0.30, 0.38, 0, 1], ["eI", 0.38, 0.45, 0, 1], ["k", 0.45, 0.60, 1, 1],
          ["er", 0.60, 0.70, 1, 1], ["s", 0.75, 0.80, 2, 0]]


def test_keyword_parts_and_control_span():
    from lopkit.kws.analysis import control_span, keyword_parts

    parts = keyword_parts(PHONES)
    assert parts == {"first_word": (30, 45), "first_phone": (30, 38), "last_phone": (60, 70)}
    assert control_span(parts["first_word"], 30) == (10, 25)
    assert control_span(parts["first_word"], 12) is None  # no room before the keyword
    assert keyword_parts([["a", 0.1, 0.2, 0, 0]]) is None


def test_occlude_sets_the_span_to_the_clips_noise_floor():
    from lopkit.kws.analysis import occlude

    feats = torch.arange(40.0).reshape(2, 20)
    out = occlude(feats, (5, 8))
    floor = torch.quantile(feats, 0.1, dim=-1)
    assert torch.equal(out[:, 5:8], floor[:, None].expand(2, 3))
    assert torch.equal(out[:, :5], feats[:, :5]) and torch.equal(out[:, 8:], feats[:, 8:])
    assert torch.equal(feats, torch.arange(40.0).reshape(2, 20))  # the input is left alone


class _MeanEvidence(torch.nn.Module):
    """A causal toy spotter: logit_t = 10 x (mean of mel bin 0 over the last ``memory`` frames) - 5."""

    def __init__(self, memory: int):
        super().__init__()
        self.memory = memory

    def forward(self, feats):
        evidence = torch.nn.functional.pad(feats[:, 0], (self.memory - 1, 0))
        mean = evidence.unfold(-1, self.memory, 1).mean(-1)
        return {"detect": 10 * mean - 5}


def _clips(n: int = 6):
    rng = torch.Generator().manual_seed(0)
    feats = 0.01 * torch.rand(n, 4, 120, generator=rng)
    feats[:, 0, 30:70] += 1.0  # the keyword: frames 30-69
    start = torch.full((n,), 0.30, dtype=torch.float64)
    end = torch.full((n,), 0.70, dtype=torch.float64)
    return feats, start, end, [PHONES] * n


@pytest.mark.parametrize("memory,first_word_rate", [(40, 0.0), (5, 1.0)])
def test_occlusion_separates_a_model_that_remembers_the_start(memory, first_word_rate):
    from lopkit.kws.analysis import occlusion_test

    feats, start, end, phones = _clips()
    threshold = float(torch.sigmoid(torch.tensor(2.8)))
    result = occlusion_test(_MeanEvidence(memory), "heimdal", feats, start, end, phones, None, threshold,
                            smooth_frames=1, accept_frames=20)
    assert result["n"] == 6
    assert result["intact"]["rate"] == 1.0 and result["control"]["rate"] == 1.0
    assert result["first_word"]["rate"] == first_word_rate
    # the long-memory model also needs the end: occluding the last phone costs it the trigger too
    assert result["last_phone"]["rate"] == (0.0 if memory == 40 else 1.0)
    assert result["first_phone"]["rate"] == 1.0  # 8 of 40 frames gone: both still pass
    assert result["intact"]["rate_at_median"] == 0.5  # every intact peak ties at the median


def test_occlusion_needs_usable_positives():
    from lopkit.kws.analysis import occlusion_test

    feats, start, end, phones = _clips(2)
    start[:] = float("nan")
    with pytest.raises(ValueError, match="no positive clip"):
        occlusion_test(_MeanEvidence(5), "heimdal", feats, start, end, phones, None, 0.5)
