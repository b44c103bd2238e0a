"""ResNet-20 (CIFAR) with a width multiplier.

Each stage's residual stream shares one permutation group (the stem or the stage's projection
shortcut, every block's last conv and BN); each block's inner channels have their own group.
The DIMAT paper uses width 8 with 3x3 conv shortcuts, our default ``shortcut_kernel=3``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..align.spec import PermutationSpec, SpecBuilder, bn_axes
from .registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, shortcut_kernel: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, shortcut_kernel, stride=stride, padding=shortcut_kernel // 2, bias=False),
                nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 blocks_per_stage: int = 3, shortcut_kernel: int = 3) -> None:
        super().__init__()
        widths = [max(1, int(round(c * width))) for c in (16, 32, 64)]
        self.conv = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages = []
        c_in = widths[0]
        for s, c in enumerate(widths):
            blocks = [BasicBlock(c_in if b == 0 else c, c, 2 if (s > 0 and b == 0) else 1, shortcut_kernel)
                      for b in range(blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
            c_in = c
        self.layer1, self.layer2, self.layer3 = stages
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.head(x.mean(dim=(-2, -1)))

    def permutation_spec(self) -> PermutationSpec:
        b = SpecBuilder()
        stages = [self.layer1, self.layer2, self.layer3]
        for s, stage in enumerate(stages):
            name = f"layer{s + 1}"
            size = stage[0].conv2.out_channels
            axes: list[tuple[str, int]] = []
            hooks: list[str] = []
            if s == 0:
                axes += [("conv.weight", 0), *bn_axes("bn")]
                hooks.append("relu")
            for k, block in enumerate(stage):
                p = f"{name}.{k}"
                axes += [(f"{p}.conv2.weight", 0), *bn_axes(f"{p}.bn2")]
                if len(block.shortcut):
                    axes += [(f"{p}.shortcut.0.weight", 0), *bn_axes(f"{p}.shortcut.1")]
                if k > 0 or (s == 0):
                    # the stream enters this block: its first conv and any shortcut read it
                    axes.append((f"{p}.conv1.weight", 1))
                hooks.append(f"{p}.relu2")
            # the stream feeds the next stage's first block (conv1 and projection) or the head
            if s + 1 < len(stages):
                nxt = f"layer{s + 2}.0"
                axes += [(f"{nxt}.conv1.weight", 1), (f"{nxt}.shortcut.0.weight", 1)]
            else:
                axes.append(("head.weight", 1))
            b.add(name, size, axes, hooks)
            for k, block in enumerate(stage):
                p = f"{name}.{k}"
                b.add(f"{p}.inner", block.conv1.out_channels,
                      [(f"{p}.conv1.weight", 0), *bn_axes(f"{p}.bn1"), (f"{p}.conv2.weight", 1)],
                      hooks=[f"{p}.relu1"])
        return b.build()


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, shortcut_kernel: int = 3,
             input_shape: Sequence[int] | None = None) -> ResNet20:
    if input_shape is not None:
        in_channels = int(input_shape[0])
    return ResNet20(in_channels, num_classes, width, shortcut_kernel=shortcut_kernel)
