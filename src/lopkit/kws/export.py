"""Ship a trained HEiMDaL spotter as one streaming module that runs without lopkit (TorchScript, optionally ONNX).

:class:`StreamingSpotter` holds the whole detector's arithmetic up to the trigger: PCM samples -> log-mel
frames (the one front end, :func:`lopkit.kws.features.log_mel_frames`) -> causal BC-ResNet with cached left
context -> per-frame detect logits and keyword-start estimates. Its call is

    logits, start_s, end_s, state = spotter(chunk, state)        # state = spotter.initial_state() to begin

with ``chunk`` a 1-D float32 tensor of 16 kHz samples in [-1, 1] of any length, and ``state`` a list of tensors:
``[leftover samples, frames emitted so far, one cache per causal convolution]``. Per new frame it returns the
detect logit (threshold it on the logit scale: ``logit(p) = log(p / (1 - p))`` for a probability p), the estimated
keyword start in seconds (``(t - offset_frames) / 100``, clamped at 0: a start before the stream is reported as
the stream start), and the end time of the frame's window, ``(160 t + 400) / 16000`` s. It is exactly the
in-library path (:class:`lopkit.kws.stream.StreamingLogMel` + :class:`lopkit.kws.stream.CNNScorer`) fed the same
chunks, which the tests check; smoothing, threshold and refractory period stay with the caller (a few lines, see
``docs/kws.md``).

The file written by :func:`export_torchscript` loads with ``torch.jit.load(path)`` alone. Its ``metadata``
method returns the operating threshold (as a logit), smoothing and refractory settings stored with the model.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from lopkit.kws.features import (
    FRAMES_PER_SECOND,
    HOP_SAMPLES,
    SAMPLE_RATE,
    WIN_SAMPLES,
    log_mel_frames,
    mel_filterbank,
    padded_window,
)
from lopkit.kws.model import BCResNetKWS

__all__ = ["StreamingSpotter", "export_torchscript", "export_onnx", "probability_to_logit", "model_macs_per_second",
           "conv_macs"]


def probability_to_logit(probability: float) -> float:
    """The detect-logit threshold equal to a probability threshold in (0, 1)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"a probability threshold must lie strictly between 0 and 1; got {probability}")
    return math.log(probability / (1.0 - probability))


class StreamingSpotter(nn.Module):
    """PCM chunk + state -> (detect logits, start seconds, window end seconds, new state) for a HEiMDaL CNN."""

    def __init__(self, model: BCResNetKWS, threshold: float = 0.5, smooth_frames: int = 3, refractory_s: float = 1.0):
        super().__init__()
        if not isinstance(model, BCResNetKWS) or "detect" not in model.heads:
            raise ValueError("StreamingSpotter needs a HEiMDaL CNN (BCResNetKWS with a 'detect' head); the "
                             "dnn_hmm baseline decodes with a Python Viterbi and is not exportable")
        self.model = copy.deepcopy(model).eval().requires_grad_(False)  # inference only: outputs carry no graph
        self.register_buffer("window", padded_window())
        self.register_buffer("filterbank", mel_filterbank(model.n_mels))
        self.detect_index = model.heads.index("detect")
        self.offset_index = model.heads.index("offset") if "offset" in model.heads else -1
        self.offset_scale = float(model.offset_scale)
        self.threshold_logit = probability_to_logit(float(threshold))
        self.smooth_frames = int(smooth_frames)
        self.refractory_frames = max(1, int(round(float(refractory_s) * FRAMES_PER_SECOND)))
        self.win_samples, self.hop_samples, self.sample_rate = WIN_SAMPLES, HOP_SAMPLES, SAMPLE_RATE
        self.frames_per_second = FRAMES_PER_SECOND
        self.eval()

    @torch.jit.export
    def initial_state(self) -> List[torch.Tensor]:
        """The state of a fresh stream: no leftover samples, 0 frames emitted, zero convolution caches."""
        state = [torch.zeros(0, device=self.window.device),
                 torch.zeros((), dtype=torch.int64, device=self.window.device)]
        return state + self.model.initial_caches(1, torch.float32, self.window.device)

    @torch.jit.export
    def metadata(self) -> Dict[str, float]:
        """Operating point stored with the model: threshold (logit), smoothing frames, refractory frames."""
        return {"threshold_logit": self.threshold_logit, "smooth_frames": float(self.smooth_frames),
                "refractory_frames": float(self.refractory_frames), "frames_per_second": float(self.frames_per_second)}

    def forward(self, chunk: torch.Tensor, state: List[torch.Tensor]
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """Scores for the frames this chunk completes; see the module docstring for the state layout."""
        if chunk.dim() != 1:
            raise ValueError("StreamingSpotter: the chunk must be 1-D float samples [S] at 16 kHz")
        if len(state) != 2 + len(self.model.blocks) + 2:
            raise ValueError("StreamingSpotter: wrong state; start a stream with initial_state()")
        buffer = torch.cat([state[0], chunk.to(torch.float32)])
        emitted = state[1]
        win, hop = self.win_samples, self.hop_samples
        n_new = 0 if buffer.shape[0] < win else 1 + (buffer.shape[0] - win) // hop
        if n_new == 0:
            empty = torch.zeros(0, device=buffer.device)
            return empty, empty, empty, [buffer, emitted] + state[2:]
        feats = log_mel_frames(buffer.unsqueeze(0), self.window, self.filterbank, win, hop)
        raw, caches = self.model.run(feats, state[2:])
        frames = emitted.to(torch.float64) + torch.arange(n_new, dtype=torch.float64, device=buffer.device)
        logits = raw[0, self.detect_index]
        if self.offset_index >= 0:
            back = raw[0, self.offset_index].to(torch.float64) / self.offset_scale
            start_s = ((frames - back) / self.frames_per_second).clamp_min(0.0)
        else:
            start_s = torch.full_like(frames, float("nan"))
        end_s = (frames * hop + win) / self.sample_rate
        new_state = [buffer[n_new * hop:], emitted + n_new] + caches
        return logits, start_s, end_s, new_state


def _spotter(model: BCResNetKWS, export: Dict[str, Any] | None) -> StreamingSpotter:
    export = export or {}
    threshold = export.get("threshold")
    if threshold is None or not 0.0 < float(threshold) < 1.0:
        threshold = 0.5
    return StreamingSpotter(model, float(threshold), int(export.get("smooth_frames", 3)),
                            float(export.get("refractory_s", 1.0)))


def export_torchscript(model: BCResNetKWS, path: str | Path, export: Dict[str, Any] | None = None) -> Path:
    """Script the streaming spotter of ``model`` (operating point from the pipeline's ``export`` dict) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted = torch.jit.script(_spotter(model, export))
    scripted.save(str(path))
    return path


def export_onnx(model: BCResNetKWS, path: str | Path, export: Dict[str, Any] | None = None,
                chunk_samples: int = 1600) -> Path:
    """Write the streaming spotter as ONNX (needs the ``onnx`` and ``onnxscript`` packages); see docs/kws.md."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(f"ONNX export needs {' and '.join(missing)}: pip install onnx onnxscript onnxruntime "
                           "(or pip install 'lopkit[onnx]')")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spotter = _spotter(model, export)
    state = spotter.initial_state()
    chunk = torch.zeros(chunk_samples)
    # The first call of a stream has an empty sample buffer; a steady-state call carries 400 - 160 = 240..399
    # leftover samples. Export from a steady-state example so the graph has the general shapes.
    _, _, _, state = spotter(chunk, state)
    samples, leftover = torch.export.Dim("samples", min=400), torch.export.Dim("leftover", max=399)
    dynamic = ({0: samples}, [{0: leftover}] + [None] * (len(state) - 1))
    torch.onnx.export(spotter, (chunk, state), str(path), dynamic_shapes=dynamic, dynamo=True,
                      input_names=["chunk"], output_names=["logits", "start_s", "end_s"])
    return path


class _FlatSpotter(nn.Module):
    """The spotter with the state as separate tensors (ONNX graphs take no lists)."""

    def __init__(self, spotter: StreamingSpotter):
        super().__init__()
        self.spotter = spotter

    def forward(self, chunk: torch.Tensor, *state: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        logits, start_s, end_s, new_state = self.spotter(chunk, list(state))
        return (logits, start_s, end_s, *new_state)


def conv_macs(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-accumulates a Conv1d/Conv2d spent on ``output``: outputs x (in_channels / groups) x kernel taps."""
    weight = module.weight
    return output.numel() * weight.shape[1] * math.prod(weight.shape[2:])


def model_macs_per_second(model: BCResNetKWS, seconds: float = 1.0) -> int:
    """Multiply-accumulates of the CNN's convolutions and heads (not the front end) per ``seconds`` of audio."""
    frames = int(round(seconds * FRAMES_PER_SECOND))
    total = [0]

    def count(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        total[0] += conv_macs(module, output)

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model.run(torch.zeros(1, model.n_mels, frames))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total[0]
