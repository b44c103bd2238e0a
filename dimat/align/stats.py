"""Streaming activation statistics per permutation group, accumulated in float64.

Only per-group sums are kept (means, second moments, cross moments): never the activations.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Sequence

import torch
from torch import nn

from .inputs import iter_inputs
from .spec import PermutationSpec


def _units_last(a: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N * prod(spatial), C): every position is a sample of each unit."""
    if a.dim() == 2:
        return a
    return a.movedim(1, -1).reshape(-1, a.shape[1])


class CrossStats:
    """Running first and second moments of reference units ``a`` and another model's units ``b``."""

    def __init__(self, size: int, device: torch.device | str = "cpu") -> None:
        kw = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.sum_a = torch.zeros(size, **kw)
        self.sum_b = torch.zeros(size, **kw)
        self.sum_aa = torch.zeros(size, **kw)
        self.sum_bb = torch.zeros(size, **kw)
        self.sum_ab = torch.zeros(size, size, **kw)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a = _units_last(a).to(torch.float64)
        b = _units_last(b).to(torch.float64)
        self.n += a.shape[0]
        self.sum_a += a.sum(0)
        self.sum_b += b.sum(0)
        self.sum_aa += (a * a).sum(0)
        self.sum_bb += (b * b).sum(0)
        self.sum_ab += a.T @ b

    @property
    def mean_a(self) -> torch.Tensor:
        return self.sum_a / self.n

    @property
    def mean_b(self) -> torch.Tensor:
        return self.sum_b / self.n

    def cross_covariance(self) -> torch.Tensor:
        return self.sum_ab / self.n - torch.outer(self.mean_a, self.mean_b)

    def correlation(self, eps: float = 1e-12) -> torch.Tensor:
        """Pearson correlation ``corr[i, j]`` between reference unit i and other unit j.

        Constant (dead) units get correlation 0 with everything rather than NaN.
        """
        var_a = (self.sum_aa / self.n - self.mean_a ** 2).clamp_min(0)
        var_b = (self.sum_bb / self.n - self.mean_b ** 2).clamp_min(0)
        denom = torch.outer(var_a.sqrt(), var_b.sqrt())
        corr = self.cross_covariance() / denom.clamp_min(eps)
        return torch.where(denom > eps, corr, torch.zeros_like(corr))


@contextmanager
def _capture(model: nn.Module, names: Sequence[str], store: dict[str, torch.Tensor]):
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        if name not in modules:
            raise ValueError(f"permutation spec hooks module '{name}', which {type(model).__name__} does not have")

        def hook(_m, _inp, out, name=name):
            store[name] = out.detach()
        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_cross_stats(reference: nn.Module, others: Sequence[nn.Module], data: Iterable,
                        spec: PermutationSpec, max_batches: int | None = None,
                        ) -> list[dict[str, list[CrossStats]]]:
    """For each other model and group, one ``CrossStats`` per hook point of the group.

    The reference's activations are computed once per batch and shared by all others.
    """
    hook_names = sorted({h for g in spec.groups for h in g.hooks})
    missing = [g.name for g in spec.groups if not g.hooks]
    if missing:
        raise ValueError(f"activation matching needs hook modules for every group; none declared for {missing}")
    device = next(reference.parameters()).device
    stats = [{g.name: [CrossStats(g.size, device) for _ in g.hooks] for g in spec.groups} for _ in others]
    models = [reference, *others]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    stores: list[dict[str, torch.Tensor]] = [{} for _ in models]
    batches = 0
    try:
        from contextlib import ExitStack
        with ExitStack() as stack:
            for m, store in zip(models, stores):
                stack.enter_context(_capture(m, hook_names, store))
            for x in iter_inputs(data, max_batches, device):
                batches += 1
                for m in models:
                    m(x)
                for k, _ in enumerate(others):
                    for g in spec.groups:
                        for s, h in zip(stats[k][g.name], g.hooks):
                            s.update(stores[0][h], stores[k + 1][h])
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    if batches == 0:
        raise ValueError("data is empty: no batches to collect activation statistics from")
    return stats
