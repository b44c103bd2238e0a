"""BatchNorm statistics: recomputed on data after a merge (REPAIR style), or mixed as moments across peers."""
from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from .inputs import iter_inputs

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) for m in model.modules())


@torch.no_grad()
def reset_bn_stats(model: nn.Module, data: Iterable, max_batches: int | None = None) -> nn.Module:
    """Recompute every BatchNorm's running mean/var over ``data`` as an exact average.

    ``torch.optim.swa_utils.update_bn`` does the work (cumulative average, momenta restored); this
    adds the inputs of any ``data`` form dimat accepts, ``max_batches``, and an error for no data.
    """
    if not has_batchnorm(model):
        return model
    device = next(model.parameters()).device
    seen = 0

    def inputs() -> Iterator[torch.Tensor]:
        nonlocal seen
        for x in iter_inputs(data, max_batches, device):
            seen += 1
            yield x

    update_bn(inputs(), model)
    if seen == 0:
        raise ValueError("data is empty: cannot recompute BatchNorm statistics")
    return model


def _forward_in_train_mode(model: nn.Module, data: Iterable, max_batches: int | None, purpose: str) -> None:
    """Run ``data`` through ``model`` in train mode (each batch normalised by its own statistics)."""
    model.train()
    device = next(model.parameters()).device
    n = 0
    for x in iter_inputs(data, max_batches, device):
        model(x)
        n += 1
    if n == 0:
        raise ValueError(f"data is empty: cannot {purpose} BatchNorm statistics")


# ------------------------------------------------------------------ statistics of a federation's data
# A BatchNorm module's statistics as moments (per-channel mean and E[x^2] of its input). Moments of a
# union of data sets are the count-weighted mixture of each set's moments; variances are not (the
# union's variance also holds the spread of the sets' means). That is what lets peers combine
# statistics each measured on its own data into statistics of the federation's data.
Moments = dict[str, tuple[torch.Tensor, torch.Tensor, int]]


def bn_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's BatchNorm modules (their buffers are ``<name>.running_mean`` ...)."""
    return [name for name, mod in model.named_modules() if isinstance(mod, _BN)]


@torch.no_grad()
def bn_moments(model: nn.Module, data: Iterable, max_batches: int | None = None) -> Moments:
    """Per BatchNorm module: (per-channel mean, per-channel E[x^2], count) of its input, in float64.

    Measured as :func:`reset_bn_stats` and training see the data: a train-mode forward, each batch
    normalised by its own statistics, so a module's input depends only on the batch and the weights,
    and moments over a union of batch lists are exactly the count-weighted mixture of the lists'
    moments. ``model`` is not modified (a copy runs the forward).
    """
    import copy

    m = copy.deepcopy(model)
    bns = {name: mod for name, mod in m.named_modules() if isinstance(mod, _BN)}
    if not bns:
        return {}
    acc: dict[str, list] = {}

    def hook(name: str):
        def record(_mod: nn.Module, inp: tuple) -> None:
            x = inp[0].detach().double()
            dims = [d for d in range(x.dim()) if d != 1]
            s, q = x.sum(dims), (x * x).sum(dims)
            a = acc.setdefault(name, [torch.zeros_like(s), torch.zeros_like(q), 0])
            a[0] += s
            a[1] += q
            a[2] += x.numel() // x.shape[1]
        return record

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in bns.items()]
    try:
        _forward_in_train_mode(m, data, max_batches, "measure")
    finally:
        for h in handles:
            h.remove()
    return {name: (s / c, q / c, c) for name, (s, q, c) in acc.items()}


def moments_into_state(state: Mapping[str, torch.Tensor], moments: Moments) -> dict[str, torch.Tensor]:
    """``state`` with each BatchNorm's running mean / variance set from ``moments`` (population variance)."""
    out = dict(state)
    for name, (mean, sq, _) in moments.items():
        rm, rv = out[f"{name}.running_mean"], out[f"{name}.running_var"]
        out[f"{name}.running_mean"] = mean.to(rm.dtype)
        out[f"{name}.running_var"] = (sq - mean * mean).clamp_min(0).to(rv.dtype)
    return out


def to_second_moments(state: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """``state`` with each named BatchNorm's ``running_var`` replaced by E[x^2] = var + mean^2.

    Any weighted combination of such states, turned back by :func:`from_second_moments`, mixes the
    statistics as the data they were measured on would mix. Dtypes are kept, so an aggregator sees
    the tensors it always sees.
    """
    out = dict(state)
    for name in names:
        rm, rv = f"{name}.running_mean", f"{name}.running_var"
        mean = out[rm].double()
        out[rv] = (out[rv].double() + mean * mean).to(out[rv].dtype)
    return out


def from_second_moments(state: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_second_moments` (a variance is never negative)."""
    out = dict(state)
    for name in names:
        rm, rv = f"{name}.running_mean", f"{name}.running_var"
        mean = out[rm].double()
        out[rv] = (out[rv].double() - mean * mean).clamp_min(0).to(out[rv].dtype)
    return out
