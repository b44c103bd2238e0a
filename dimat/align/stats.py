"""Streaming activation statistics per permutation group, accumulated in float64.

Only per-group sums are kept (means, second moments, cross moments): never the activations.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .inputs import iter_inputs
from .spec import PermutationSpec
from .structure import IN_PROJ, hook_module


def units_first(a: torch.Tensor, dim: int = 1, pool: tuple[int, ...] = (), offset: int | None = None,
                size: int = 0) -> torch.Tensor:
    """(N, C, *spatial) -> (C, N * prod(spatial)): every position is a sample of each unit.

    Args:
        a: one hook's output.
        dim: where the units are (1 for channels, -1 for a transformer's (N, T, D) features).
        pool: axes averaged over first (their order is permuted, so they are no aligned samples).
        offset: where the units start on ``dim`` when they are a slice of it (``size`` of them).
    """
    if offset is not None:
        a = a.narrow(dim, offset, size)
    if pool:
        a = a.mean(dim=tuple(pool), keepdim=True)
    if a.dim() == 2 and dim in (1, -1):
        return a.T
    return a.movedim(dim, 0).reshape(a.shape[dim], -1)


class BatchMoments:
    """One batch of one model's units, centred once and shared by every neighbour's statistics.

    Products are formed on batch-centred activations in their own precision (a BLAS GEMM, which
    dominates the cost of alignment, without cancellation) and merged across batches in float64
    with Chan et al.'s pairwise update.
    """

    def __init__(self, a: torch.Tensor, dim: int = 1, pool: tuple[int, ...] = (), offset: int | None = None,
                 size: int = 0) -> None:
        units = units_first(a.detach().float(), dim, pool, offset, size)
        if units.untyped_storage().data_ptr() == a.untyped_storage().data_ptr():
            units = units.clone()  # a view of the hooked output, which other hook points still read
        self.n = units.shape[1]
        mean = units.mean(1, keepdim=True)
        self.centred = units.sub_(mean)
        self.mean = mean.squeeze(1).double()
        self.sq = torch.linalg.vector_norm(self.centred, dim=1).double() ** 2


class CrossStats:
    """Running means and (co-)moments of reference units ``a`` and another model's units ``b``."""

    def __init__(self, size: int, device: torch.device | str = "cpu") -> None:
        kw = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.mean_a = torch.zeros(size, **kw)
        self.mean_b = torch.zeros(size, **kw)
        self.m_aa = torch.zeros(size, **kw)
        self.m_bb = torch.zeros(size, **kw)
        self.m_ab = torch.zeros(size, size, **kw)

    def update(self, a: torch.Tensor | BatchMoments, b: torch.Tensor | BatchMoments) -> None:
        a = a if isinstance(a, BatchMoments) else BatchMoments(a)
        b = b if isinstance(b, BatchMoments) else BatchMoments(b)
        n_old, n_new = self.n, a.n
        total = n_old + n_new
        da, db = a.mean - self.mean_a, b.mean - self.mean_b
        f = n_old * n_new / total
        self.m_ab += (a.centred @ b.centred.T).double() + f * torch.outer(da, db)
        self.m_aa += a.sq + f * da * da
        self.m_bb += b.sq + f * db * db
        self.mean_a += da * (n_new / total)
        self.mean_b += db * (n_new / total)
        self.n = total

    @property
    def var_a(self) -> torch.Tensor:
        return self.m_aa / self.n

    @property
    def var_b(self) -> torch.Tensor:
        return self.m_bb / self.n

    def cross_covariance(self) -> torch.Tensor:
        return self.m_ab / self.n

    def correlation(self, eps: float = 1e-12) -> torch.Tensor:
        """Pearson correlation ``corr[i, j]`` between reference unit i and other unit j.

        Constant (dead) units get correlation 0 with everything rather than NaN.
        """
        denom = torch.outer(self.var_a.clamp_min(0).sqrt(), self.var_b.clamp_min(0).sqrt())
        corr = self.cross_covariance() / denom.clamp_min(eps)
        return torch.where(denom > eps, corr, torch.zeros_like(corr))


@contextmanager
def _capture(model: nn.Module, names: Sequence[str], store: dict[str, torch.Tensor]):
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        if hook_module(name) not in modules:
            raise ValueError(f"permutation spec hooks module '{name}', which {type(model).__name__} does not have")
        if name.endswith(IN_PROJ):
            handles.append(modules[hook_module(name)].register_forward_hook(
                functools.partial(_in_proj_hook, store=store, name=name), with_kwargs=True))
            continue

        def hook(_m, _inp, out, name=name):
            # a copy: an in-place op after the module (ReLU(inplace=True), `out += identity`)
            # would otherwise change what the statistics read
            store[name] = out.detach().clone()
        handles.append(modules[name].register_forward_hook(hook))
    # the fused fast path of nn.MultiheadAttention / nn.TransformerEncoderLayer skips submodule hooks
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for h in handles:
            h.remove()


def _in_proj_hook(m: nn.Module, args: tuple, kwargs: dict, out, *, store: dict, name: str) -> None:
    """The query, key and value projections ``nn.MultiheadAttention`` computes inside, side by side."""
    names = ("query", "key", "value")
    x = [args[k] if k < len(args) else kwargs[n] for k, n in enumerate(names)]
    w = m.in_proj_weight.chunk(3)
    b = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None,) * 3
    if not (x[0].shape[:-1] == x[1].shape[:-1] == x[2].shape[:-1]):
        raise ValueError(f"activation matching reads the projections inside '{hook_module(name)}' side by side, "
                         "which needs query, key and value of one length; use method='weight'")
    store[name] = torch.cat([F.linear(t, wk, bk) for t, wk, bk in zip(x, w, b)], -1).detach()


@torch.no_grad()
def collect_cross_stats(reference: nn.Module, others: Sequence[nn.Module], data: Iterable,
                        spec: PermutationSpec, max_batches: int | None = None,
                        ) -> list[dict[str, list[CrossStats]]]:
    """For each other model and group, one ``CrossStats`` per hook point of the group.

    The reference's activations are computed once per batch and shared by all others.
    """
    points = list(dict.fromkeys(p for g in spec.matched for p in g.hook_reads))
    hook_names = sorted({p[0] for p in points})
    missing = [g.name for g in spec.matched if not g.hooks]
    if missing:
        raise ValueError(f"activation matching needs hook modules for every group; no module output carries the "
                         f"units of {missing[:3]}: declare hooks for them in permutation_spec(), or align with "
                         "method='weight'")
    device = next(reference.parameters()).device
    stats = [{g.name: [CrossStats(g.size, device) for _ in g.hooks] for g in spec.matched} for _ in others]
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
                ref = {p: BatchMoments(stores[0][p[0]], *p[1:]) for p in points}
                for k, _ in enumerate(others):
                    other = {p: BatchMoments(stores[k + 1][p[0]], *p[1:]) for p in points}
                    for g in spec.matched:
                        for s, p in zip(stats[k][g.name], g.hook_reads):
                            s.update(ref[p], other[p])
                    del other
                del ref
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    if batches == 0:
        raise ValueError("data is empty: no batches to collect activation statistics from")
    return stats
