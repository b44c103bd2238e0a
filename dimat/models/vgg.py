"""VGG-11 / VGG-16 with BatchNorm; one permutation group per conv layer."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..align.spec import PermutationSpec, SpecBuilder, bn_axes
from .registry import register_model

CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, config: Sequence, in_channels: int, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.ModuleList()
        self.bn = nn.ModuleList()
        self.act = nn.ModuleList()
        self.pool_after: set[int] = set()
        c_in = in_channels
        for item in config:
            if item == "M":
                self.pool_after.add(len(self.conv) - 1)
                continue
            c = max(1, int(round(item * width)))
            self.conv.append(nn.Conv2d(c_in, c, 3, padding=1, bias=False))
            self.bn.append(nn.BatchNorm2d(c))
            self.act.append(nn.ReLU())
            c_in = c
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, bn, act) in enumerate(zip(self.conv, self.bn, self.act)):
            x = act(bn(conv(x)))
            # Pool only while there is room: the same network then also runs on 8x8 digits.
            if i in self.pool_after and min(x.shape[-2:]) >= 2:
                x = nn.functional.max_pool2d(x, 2)
        return self.head(x.mean(dim=(-2, -1)))

    def permutation_spec(self) -> PermutationSpec:
        b = SpecBuilder()
        for i, conv in enumerate(self.conv):
            nxt = (f"conv.{i + 1}.weight", 1) if i + 1 < len(self.conv) else ("head.weight", 1)
            b.add(f"conv{i}", conv.out_channels, [(f"conv.{i}.weight", 0), *bn_axes(f"bn.{i}"), nxt],
                  hooks=[f"act.{i}"])
        return b.build()


def _factory(name: str):
    def build(num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
              input_shape: Sequence[int] | None = None) -> VGG:
        if input_shape is not None:
            in_channels = int(input_shape[0])
        return VGG(CONFIGS[name], in_channels, num_classes, width)
    build.__name__ = name
    return build


for _name in CONFIGS:
    register_model(_name)(_factory(_name))
