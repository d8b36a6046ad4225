"""Causal BC-ResNet for streaming keyword detection + localisation (HEiMDaL, spec 2.2), and a footprint-matched
frame phone classifier for the DNN-HMM baseline.

Architecture (BC-ResNet-tau of Kim et al. 2021, made causal in time). Input: log-mel ``[B, n_mels, T]`` (40 mels,
100 frames/s), normalised inside the model by a :class:`~lopkit.kws.features.FeatureStats` submodule (identity
until ``set_feature_stats`` is called, saved in ``state_dict``). Channel plan ``(16, 8, 12, 16, 20, 32) * tau``:

- stem: 5x5 conv, frequency stride 2 (40 -> 20 mel bins), BN, ReLU;
- 4 stages of BC-ResBlocks with widths ``8, 12, 16, 20 * tau``, ``2, 2, 4, 4`` blocks, temporal dilations
  ``1, 2, 4, 8``; the first block of stages 2 and 3 has frequency stride 2 (20 -> 10 -> 5 bins). A block is
  ``[1x1 conv+BN+ReLU if the width changes] -> frequency depthwise 3x1 conv -> SubSpectralNorm (5 sub-bands)``
  (= the 2-D branch ``f2``), then frequency average-pool to 1 bin -> causal temporal depthwise 1x3 conv (dilated)
  -> BN -> SiLU -> pointwise 1x1 conv -> Dropout2d (``f1``), broadcast back over frequency and added to ``f2``
  (plus the identity shortcut when the width is unchanged), then ReLU;
- classifier: causal depthwise 5x5 conv without frequency padding (5 bins -> 1), 1x1 conv to ``32 tau``, BN,
  ReLU, mean over any remaining frequency bins, then per-frame 1x1 heads (one output channel per head).
- optional temporal context (``context_pool_frames = P > 0``, issue 19): the heads also see the causal mean of the
  last ``P`` frames of those features (zeros before the stream start), concatenated to the current frame's; it
  adds ``P - 1`` frames of receptive field with a uniform gradient path over them, for ``32 tau`` extra weights
  per head. Without it the receptive field is 117 frames (1.17 s) but its effective part is much shorter.

Causality: every temporal convolution is padded on the left only. Its left context comes from a cache tensor that
is all zeros for an offline forward, and holds the previous chunk's last frames when streaming; every other op is
per-frame (in eval mode, where BatchNorm / SubSpectralNorm use fixed running statistics), so chunk-by-chunk
streaming equals the full-sequence forward exactly. Training mode uses batch statistics (over batch, time and, for
SubSpectralNorm, the bins of each sub-band), as BC-ResNet does; causality is only claimed in eval mode.

Outputs per frame: ``{"detect": z[B, T], "offset": o[B, T]}`` for :class:`BCResNetKWS`. The offset head predicts
``offset_scale * (t - s)`` (frames since the keyword start, scaled); :meth:`BCResNetKWS.offset_frames` converts
back to frames.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from lopkit.configs import ConfigError, require
from lopkit.kws.features import N_MELS, FeatureStats

__all__ = [
    "BASE_CHANNELS",
    "STAGE_BLOCKS",
    "STAGE_DILATIONS",
    "SubSpectralNorm",
    "CausalConv2d",
    "BCResBlock",
    "CausalBCResNet",
    "BCResNetKWS",
    "FramePhoneClassifier",
    "StreamingModel",
    "bcresnet_channels",
    "count_bcresnet_params",
    "channels_for_budget",
    "count_parameters",
]

BASE_CHANNELS = (16, 8, 12, 16, 20, 32)  # stem, stage 1..4, classifier; times tau
STAGE_BLOCKS = (2, 2, 4, 4)
STAGE_DILATIONS = (1, 2, 4, 8)
STAGE_FREQ_STRIDES = (1, 2, 2, 1)  # applied in the first block of each stage
SUB_BANDS = 5


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def bcresnet_channels(tau: float) -> tuple[int, ...]:
    """Channel plan ``(stem, stage1..4, classifier)`` for width multiplier tau (rounded, at least 1)."""
    return tuple(max(1, int(round(c * tau))) for c in BASE_CHANNELS)


class SubSpectralNorm(nn.Module):
    """BatchNorm over (channels x sub-bands): each channel's frequency axis is split into ``sub_bands`` groups."""

    def __init__(self, channels: int, sub_bands: int = SUB_BANDS):
        super().__init__()
        self.channels, self.sub_bands = channels, sub_bands
        self.norm = nn.BatchNorm2d(channels * sub_bands)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``[B, C, F, T]`` with statistics per (channel, sub-band); F must divide by ``sub_bands``."""
        batch, channels, freq, time = x.shape
        if freq % self.sub_bands:
            raise ValueError(f"SubSpectralNorm: {freq} frequency bins do not split into {self.sub_bands} sub-bands")
        grouped = x.reshape(batch, channels * self.sub_bands, freq // self.sub_bands, time)
        return self.norm(grouped).reshape(batch, channels, freq, time)


class CausalConv2d(nn.Module):
    """Conv2d on ``[B, C, F, T]``, symmetric-padded (or not) in frequency and causal in time via a left cache."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: tuple[int, int], freq_stride: int = 1,
        freq_padding: int = 0, dilation: int = 1, groups: int = 1, bias: bool = False,
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel, stride=(freq_stride, 1), padding=(freq_padding, 0),
            dilation=(1, dilation), groups=groups, bias=bias,
        )
        self.context = (kernel[1] - 1) * dilation

    def forward(self, x: torch.Tensor, cache: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Return the output and the new cache (the last ``context`` input frames); cache None = zeros."""
        if self.context == 0:
            return self.conv(x), None
        if cache is None:
            shape = list(x.shape[:-1])
            shape.append(self.context)
            cache = x.new_zeros(shape)
        padded = torch.cat([cache, x], dim=-1)
        return self.conv(padded), padded[..., padded.shape[-1] - self.context :]


class BCResBlock(nn.Module):
    """Causal broadcasted-residual block: f2 (frequency depthwise + SSN) + broadcast f1 (temporal, causal)."""

    def __init__(self, in_channels: int, out_channels: int, freq_stride: int = 1, dilation: int = 1,
                 sub_bands: int = SUB_BANDS, dropout: float = 0.1):
        super().__init__()
        self.transition = in_channels != out_channels
        self.freq_stride = freq_stride
        if not self.transition and freq_stride != 1:
            raise ValueError("BCResBlock: a frequency stride needs a width change (no identity shortcut then)")
        self.expand = (
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())
            if self.transition else nn.Identity()
        )
        self.freq_depthwise = nn.Conv2d(out_channels, out_channels, (3, 1), stride=(freq_stride, 1), padding=(1, 0),
                                        groups=out_channels, bias=False)
        self.sub_spectral_norm = SubSpectralNorm(out_channels, sub_bands)
        self.time_depthwise = CausalConv2d(out_channels, out_channels, (1, 3), dilation=dilation, groups=out_channels)
        self.time_norm = nn.BatchNorm2d(out_channels)
        self.pointwise = nn.Conv2d(out_channels, out_channels, 1, bias=False)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor, cache: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``[B, C_in, F, T] -> [B, C_out, F', T]`` plus the new temporal cache."""
        f2 = self.sub_spectral_norm(self.freq_depthwise(self.expand(x)))
        pooled = f2.mean(dim=2, keepdim=True)
        temporal, cache = self.time_depthwise(pooled, cache)
        f1 = self.dropout(self.pointwise(F.silu(self.time_norm(temporal))))
        out = f2 + f1
        if not self.transition:
            out.add_(x)
        return F.relu(out, inplace=True), cache


class CausalBCResNet(nn.Module):
    """Causal BC-ResNet trunk + per-frame 1x1 head with ``n_outputs`` channels: ``[B, n_mels, T] -> [B, n_out, T]``."""

    __jit_unused_properties__ = ["receptive_field_frames"]

    def __init__(self, channels: Sequence[int], n_outputs: int, n_mels: int = N_MELS, sub_bands: int = SUB_BANDS,
                 dropout: float = 0.1, context_pool_frames: int = 0):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        require(context_pool_frames == 0 or context_pool_frames >= 2,
                f"context_pool_frames must be 0 (off) or >= 2 frames; got {context_pool_frames}")
        require(len(channels) == 6 and min(channels) >= 1,
                f"channels must be 6 positive ints (stem, stage1..4, classifier); got {channels}")
        require(n_outputs >= 1, f"n_outputs must be >= 1; got {n_outputs}")
        require(n_mels >= 40 and n_mels % 40 == 0,
                f"n_mels must be a multiple of 40 (frequency strides 2,2,2 and {sub_bands} sub-bands); got {n_mels}")
        require(0.0 <= dropout < 1.0, f"dropout must be in [0, 1); got {dropout}")
        self.channels, self.n_outputs, self.n_mels = channels, n_outputs, n_mels
        self.feature_stats = FeatureStats(n_mels)
        stem_c, *stage_c, final_c = channels
        self.stem = CausalConv2d(1, stem_c, (5, 5), freq_stride=2, freq_padding=2)
        self.stem_norm = nn.BatchNorm2d(stem_c)
        blocks = []
        in_c = stem_c
        for out_c, n_blocks, dilation, stride in zip(stage_c, STAGE_BLOCKS, STAGE_DILATIONS, STAGE_FREQ_STRIDES):
            for index in range(n_blocks):
                blocks.append(BCResBlock(in_c, out_c, stride if index == 0 else 1, dilation, sub_bands, dropout))
                in_c = out_c
        self.blocks = nn.ModuleList(blocks)
        self.classifier_depthwise = CausalConv2d(in_c, in_c, (5, 5), groups=in_c)
        self.classifier_pointwise = nn.Conv2d(in_c, final_c, 1, bias=False)
        self.classifier_norm = nn.BatchNorm2d(final_c)
        self.context_pool_frames = int(context_pool_frames)
        self.head = nn.Conv1d(final_c * (2 if self.context_pool_frames else 1), n_outputs, 1)

    @property
    def receptive_field_frames(self) -> int:
        """Frames of input an output frame depends on (itself plus all cached left context)."""
        convs = sum(module.context for module in self.modules() if isinstance(module, CausalConv2d))
        return 1 + convs + max(0, self.context_pool_frames - 1)

    def set_feature_stats(self, stats: FeatureStats) -> None:
        """Use these global mean/std stats to normalise the input log-mels (stored in state_dict)."""
        self.feature_stats.load_from(stats)

    def run(self, features: torch.Tensor, caches: Optional[List[torch.Tensor]] = None
            ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Raw head outputs ``[B, n_out, T]`` and new caches, continuing from ``caches`` (None = stream start).

        TorchScript-compatible (``lopkit kws export`` scripts it): the caches are always tensors, zeros at the
        start of a stream (what a causal convolution's left padding would be).
        """
        if features.dim() != 3 or features.shape[1] != self.n_mels:
            raise ValueError(f"expected log-mel features [B, {self.n_mels}, T], got {list(features.shape)}")
        n_caches = len(self.blocks) + 2 + (1 if self.context_pool_frames else 0)
        if caches is None:
            caches = self.initial_caches(features.shape[0], features.dtype, features.device)
        elif len(caches) != n_caches:
            raise ValueError(f"stream state has {len(caches)} caches, expected {n_caches}; pass None to start")
        new_caches: List[torch.Tensor] = []
        x = self.feature_stats(features).unsqueeze(1)
        x, cache = self.stem(x, caches[0])
        assert cache is not None
        new_caches.append(cache)
        x = F.relu(self.stem_norm(x))
        for index, block in enumerate(self.blocks):
            x, cache = block(x, caches[index + 1])
            assert cache is not None
            new_caches.append(cache)
        x, cache = self.classifier_depthwise(x, caches[len(self.blocks) + 1])
        assert cache is not None
        new_caches.append(cache)
        x = F.relu(self.classifier_norm(self.classifier_pointwise(x)))
        features = x.mean(dim=2)
        if self.context_pool_frames:
            padded = torch.cat([caches[n_caches - 1], features], dim=-1)
            context = F.avg_pool1d(padded, self.context_pool_frames, stride=1)
            new_caches.append(padded[:, :, padded.shape[-1] - (self.context_pool_frames - 1):])
            features = torch.cat([features, context], dim=1)
        return self.head(features), new_caches

    @torch.jit.export
    def initial_caches(self, batch: int, dtype: torch.dtype = torch.float32,
                       device: Optional[torch.device] = None) -> List[torch.Tensor]:
        """Zero stream caches for ``batch`` streams: one ``[B, C, F, context]`` tensor per causal convolution."""
        freq = self.n_mels
        caches = [torch.zeros(batch, 1, freq, self.stem.context, dtype=dtype, device=device)]
        freq = (freq + 1) // 2  # stem: frequency stride 2 with padding 2 and a 5-tap kernel
        for block in self.blocks:
            caches.append(torch.zeros(batch, block.pointwise.out_channels, 1, block.time_depthwise.context,
                                      dtype=dtype, device=device))
            freq = (freq + block.freq_stride - 1) // block.freq_stride
        conv = self.classifier_depthwise
        caches.append(torch.zeros(batch, conv.conv.in_channels, freq, conv.context, dtype=dtype, device=device))
        if self.context_pool_frames:
            caches.append(torch.zeros(batch, self.classifier_pointwise.out_channels, self.context_pool_frames - 1,
                                      dtype=dtype, device=device))
        return caches


class BCResNetKWS(CausalBCResNet):
    """HEiMDaL model: causal BC-ResNet-tau with per-frame heads ``detect`` (logit) and ``offset`` (scaled frames)."""

    def __init__(self, tau: float = 2, n_mels: int = N_MELS, heads: Sequence[str] = ("detect", "offset"),
                 offset_scale: float = 1.0, dropout: float = 0.1, sub_bands: int = SUB_BANDS,
                 context_pool_frames: int = 0):
        heads = tuple(heads)
        require(tau > 0, f"tau must be > 0 (BC-ResNet width multiplier, e.g. 1, 2, 3); got {tau}")
        require(len(heads) >= 1 and len(set(heads)) == len(heads) and set(heads) <= {"detect", "offset"},
                f"heads must be distinct names from ('detect', 'offset'); got {heads}")
        require(offset_scale > 0, f"offset_scale must be > 0 (e.g. 1.0 or 0.01); got {offset_scale}")
        super().__init__(bcresnet_channels(tau), len(heads), n_mels, sub_bands, dropout, context_pool_frames)
        self.tau, self.heads, self.offset_scale = tau, heads, float(offset_scale)

    def _split(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: raw[:, index] for index, name in enumerate(self.heads)}

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[B, n_mels, T]`` log-mels -> ``{head: [B, T]}`` per-frame outputs."""
        raw, _ = self.run(features)
        return self._split(raw)

    def stream_step(self, features: torch.Tensor, state: list | None = None) -> tuple[dict[str, torch.Tensor], list]:
        """Process a chunk of frames ``[B, n_mels, Tc]`` continuing from ``state``; returns outputs and new state."""
        raw, state = self.run(features, state)
        return self._split(raw), state

    def offset_frames(self, offset: torch.Tensor) -> torch.Tensor:
        """Convert offset-head outputs to frames since the keyword start."""
        return offset / self.offset_scale


class FramePhoneClassifier(CausalBCResNet):
    """DNN-HMM baseline acoustic model: the same causal trunk with per-frame logits over phone/filler classes.

    Give ``channels`` directly or a ``param_budget``; with a budget the widths are picked by
    :func:`channels_for_budget` so the parameter count is within ``tolerance`` (relative) of the budget.
    """

    def __init__(self, n_classes: int, param_budget: int | None = None, channels: Sequence[int] | None = None,
                 n_mels: int = N_MELS, tolerance: float = 0.03, dropout: float = 0.1, sub_bands: int = SUB_BANDS):
        require(n_classes >= 2, f"n_classes must be >= 2 (keyword phones + filler/silence); got {n_classes}")
        require((param_budget is None) != (channels is None), "give exactly one of param_budget or channels")
        if channels is None:
            channels = channels_for_budget(param_budget, n_classes, n_mels, tolerance, sub_bands)
        super().__init__(channels, n_classes, n_mels, sub_bands, dropout)
        self.n_classes = n_classes

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, n_mels, T]`` log-mels -> class logits ``[B, n_classes, T]``."""
        return self.run(features)[0]

    def stream_step(self, features: torch.Tensor, state: list | None = None) -> tuple[torch.Tensor, list]:
        """Chunked forward continuing from ``state``: logits ``[B, n_classes, Tc]`` and new state."""
        return self.run(features, state)

    def log_posteriors(self, features: torch.Tensor) -> torch.Tensor:
        """Per-frame log class posteriors ``[B, T, n_classes]`` (the HMM decoder's input)."""
        return F.log_softmax(self.forward(features), dim=1).transpose(1, 2)


class StreamingModel:
    """Holds the stream state of a causal model; call with successive ``[B, n_mels, Tc]`` chunks (eval mode)."""

    def __init__(self, model: CausalBCResNet):
        self.model = model
        self.state: list | None = None

    def reset(self) -> None:
        """Start a new stream."""
        self.state = None

    @torch.no_grad()
    def __call__(self, features: torch.Tensor):
        """Outputs for this chunk, as the model's forward would give them for these frames of the whole stream."""
        if self.model.training:
            raise RuntimeError("StreamingModel: call model.eval() first (streaming equals offline only in eval mode)")
        outputs, self.state = self.model.stream_step(features, self.state)
        return outputs


def _block_params(in_c: int, out_c: int, sub_bands: int) -> int:
    expand = in_c * out_c + 2 * out_c if in_c != out_c else 0
    return expand + 3 * out_c + 2 * out_c * sub_bands + 3 * out_c + 2 * out_c + out_c * out_c


def count_bcresnet_params(channels: Sequence[int], n_outputs: int, sub_bands: int = SUB_BANDS) -> int:
    """Closed-form parameter count of :class:`CausalBCResNet` (checked against the module in the tests)."""
    stem_c, *stage_c, final_c = (int(c) for c in channels)
    total = 25 * stem_c + 2 * stem_c
    in_c = stem_c
    for out_c, n_blocks in zip(stage_c, STAGE_BLOCKS):
        for _ in range(n_blocks):
            total += _block_params(in_c, out_c, sub_bands)
            in_c = out_c
    total += 25 * in_c + in_c * final_c + 2 * final_c + final_c * n_outputs + n_outputs
    return total


def channels_for_budget(param_budget: int, n_outputs: int, n_mels: int = N_MELS, tolerance: float = 0.03,
                        sub_bands: int = SUB_BANDS) -> tuple[int, ...]:
    """Widths for a causal BC-ResNet with ``n_outputs`` heads whose parameter count is closest to ``param_budget``.

    Searches a fine grid of width multipliers m (channels = round(BASE_CHANNELS * m)) and, for each, solves for
    the classifier width (the count is linear in it); among plans within ``tolerance / 2`` of the budget, picks
    the one whose classifier width is proportionally closest to the BC-ResNet plan. Raises ConfigError if no
    plan lands within ``tolerance``.
    """
    require(param_budget is not None and param_budget > 0, f"param_budget must be > 0; got {param_budget}")
    del n_mels  # the count does not depend on the number of mel bins
    best: tuple[float, float, tuple[int, ...]] | None = None
    for step in range(10, 2000):
        multiplier = step * 0.01
        channels = list(bcresnet_channels(multiplier))
        channels[-1] = 1
        base = count_bcresnet_params(channels, n_outputs, sub_bands)
        per_unit = channels[-2] + 2 + n_outputs
        if base > param_budget + per_unit:
            break
        final_c = max(1, int(round((param_budget - base) / per_unit)) + 1)
        channels[-1] = final_c
        error = abs(count_bcresnet_params(channels, n_outputs, sub_bands) - param_budget) / param_budget
        nominal = BASE_CHANNELS[-1] * multiplier
        shape_error = abs(math.log(final_c / nominal))
        key = (0.0 if error <= tolerance / 2 else error, shape_error)
        if best is None or key < best[:2]:
            best = (key[0], key[1], tuple(channels))
    if best is None:
        raise ConfigError(f"param_budget {param_budget} is too small for a BC-ResNet with {n_outputs} outputs")
    channels = best[2]
    error = abs(count_bcresnet_params(channels, n_outputs, sub_bands) - param_budget) / param_budget
    if error > tolerance:
        raise ConfigError(
            f"no BC-ResNet width plan within {tolerance:.1%} of param_budget {param_budget} (best {error:.1%}); "
            "raise the budget or the tolerance"
        )
    return channels
