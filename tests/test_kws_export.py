"""HEiMDaL shipping: the streaming TorchScript / ONNX spotter equals the in-library path; confusables from a phrase;
the export, listen and train-wakeword commands."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from lopkit.kws.model import BCResNetKWS


def _trained_looking_model(seed: int = 0) -> BCResNetKWS:
    """A small HEiMDaL CNN with non-trivial BatchNorm statistics and feature stats (as a trained one has)."""
    from lopkit.kws.features import FeatureStats

    torch.manual_seed(seed)
    model = BCResNetKWS(tau=1, offset_scale=0.1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    stats = FeatureStats(40)
    stats.mean.uniform_(-8, -4)
    stats.std.uniform_(1, 3)
    model.set_feature_stats(stats)
    return model.eval()


def _library_path(model: BCResNetKWS, audio: torch.Tensor, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame probabilities and start frames from StreamingLogMel + CNNScorer fed ``chunk``-sample chunks."""
    from lopkit.kws.features import StreamingLogMel
    from lopkit.kws.stream import CNNScorer

    features, scorer = StreamingLogMel(), CNNScorer(model)
    scores, starts = [], []
    for begin in range(0, audio.numel(), chunk):
        frames = features.push(audio[begin:begin + chunk])
        if frames.shape[-1]:
            s, st = scorer.push(frames)
            scores.append(s)
            starts.append(st)
    return np.concatenate(scores), np.concatenate(starts)


def _stream(spotter, audio: torch.Tensor, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    state = spotter.initial_state()
    logits, starts, ends = [], [], []
    for begin in range(0, audio.numel(), chunk):
        lg, st, en, state = spotter(audio[begin:begin + chunk], state)
        logits.append(lg.numpy())
        starts.append(st.numpy())
        ends.append(en.numpy())
    return np.concatenate(logits), np.concatenate(starts), np.concatenate(ends)


@pytest.mark.parametrize("chunk", [1234, 160, 1600])
def test_torchscript_spotter_equals_the_library_streaming_path(tmp_path, chunk):
    """Saved, reloaded with torch.jit.load: same scores (sigmoid of its logits), starts and frame times."""
    from lopkit.kws.export import export_torchscript
    from lopkit.kws.stream import frame_end_seconds

    model = _trained_looking_model()
    path = export_torchscript(model, tmp_path / "spotter.pt", {"threshold": 0.7, "smooth_frames": 3, "refractory_s": 1.0})
    spotter = torch.jit.load(str(path))
    audio = torch.randn(16000 * 2, generator=torch.Generator().manual_seed(1)) * 0.1
    logits, starts, ends = _stream(spotter, audio, chunk)
    ref_scores, ref_starts = _library_path(model, audio, chunk)
    assert logits.shape == ref_scores.shape and logits.size == 1 + (audio.numel() - 400) // 160
    np.testing.assert_allclose(1 / (1 + np.exp(-logits.astype(np.float64))), ref_scores, atol=1e-6)
    np.testing.assert_allclose(starts, np.maximum(ref_starts, 0.0) / 100.0, atol=1e-6)
    assert starts.min() >= 0.0  # a start estimate before the stream is reported as the stream start
    np.testing.assert_allclose(ends, frame_end_seconds(np.arange(logits.size)))
    meta = spotter.metadata()
    assert meta["threshold_logit"] == pytest.approx(np.log(0.7 / 0.3))
    assert meta["smooth_frames"] == 3 and meta["refractory_frames"] == 100


def test_torchscript_spotter_loads_without_lopkit(tmp_path):
    """A fresh interpreter that cannot import lopkit runs the saved file."""
    from lopkit.kws.export import export_torchscript

    model = _trained_looking_model()
    path = export_torchscript(model, tmp_path / "spotter.pt")
    audio = torch.randn(8000, generator=torch.Generator().manual_seed(2)) * 0.1
    torch.save(audio, tmp_path / "audio.pt")
    expected, _, _ = _stream(torch.jit.load(str(path)), audio, 800)
    code = (
        "import sys; sys.modules['lopkit'] = None\n"  # importing lopkit now fails
        "import torch\n"
        f"s = torch.jit.load({str(path)!r}); a = torch.load({str(tmp_path / 'audio.pt')!r})\n"
        "st = s.initial_state(); out = []\n"
        "for i in range(0, a.numel(), 800):\n"
        "    lg, _, _, st = s(a[i:i + 800], st); out.append(lg)\n"
        f"torch.save(torch.cat(out), {str(tmp_path / 'out.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    np.testing.assert_array_equal(torch.load(tmp_path / "out.pt").numpy(), expected)


def test_onnx_spotter_equals_the_torchscript_one(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from lopkit.kws.export import StreamingSpotter, export_onnx

    model = _trained_looking_model()
    path = export_onnx(model, tmp_path / "spotter.onnx")
    session = onnxruntime.InferenceSession(str(path))
    names = [i.name for i in session.get_inputs()]
    spotter = StreamingSpotter(model)
    audio = torch.randn(16000, generator=torch.Generator().manual_seed(3)) * 0.1
    state = spotter.initial_state()
    onnx_state = [t.numpy() for t in state]
    for begin in range(0, audio.numel(), 1600):
        chunk = audio[begin:begin + 1600]
        logits, starts, _, state = spotter(chunk, state)
        outputs = session.run(None, dict(zip(names, [chunk.numpy()] + onnx_state)))
        onnx_state = outputs[3:]
        np.testing.assert_allclose(outputs[0], logits.numpy(), atol=1e-5)
        np.testing.assert_allclose(outputs[1], starts.numpy(), atol=1e-6)


def test_spotter_refuses_a_model_without_a_detect_head():
    from lopkit.kws.export import StreamingSpotter
    from lopkit.kws.model import FramePhoneClassifier

    with pytest.raises(ValueError, match="HEiMDaL CNN"):
        StreamingSpotter(FramePhoneClassifier(n_classes=5, channels=(4, 4, 6, 8, 10, 4)))


def test_conv_macs_matches_a_hand_count_and_the_model_count_is_linear_in_time():
    from lopkit.kws.export import conv_macs, model_macs_per_second

    conv = torch.nn.Conv2d(4, 8, (3, 1), groups=2)
    output = conv(torch.zeros(1, 4, 10, 7))  # -> [1, 8, 8, 7]
    assert conv_macs(conv, output) == (8 * 8 * 7) * (4 // 2) * 3
    head = torch.nn.Conv1d(6, 2, 1)
    assert conv_macs(head, head(torch.zeros(1, 6, 100))) == 2 * 100 * 6
    model = _trained_looking_model()
    one = model_macs_per_second(model)
    assert model_macs_per_second(model, seconds=2.0) == 2 * one  # every op is per frame: linear in the length
    assert one > 100 * model.head.in_channels * model.head.out_channels


def test_confusables_are_derived_from_the_phrase_and_never_contain_it():
    from lopkit.kws.corpus import _normalize_text, generate_confusables, similar_words

    vocabulary = ("lamb", "lame", "damp", "camp", "lamp", "okay", "oak", "lime", "clamps", "zebra")
    assert similar_words("lamp", vocabulary) == ["camp", "damp", "lamb"]
    confusables = generate_confusables("ok lamp", vocabulary)
    assert "ok camp" in confusables and "lamp ok" in confusables and "lamp" in confusables
    assert all("ok lamp" not in _normalize_text(c) for c in confusables)
    assert "hey commuter" not in confusables  # nothing of the default phrase's hand-written list
    other = generate_confusables("hey lopkit", vocabulary)
    assert "lopkit hey" in other and set(other) != set(confusables)


def test_export_cli_writes_a_loadable_spotter_and_refuses_bad_input(tmp_path, capsys):
    from lopkit.cli import main
    from lopkit.kws.model import count_parameters

    model = _trained_looking_model()
    config = {"model_kind": "heimdal", "tau": 1, "n_mels": 40, "offset_scale": 0.1, "dropout": 0.1}
    torch.save({"config": config, "model": model.state_dict(), "meta": {}, "threshold": 0.6, "smooth_frames": 3,
                "refractory_s": 1.0}, tmp_path / "heimdal.pt")
    assert main(["kws", "export", str(tmp_path / "heimdal.pt"), "-o", str(tmp_path / "s.pt")]) == 0
    out = capsys.readouterr().out
    assert f"{count_parameters(model)} parameters" in out
    spotter = torch.jit.load(str(tmp_path / "s.pt"))
    assert spotter.metadata()["threshold_logit"] == pytest.approx(np.log(0.6 / 0.4))
    assert main(["kws", "export", str(tmp_path / "heimdal.pt"), "-o", str(tmp_path / "s.txt")]) != 0
    assert "use a .pt file" in capsys.readouterr().err
    assert main(["kws", "export", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "s.pt")]) != 0
    (tmp_path / "junk.pt").write_text("not a model")
    assert main(["kws", "export", str(tmp_path / "junk.pt"), "-o", str(tmp_path / "s.pt")]) != 0
    err = capsys.readouterr().err
    assert "not a model exported" in err and "Traceback" not in err


def test_train_wakeword_refuses_a_phrase_without_words(capsys):
    from lopkit.cli import main

    assert main(["kws", "train-wakeword", "hey 123!"]) != 0
    assert "wake phrase" in capsys.readouterr().err


def _reach(model: BCResNetKWS, feats: torch.Tensor, frame: int) -> int:
    """How many frames after ``frame`` a change of the input at ``frame`` still moves the detect output."""
    base = model(feats)["detect"][0]
    moved = feats.clone()
    moved[..., frame] += 5.0
    changed = torch.nonzero((model(moved)["detect"][0] - base).abs() > 0).flatten()
    assert changed.min().item() == frame  # causal: nothing before the change moves
    return int(changed.max().item()) - frame


@pytest.mark.parametrize("pool", [0, 40])
def test_context_pool_streams_exactly_and_keeps_the_footprint_rule(pool):
    """Chunked streaming equals the full forward; the baseline is sized to the pooled CNN's parameter count."""
    from lopkit.kws.train import build_model, cnn_param_budget

    torch.manual_seed(0)
    model = BCResNetKWS(tau=1, context_pool_frames=pool).eval()
    feats = torch.randn(2, 40, 300)
    full = model(feats)["detect"]
    state, pieces = None, []
    for begin in range(0, 300, 37):
        out, state = model.stream_step(feats[..., begin:begin + 37], state)
        pieces.append(out["detect"])
    torch.testing.assert_close(torch.cat(pieces, -1), full, atol=1e-5, rtol=1e-5)
    assert model.receptive_field_frames == 117 + max(0, pool - 1)  # 1 + (4 + 4 + 8 + 32 + 64 + 4) conv contexts
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == cnn_param_budget(1, 40, pool)
    baseline = build_model("dnn_hmm", 1, n_classes=6, context_pool_frames=pool)
    assert abs(sum(p.numel() for p in baseline.parameters()) - n_params) / n_params < 0.03


def test_context_pool_reaches_further_back_than_the_convolutions():
    """The same trunk (same seed) with a 40-frame pool: an input change moves the output for more frames."""
    feats = torch.randn(1, 40, 300, generator=torch.Generator().manual_seed(1))
    reaches = {}
    for pool in (0, 40):
        torch.manual_seed(0)
        reaches[pool] = _reach(BCResNetKWS(tau=1, context_pool_frames=pool).eval(), feats, 100)
    assert reaches[40] > reaches[0]
    assert reaches[0] <= 116 and reaches[40] <= 116 + 39


def test_online_augmentation_noise_and_time_masks():
    """Noise only raises mel power (by the drawn level on average); time masks set whole frames to the clip mean."""
    from lopkit.kws.train import augment_features

    feats = torch.randn(4, 40, 120) - 5.0
    plain = augment_features(feats, torch.Generator().manual_seed(0), max_gain=0.0, max_mask=0)
    torch.testing.assert_close(plain, feats)
    noisy = augment_features(feats, torch.Generator().manual_seed(0), max_gain=0.0, max_mask=0,
                             noise_snr_db=(0.0, 0.0))
    assert (noisy >= feats).all()
    added = (noisy.exp() - feats.exp()).mean(dim=(1, 2))
    torch.testing.assert_close(added, feats.exp().mean(dim=(1, 2)), rtol=0.05, atol=0.0)  # SNR 0 dB: equal power
    masked = augment_features(feats, torch.Generator().manual_seed(1), max_gain=0.0, max_mask=0, time_masks=2)
    changed = (masked != feats).any(dim=1)  # [B, T]: frames touched
    assert changed.any()
    for clip in range(4):
        fill = feats[clip].mean()
        torch.testing.assert_close(masked[clip][:, changed[clip]], fill.expand(40, int(changed[clip].sum())))
