"""1-D CNN for sequence data (MNIST-1D): conv-BN-ReLU blocks, global average pooling, linear head."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..align.spec import PermutationSpec, SpecBuilder, bn_axes
from .registry import register_model


class CNN1d(nn.Module):
    def __init__(self, in_channels: int, channels: Sequence[int], num_classes: int,
                 kernel_size: int = 5, strides: Sequence[int] | None = None, batchnorm: bool = True) -> None:
        super().__init__()
        strides = strides or [1] + [2] * (len(channels) - 1)
        self.batchnorm = batchnorm
        self.conv = nn.ModuleList()
        self.bn = nn.ModuleList()
        self.act = nn.ModuleList()
        c_in = in_channels
        for c, s in zip(channels, strides):
            self.conv.append(nn.Conv1d(c_in, c, kernel_size, stride=s, padding=kernel_size // 2, bias=not batchnorm))
            self.bn.append(nn.BatchNorm1d(c) if batchnorm else nn.Identity())
            self.act.append(nn.ReLU())
            c_in = c
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        for conv, bn, act in zip(self.conv, self.bn, self.act):
            x = act(bn(conv(x)))
        return self.head(self.pool(x).flatten(1))

    def permutation_spec(self) -> PermutationSpec:
        b = SpecBuilder()
        for i, conv in enumerate(self.conv):
            own = [(f"conv.{i}.weight", 0)]
            own += bn_axes(f"bn.{i}") if self.batchnorm else [(f"conv.{i}.bias", 0)]
            nxt = (f"conv.{i + 1}.weight", 1) if i + 1 < len(self.conv) else ("head.weight", 1)
            b.add(f"conv{i}", conv.out_channels, own + [nxt], hooks=[f"act.{i}"])
        return b.build()


@register_model("cnn1d")
def cnn1d(num_classes: int = 10, in_channels: int = 1, width: float = 1.0,
          channels: Sequence[int] = (32, 64, 64), kernel_size: int = 5, batchnorm: bool = True,
          input_shape: Sequence[int] | None = None) -> CNN1d:
    if input_shape is not None:
        in_channels = int(input_shape[0]) if len(input_shape) == 2 else 1
    return CNN1d(in_channels, [max(1, int(round(c * width))) for c in channels], num_classes,
                 kernel_size=kernel_size, batchnorm=batchnorm)
