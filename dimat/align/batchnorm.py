"""BatchNorm statistics reset (REPAIR style): averaged or permuted weights invalidate running stats."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .inputs import iter_inputs

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) for m in model.modules())


@torch.no_grad()
def reset_bn_stats(model: nn.Module, data: Iterable, max_batches: int | None = None) -> nn.Module:
    """Recompute every BatchNorm's running mean/var over ``data`` as an exact average (momentum None)."""
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    if not bns:
        return model
    saved = [(m.momentum, m.track_running_stats) for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    device = next(model.parameters()).device
    n = 0
    try:
        for x in iter_inputs(data, max_batches, device):
            model(x)
            n += 1
    finally:
        for m, (mom, _) in zip(bns, saved):
            m.momentum = mom
        model.train(was_training)
    if n == 0:
        raise ValueError("data is empty: cannot recompute BatchNorm statistics")
    return model
