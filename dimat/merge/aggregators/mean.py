"""The plain weighted mean: DIMAT's default aggregator, and the one mean of ``dimat.merge``."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .base import AggregationContext, BaseAggregator, StateDict


def weighted_average(own: Mapping[str, torch.Tensor], others: Sequence[Mapping[str, torch.Tensor]],
                     weights: Sequence[float], context: object | None = None) -> StateDict:
    """Σ_j w_j θ_j over own (weights[0]) and others; integer buffers are kept from ``own``.

    The weights are used as given (callers validate them). One accumulator per entry rather than a
    stacked ``(1 + k, ...)`` delta tensor: the default merge holds no extra copy per neighbour.
    """
    out: StateDict = {}
    states = [own, *others]
    for key, t in own.items():
        if not torch.is_floating_point(t):
            out[key] = t.clone()
            continue
        acc = torch.zeros_like(t, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
        for w, s in zip(weights, states):
            acc.add_(s[key].to(device=acc.device, dtype=acc.dtype), alpha=float(w))
        out[key] = acc.to(t.dtype)
    return out


class MeanAggregator(BaseAggregator):
    """The plain weighted average ``sum_j w_j theta_j`` (what DIMAT does without a defence)."""

    name = "mean"

    def aggregate_states(self, own: Mapping[str, torch.Tensor], others: Sequence[Mapping[str, torch.Tensor]],
                         weights: torch.Tensor, context: AggregationContext | None) -> StateDict:
        return weighted_average(own, others, weights)


def is_plain_mean(aggregator: object | None) -> bool:
    """Whether ``aggregator`` is the weighted mean: ``None`` (the one spelling callers use) or a :class:`MeanAggregator`.

    The plain mean of states as sent depends only on the row of weights, so it may be shared
    between peers (``dimat.federation.shared_merge``).
    """
    return aggregator is None or aggregator is weighted_average or isinstance(aggregator, MeanAggregator)


__all__ = ["MeanAggregator", "is_plain_mean", "weighted_average"]
