"""Causal BC-ResNet: parameter counts, causality, receptive field, streaming = offline, footprint-matched baseline."""

import types

import numpy as np
import pytest
import torch

from lopkit.configs import ConfigError
import lopkit.kws.model as model_module
from lopkit.kws.features import FeatureStats
from lopkit.kws.model import (
    BCResNetKWS,
    FramePhoneClassifier,
    StreamingModel,
    SubSpectralNorm,
    bcresnet_channels,
    channels_for_budget,
    count_bcresnet_params,
    count_parameters,
)


def _eval_model(tau=1, **kwargs):
    torch.manual_seed(0)
    model = BCResNetKWS(tau=tau, **kwargs)
    # non-trivial BN statistics so that eval-mode normalisation is not the identity
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("tau,published", [(1, 9000), (2, 26800), (3, 53500)])
def test_parameter_counts_match_closed_form_and_spec(tau, published):
    model = BCResNetKWS(tau=tau)
    n_params = count_parameters(model)
    assert n_params == count_bcresnet_params(bcresnet_channels(tau), 2)
    # spec 2.2: a causal re-implementation had 9.0k / 26.8k / 53.5k parameters
    assert abs(n_params - published) / published < 0.02
    assert count_parameters(FramePhoneClassifier(13, channels=(5, 3, 4, 6, 7, 9))) == count_bcresnet_params(
        (5, 3, 4, 6, 7, 9), 13
    )


def test_forward_shapes_heads_and_backward():
    model = BCResNetKWS(tau=1)
    out = model(torch.randn(3, 40, 57))
    assert set(out) == {"detect", "offset"} and out["detect"].shape == (3, 57) and out["offset"].shape == (3, 57)
    (out["detect"].sum() + out["offset"].sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    detect_only = BCResNetKWS(tau=1, heads=("detect",))
    assert set(detect_only(torch.randn(1, 40, 10))) == {"detect"}
    with pytest.raises(ValueError, match="40"):
        model(torch.randn(1, 30, 10))
    with pytest.raises(ConfigError):
        BCResNetKWS(tau=1, n_mels=50)
    with pytest.raises(ConfigError):
        BCResNetKWS(tau=1, heads=("detect", "start"))


def test_sub_spectral_norm_normalises_each_channel_sub_band_separately():
    norm = SubSpectralNorm(channels=2, sub_bands=5).train()
    x = torch.randn(4, 2, 20, 7) * torch.linspace(0.5, 5, 20).reshape(1, 1, 20, 1) + 3
    y = norm(x)
    for channel in range(2):
        for band in range(5):
            block = y[:, channel, 4 * band : 4 * band + 4]
            assert abs(float(block.detach().mean())) < 1e-5
            assert abs(float(block.detach().var(unbiased=False)) - 1) < 1e-3
    with pytest.raises(ValueError, match="sub-bands"):
        norm(torch.randn(1, 2, 12, 3))


def test_eval_outputs_are_causal():
    model = _eval_model()
    rf = model.receptive_field_frames
    assert rf == 1 + 4 + 2 * (2 * 1 + 2 * 2 + 4 * 4 + 4 * 8) + 4
    torch.manual_seed(1)
    x = torch.randn(1, 40, 300)
    base = model(x)["detect"][0]
    cut = 200
    future = x.clone()
    future[:, :, cut + 1 :] += torch.randn_like(future[:, :, cut + 1 :])
    changed = model(future)["detect"][0]
    assert torch.equal(base[: cut + 1], changed[: cut + 1])
    assert (base[cut + 1 :] - changed[cut + 1 :]).abs().max() > 0


def test_receptive_field_is_exact_in_the_linearised_network(monkeypatch):
    """With ReLU/SiLU replaced by the identity no unit can die, so d out[t] / d x[t'] is nonzero exactly for
    t - rf < t' <= t: the earliest frame an output reads is ``receptive_field_frames - 1`` frames back."""
    monkeypatch.setattr(model_module, "F", types.SimpleNamespace(relu=lambda v, inplace=False: v, silu=lambda v: v))
    model = _eval_model().double()
    rf = model.receptive_field_frames
    x = torch.randn(1, 40, 260, dtype=torch.float64, requires_grad=True)
    t_out = 200
    (grad,) = torch.autograd.grad(model(x)["detect"][0, t_out], x)
    reach = grad.abs().amax(dim=(0, 1))
    assert reach[t_out - rf + 1] > 0 and reach[t_out] > 0
    assert reach[: t_out - rf + 1].max() == 0
    assert reach[t_out + 1 :].max() == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_chunks_equal_full_forward(seed):
    model = _eval_model(tau=1)
    model.set_feature_stats(FeatureStats.fit(torch.randn(2, 40, 30) * 2 + 1))
    rng = np.random.default_rng(seed)
    x = torch.randn(2, 40, 260)
    with torch.no_grad():
        full = model(x)
    stream = StreamingModel(model)
    pieces, position = [], 0
    while position < x.shape[-1]:
        size = int(rng.choice([1, 2, 5, 17, 60]))
        pieces.append(stream(x[:, :, position : position + size]))
        position += size
    for head in ("detect", "offset"):
        streamed = torch.cat([piece[head] for piece in pieces], dim=1)
        assert float((streamed - full[head]).abs().max()) <= 1e-5
    stream.reset()
    again = stream(x[:, :, :40])["detect"]
    assert float((again - full["detect"][:, :40]).abs().max()) <= 1e-5
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        stream(x[:, :, :5])


def test_feature_stats_are_in_state_dict_and_applied():
    model = _eval_model(tau=1)
    x = torch.randn(1, 40, 50) * 4 + 2
    stats = FeatureStats.fit(x)
    reference = model(stats(x))["detect"]
    model.set_feature_stats(stats)
    torch.testing.assert_close(model(x)["detect"], reference)
    clone = BCResNetKWS(tau=1).eval()
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone(x)["detect"], reference)


@pytest.mark.parametrize("tau", [1, 2, 3])
def test_baseline_is_footprint_matched_within_three_percent(tau):
    budget = count_parameters(BCResNetKWS(tau=tau))
    for n_classes in (4, 13, 30):
        baseline = FramePhoneClassifier(n_classes, param_budget=budget)
        assert abs(count_parameters(baseline) - budget) / budget <= 0.03
        logits = baseline(torch.randn(2, 40, 9))
        assert logits.shape == (2, n_classes, 9)
        log_post = baseline.log_posteriors(torch.randn(1, 40, 9))
        torch.testing.assert_close(log_post.exp().sum(-1), torch.ones(1, 9))
    with pytest.raises(ConfigError):
        channels_for_budget(50, 13)
