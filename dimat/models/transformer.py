"""A small pre-norm transformer: a character-level language model and a tiny ViT.

Permutation structure (declared here; ``dimat.align.derive_spec`` finds the same by tracing):

- the residual stream is one group: the token/patch embedding, positions, every LayerNorm, the
  input axis of every query/key/value/fc1 and the output axis of every attention output and fc2;
- each block's MLP hidden units are a group;
- each block's attention has two *headed* groups sharing one head permutation: the query/key units
  (a head's query and key units must move together, their dot product is unchanged) and the
  value/output units (a head's value units and the matching input columns of the output
  projection). Whole heads move; inside a head the units may be reordered freely.

Attention is written with separate q/k/v/o Linear layers so every group has a module to observe.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..align.spec import PermutationSpec, SpecBuilder
from .registry import register_model


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool, context: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads, self.causal = heads, causal
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        if causal:
            self.register_buffer("mask", torch.ones(context, context, dtype=torch.bool).triu(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads
        q = self.q(x).view(b, t, h, d // h).transpose(1, 2)
        k = self.k(x).view(b, t, h, d // h).transpose(1, 2)
        v = self.v(x).view(b, t, h, d // h).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // h))
        if self.causal:
            att = att.masked_fill(self.mask[:t, :t], float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        return self.o(y)


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, causal: bool, context: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal, context)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, max(1, int(round(dim * mlp_ratio))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def _ln(prefix: str) -> list[tuple[str, int]]:
    return [(f"{prefix}.weight", 0), (f"{prefix}.bias", 0)]


def _transformer_spec(dim: int, blocks: nn.ModuleList, embed: list[tuple[str, int]]) -> PermutationSpec:
    """Every block's attention and MLP groups, then the residual stream (from ``embed`` axes to the head)."""
    b = SpecBuilder()
    stream = list(embed)
    hooks: list[str] = []
    for i, blk in enumerate(blocks):
        p = f"blocks.{i}"
        stream += _ln(f"{p}.ln1") + _ln(f"{p}.ln2")
        stream += [(f"{p}.attn.{n}.weight", 1) for n in "qkv"]
        stream += [(f"{p}.attn.o.weight", 0), (f"{p}.attn.o.bias", 0)]
        stream += [(f"{p}.mlp.fc1.weight", 1), (f"{p}.mlp.fc2.weight", 0), (f"{p}.mlp.fc2.bias", 0)]
        hooks += [f"{p}.ln1", f"{p}.ln2"]
        a = blk.attn
        dim = a.q.out_features
        b.add(f"{p}.attn.qk", dim, [(f"{p}.attn.q.weight", 0), (f"{p}.attn.q.bias", 0),
                                    (f"{p}.attn.k.weight", 0), (f"{p}.attn.k.bias", 0)],
              hooks=[f"{p}.attn.q", f"{p}.attn.k"], hook_dims=(2, 2), heads=a.heads, head_group=f"{p}.attn.heads")
        b.add(f"{p}.attn.vo", dim, [(f"{p}.attn.v.weight", 0), (f"{p}.attn.v.bias", 0), (f"{p}.attn.o.weight", 1)],
              hooks=[f"{p}.attn.v"], hook_dims=(2,), heads=a.heads, head_group=f"{p}.attn.heads")
        b.add(f"{p}.mlp.hidden", blk.mlp.fc1.out_features,
              [(f"{p}.mlp.fc1.weight", 0), (f"{p}.mlp.fc1.bias", 0), (f"{p}.mlp.fc2.weight", 1)],
              hooks=[f"{p}.mlp.act"], hook_dims=(2,))
    stream += _ln("ln_f") + [("head.weight", 1)]
    hooks.append("ln_f")
    b.add("stream", dim, stream, hooks=hooks, hook_dims=(2,) * len(hooks))
    return b.build()


class TransformerLM(nn.Module):
    """Next-token classifier over a window of token ids: logits for the token after the last position.

    Inputs are ``(N, T)`` token ids (float or integer; dimat's data sets hold floats). ``causal``
    makes it a decoder (each position attends to earlier ones); otherwise an encoder.
    """

    def __init__(self, vocab: int, context: int, dim: int = 64, depth: int = 2, heads: int = 4,
                 mlp_ratio: float = 2.0, causal: bool = True) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, context, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, causal, context) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x.long()) + self.pos[:, :t]
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h)[:, -1])

    def permutation_spec(self) -> PermutationSpec:
        return _transformer_spec(self.tok.embedding_dim, self.blocks, [("tok.weight", 1), ("pos", 2)])


class ViT(nn.Module):
    """A tiny vision transformer: patch embedding (a strided conv), class token, pre-norm blocks."""

    def __init__(self, in_channels: int, image_size: Sequence[int], num_classes: int, patch: int = 4,
                 dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        hh, ww = (int(s) // patch for s in image_size)
        if hh < 1 or ww < 1:
            raise ValueError(f"patch size {patch} is larger than the image {tuple(image_size)}")
        tokens = hh * ww + 1
        self.patch = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, False, tokens) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h)[:, 0])

    def permutation_spec(self) -> PermutationSpec:
        return _transformer_spec(self.patch.out_channels, self.blocks,
                                 [("patch.weight", 0), ("patch.bias", 0), ("cls", 2), ("pos", 2)])


@register_model("transformer")
def transformer(num_classes: int = 64, input_shape: Sequence[int] | None = None, context: int | None = None,
                dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0, causal: bool = True,
                width: float = 1.0) -> TransformerLM:
    """``num_classes`` is the vocabulary; the context is ``input_shape[0]`` (or ``context``, default 32)."""
    if context is None:
        context = int(input_shape[-1]) if input_shape is not None else 32
    d = max(heads, int(round(dim * width / heads)) * heads)
    return TransformerLM(int(num_classes), int(context), d, depth, heads, mlp_ratio, causal)


@register_model("vit")
def vit(num_classes: int = 10, input_shape: Sequence[int] | None = None, in_channels: int = 3, patch: int = 4,
        dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0, width: float = 1.0) -> ViT:
    """Images shaped ``input_shape`` = (C, H, W) (default 3x32x32) cut into ``patch`` x ``patch`` tokens."""
    shape = tuple(int(s) for s in input_shape) if input_shape is not None else (in_channels, 32, 32)
    d = max(heads, int(round(dim * width / heads)) * heads)
    return ViT(shape[0], shape[1:], int(num_classes), patch, d, depth, heads, mlp_ratio)
