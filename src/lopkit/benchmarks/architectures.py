"""Small ResNet and ViT builders sized for 1x28x28 Fashion-MNIST on a laptop CPU, with readable module names.

Both are plain ``nn.Module`` trees of standard layers (Linear, Conv2d, BatchNorm2d, LayerNorm, GELU, ...),
so hooks, :func:`lopkit.theory.clone` and the Monitor see every unit.  Module names::

    ResNet: stem, stem_norm, stem_act, block1.{conv1, norm1, act1, conv2, norm2, shortcut[.conv, .norm], act2},
            block2..., pool, flatten, drop, head
    ViT:    embed.proj (conv on patches), embed (patch tokens + class token + position embedding),
            block1.{norm1, attn.{q, k, v, drop, o}, norm2, mlp.{fc1, act, drop, fc2}}, block2..., norm, head

ResNet: a 3x3 stem convolution, then ``len(channels)`` stages of ``blocks_per_stage`` basic blocks
(conv3x3-norm-ReLU-conv3x3-norm, plus a shortcut, then ReLU).  The first block of every stage after
the first halves the spatial size (stride 2) and uses a projection shortcut (1x1 conv + norm); the
others use the identity.  Global average pooling, dropout and a linear head follow.  ``norm`` is
"batch" (BatchNorm2d, the default), "layer" (GroupNorm(1, C), as the paper's code) or "none".

ViT: non-overlapping ``patch_size`` patches projected by a strided conv to ``dim`` features, a learned
class token and learned position embedding, ``depth`` pre-LN transformer blocks
(``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``), a final LayerNorm and a linear head on the class
token.  Attention is written out with separate ``q``, ``k``, ``v``, ``o`` Linear layers
(``heads * head_dim`` features each, scale ``1 / sqrt(head_dim)``), so units and heads are visible.
``norm="none"`` replaces every LayerNorm by ``nn.Identity`` (the un-normalised variant of T3/T4).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from lopkit.benchmarks.models import check_dropout as _check_dropout
from lopkit.benchmarks.models import check_positive_int as _check_positive_int
from lopkit.benchmarks.models import check_sizes as _check_sizes
from lopkit.benchmarks.models import spatial_size as _spatial_size

__all__ = ["AttentionOutput", "BasicBlock", "SmallResNet", "PatchEmbedding", "SelfAttention", "TransformerMLP", "TransformerBlock",
           "SmallViT", "build_resnet", "build_vit", "RESNET_NORMS", "VIT_NORMS"]

#: Normalisations of the ResNet builder ("layer" is GroupNorm(1, C)).
RESNET_NORMS: tuple[str, ...] = ("batch", "layer", "none")
#: Normalisations of the ViT builder.
VIT_NORMS: tuple[str, ...] = ("layer", "none")


def _check_choice(value: object, choices: tuple[str, ...], name: str) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ValueError."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _conv_norm(norm: str, channels: int) -> nn.Module:
    """The per-channel normalisation of a ResNet conv layer (Identity for "none")."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


# ---------------------------------------------------------------------------------------------
# ResNet


class BasicBlock(nn.Module):
    """ResNet basic block: ``act2(norm2(conv2(act1(norm1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=norm == "none")
        self.norm1 = _conv_norm(norm, out_channels)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=norm == "none")
        self.norm2 = _conv_norm(norm, out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=norm == "none"),
                norm=_conv_norm(norm, out_channels),
            ))
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual branch plus shortcut, then ReLU."""
        branch = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(branch + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem conv, stages of :class:`BasicBlock` (named ``block1``, ``block2``, ...), average pool, dropout, head."""

    def __init__(self, in_channels: int, channels: Sequence[int], blocks_per_stage: int, num_classes: int,
                 norm: str, dropout: float) -> None:
        super().__init__()
        self.norm_kind = norm
        self.stem = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=norm == "none")
        self.stem_norm = _conv_norm(norm, channels[0])
        self.stem_act = nn.ReLU()
        previous, index = channels[0], 1
        for stage, width in enumerate(channels):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                self.add_module(f"block{index}", BasicBlock(previous, width, stride, norm))
                previous, index = width, index + 1
        self.num_blocks = index - 1
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(previous, num_classes)

    def blocks(self) -> list[BasicBlock]:
        """The residual blocks in forward order."""
        return [getattr(self, f"block{i}") for i in range(1, self.num_blocks + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of images ``(N, C, H, W)``."""
        x = self.stem_act(self.stem_norm(self.stem(x)))
        for block in self.blocks():
            x = block(x)
        return self.head(self.drop(self.flatten(self.pool(x))))


def build_resnet(
    in_channels: int = 1,
    channels: Sequence[int] = (16, 32, 64),
    blocks_per_stage: int = 1,
    out_features: int = 10,
    norm: str = "batch",
    dropout: float = 0.0,
) -> SmallResNet:
    """A small ResNet (defaults: stages of 16/32/64 channels, one basic block each, ~78k parameters)."""
    in_channels = _check_positive_int(in_channels, "in_channels")
    sizes = _check_sizes(channels, "channels", allow_empty=False)
    blocks_per_stage = _check_positive_int(blocks_per_stage, "blocks_per_stage")
    out_features = _check_positive_int(out_features, "out_features")
    norm = _check_choice(norm, RESNET_NORMS, "norm")
    return SmallResNet(in_channels, sizes, blocks_per_stage, out_features, norm, _check_dropout(dropout))


# ---------------------------------------------------------------------------------------------
# ViT


class PatchEmbedding(nn.Module):
    """Patches -> ``dim`` features (strided conv ``proj``), then prepend the class token and add positions."""

    token_wise = True  # its output (N, tokens, dim) has its units on the last axis (read by the Monitor)

    def __init__(self, in_channels: int, dim: int, patch_size: int, num_patches: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(N, C, H, W)`` -> tokens ``(N, 1 + patches, dim)`` (class token first)."""
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed


class AttentionOutput(nn.Linear):
    """The output projection ``o`` of an attention: a Linear whose input is the concatenation of ``concat_heads``
    head outputs of equal width (the Monitor's ``duplicate_heads_fraction`` reads its input head by head)."""

    def __init__(self, in_features: int, out_features: int, heads: int) -> None:
        super().__init__(in_features, out_features)
        self.concat_heads = heads

    def extra_repr(self) -> str:
        """Linear's description plus the head count."""
        return f"{super().extra_repr()}, concat_heads={self.concat_heads}"


class SelfAttention(nn.Module):
    """Multi-head self-attention with explicit ``q``, ``k``, ``v``, ``o`` projections; ``drop`` acts on the weights.

    Head ``h`` owns features ``h * head_dim ... (h + 1) * head_dim - 1`` of ``q``, ``k`` and ``v`` (and the
    same input columns of ``o``).  The output of ``drop`` is the attention matrix ``(N, heads, T, T)``.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.q = nn.Linear(dim, inner)
        self.k = nn.Linear(dim, inner)
        self.v = nn.Linear(dim, inner)
        self.drop = nn.Dropout(dropout)
        self.o = AttentionOutput(inner, dim, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, dim) -> (N, T, dim)``: ``o(concat_h softmax(q_h k_h^T / sqrt(head_dim)) v_h)``."""
        n, t, _ = x.shape

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(n, t, self.heads, self.head_dim).transpose(1, 2)  # (N, heads, T, head_dim)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        weights = self.drop(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1))
        return self.o((weights @ v).transpose(1, 2).reshape(n, t, self.heads * self.head_dim))


class TransformerMLP(nn.Module):
    """Token-wise ``fc2(drop(act(fc1(x))))`` with GELU."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, dim) -> (N, T, dim)``."""
        return self.fc2(self.drop(self.act(self.fc1(x))))


class TransformerBlock(nn.Module):
    """Pre-LN block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (norms are Identity for ``norm="none"``)."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, norm: str, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim) if norm == "layer" else nn.Identity()
        self.attn = SelfAttention(dim, heads, head_dim, dropout)
        self.norm2 = nn.LayerNorm(dim) if norm == "layer" else nn.Identity()
        self.mlp = TransformerMLP(dim, mlp_hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual stream ``(N, T, dim)`` in and out."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """``embed``, transformer blocks ``block1``..., final ``norm`` and a linear ``head`` on the class token."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], patch_size: int, dim: int, depth: int,
                 heads: int, head_dim: int, mlp_hidden: int, num_classes: int, norm: str, dropout: float) -> None:
        super().__init__()
        self.norm_kind = norm
        num_patches = (image_size[0] // patch_size) * (image_size[1] // patch_size)
        self.embed = PatchEmbedding(in_channels, dim, patch_size, num_patches)
        for index in range(1, depth + 1):
            self.add_module(f"block{index}", TransformerBlock(dim, heads, head_dim, mlp_hidden, norm, dropout))
        self.depth = depth
        self.norm = nn.LayerNorm(dim) if norm == "layer" else nn.Identity()
        self.head = nn.Linear(dim, num_classes)

    def blocks(self) -> list[TransformerBlock]:
        """The transformer blocks in forward order."""
        return [getattr(self, f"block{i}") for i in range(1, self.depth + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of images ``(N, C, H, W)``."""
        x = self.embed(x)
        for block in self.blocks():
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def build_vit(
    in_channels: int = 1,
    image_size: int | Sequence[int] = 28,
    patch_size: int = 7,
    dim: int = 32,
    depth: int = 2,
    heads: int = 4,
    head_dim: int | None = None,
    mlp_ratio: int = 2,
    out_features: int = 10,
    norm: str = "layer",
    dropout: float = 0.0,
) -> SmallViT:
    """A small pre-LN ViT (defaults: 7x7 patches -> 16 tokens + class token, dim 32, 2 blocks of 4 heads, ~20k params).

    ``head_dim`` defaults to ``dim // heads``; ``mlp_ratio * dim`` is the MLP width; ``dropout`` sets the
    attention-weight and MLP dropouts; ``norm`` is "layer" or "none".
    """
    in_channels = _check_positive_int(in_channels, "in_channels")
    height, width = _spatial_size(image_size)
    patch_size = _check_positive_int(patch_size, "patch_size")
    if height % patch_size or width % patch_size:
        raise ValueError(f"image_size {height}x{width} is not divisible by patch_size {patch_size}")
    dim = _check_positive_int(dim, "dim")
    depth = _check_positive_int(depth, "depth")
    heads = _check_positive_int(heads, "heads")
    if head_dim is None:
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}; pass head_dim explicitly")
        head_dim = dim // heads
    head_dim = _check_positive_int(head_dim, "head_dim")
    mlp_ratio = _check_positive_int(mlp_ratio, "mlp_ratio")
    out_features = _check_positive_int(out_features, "out_features")
    norm = _check_choice(norm, VIT_NORMS, "norm")
    return SmallViT(in_channels, (height, width), patch_size, dim, depth, heads, head_dim, mlp_ratio * dim,
                    out_features, norm, _check_dropout(dropout))
