"""Types shared across the package (one definition each)."""
from __future__ import annotations

import torch

#: a model's state (or a payload): tensor name -> tensor
StateDict = dict[str, torch.Tensor]

def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype of a tensor of ``dtype``: float64 stays float64, every other float is computed in float32.

    Half precision would make medians, norms and quantisation of small deltas too coarse.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


__all__ = ["StateDict", "work_dtype"]
