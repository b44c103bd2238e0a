"""Types shared across the package (one definition each)."""
from __future__ import annotations

import torch

#: a model's state (or a payload): tensor name -> tensor
StateDict = dict[str, torch.Tensor]

__all__ = ["StateDict"]
