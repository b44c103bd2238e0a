"""Multi-layer perceptron with configurable widths; one permutation group per hidden layer."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..align.spec import PermutationSpec, SpecBuilder
from .registry import register_model


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("MLP needs at least one hidden layer")
        dims = [input_dim, *hidden]
        self.fc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = nn.ModuleList(nn.ReLU() for _ in hidden)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for fc, act in zip(self.fc, self.act):
            x = act(fc(x))
        return self.head(x)

    def permutation_spec(self) -> PermutationSpec:
        b = SpecBuilder()
        for i, fc in enumerate(self.fc):
            nxt = f"fc.{i + 1}" if i + 1 < len(self.fc) else "head"
            b.add(f"hidden{i}", fc.out_features,
                  [(f"fc.{i}.weight", 0), (f"fc.{i}.bias", 0), (f"{nxt}.weight", 1)],
                  hooks=[f"act.{i}"])
        return b.build()


@register_model("mlp")
def mlp(num_classes: int = 10, input_dim: int | None = None, input_shape: Sequence[int] | None = None,
        hidden: Sequence[int] = (128, 128), width: float = 1.0, in_channels: int | None = None) -> MLP:
    """``input_dim`` or ``input_shape`` (per sample) sets the input size; default 40 (MNIST-1D)."""
    if input_dim is None:
        input_dim = math.prod(input_shape) if input_shape is not None else 40
    return MLP(int(input_dim), [max(1, int(round(h * width))) for h in hidden], num_classes)
