"""The baseline aggregator: a weighted average of floating-point entries."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

StateDict = dict[str, torch.Tensor]


def weighted_average(own: Mapping[str, torch.Tensor], others: Sequence[Mapping[str, torch.Tensor]],
                     weights: Sequence[float], context: object | None = None) -> StateDict:
    """Σ_j w_j θ_j over own (weights[0]) and others; integer buffers are kept from ``own``."""
    out: StateDict = {}
    states = [own, *others]
    for key, t in own.items():
        if not torch.is_floating_point(t):
            out[key] = t.clone()
            continue
        acc = torch.zeros_like(t, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
        for w, s in zip(weights, states):
            acc.add_(s[key].to(acc.dtype), alpha=float(w))
        out[key] = acc.to(t.dtype)
    return out
