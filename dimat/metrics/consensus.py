"""How far the peers' models are from agreeing."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch


def consensus_distance(states: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """Mean over peers of the squared L2 distance of their parameters to the peers' average.

    ``(1/N) * sum_p sum_k ||theta_p[k] - mean_q theta_q[k]||^2`` over every floating-point entry ``k``
    of the state dicts (weights and float buffers such as BatchNorm statistics; integer buffers like
    ``num_batches_tracked`` are skipped). Computed in float64. 0 means all peers hold the same model.
    Note it compares raw coordinates: two permuted copies of one network are *not* at distance 0.
    """
    if len(states) == 0:
        raise ValueError("consensus_distance needs at least one state")
    keys = [k for k, v in states[0].items() if torch.is_tensor(v) and v.is_floating_point()]
    for p, s in enumerate(states[1:], start=1):
        for k in keys:
            if k not in s:
                raise ValueError(f"state {p} lacks entry {k!r} present in state 0")
            if tuple(s[k].shape) != tuple(states[0][k].shape):
                raise ValueError(
                    f"entry {k!r} has shape {tuple(s[k].shape)} in state {p} but {tuple(states[0][k].shape)} in state 0"
                )
    # Streamed in two passes per entry (mean, then squared distances) rather than stacking every
    # peer's copy: memory stays one entry's size in float64 whatever the number of peers.
    total = 0.0
    with torch.no_grad():
        for k in keys:
            mean = torch.zeros(states[0][k].shape, dtype=torch.float64)
            for s in states:
                mean += s[k].detach().to("cpu", torch.float64)
            mean /= len(states)
            for s in states:
                total += float((s[k].detach().to("cpu", torch.float64) - mean).square_().sum())
    return total / len(states)
