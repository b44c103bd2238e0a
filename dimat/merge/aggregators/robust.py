"""Robust aggregation baselines acting on deltas from the receiving peer's own weights.

Every estimator here treats own (delta 0, weight ``w_0``) as one trusted vote among the
``1 + k`` participants. That matters on sparse topologies: on a ring a peer has two neighbours, and
a median or trimmed mean over two values cannot tell which one is the outlier, while over
``{own, honest, malicious}`` it can. On honest inputs every estimator stays close to the plain
weighted mean, and each reduces to it exactly in the limiting case noted in its docstring.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from .base import (
    AggregationContext,
    BaseAggregator,
    flat_norms,
    masked_weighted_mean,
    weighted_mean,
)


def _expand(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return weights.to(like.dtype).to(like.device).view(-1, *([1] * (like.ndim - 1))).expand_as(like)


def weighted_median(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise weighted median over dim 0 (midpoint when the weight splits exactly in half)."""
    vals, idx = values.sort(dim=0)
    w = _expand(weights, values).gather(0, idx)
    cum = w.cumsum(dim=0)
    half = 0.5 * cum[-1:]
    eps = 1e-9 * cum[-1:].abs().clamp_min(1.0)
    last = values.shape[0] - 1
    lo = (cum < half - eps).sum(dim=0, keepdim=True).clamp_max(last)
    hi = (cum <= half + eps).sum(dim=0, keepdim=True).clamp_max(last)
    return 0.5 * (vals.gather(0, lo) + vals.gather(0, hi)).squeeze(0)


class MedianAggregator(BaseAggregator):
    """Coordinate-wise weighted median of ``{0 (own), delta_1, ..., delta_k}``.

    Breakdown point 1/2 of the weight: an outlier holding less than half the weight cannot drag any
    coordinate beyond the honest values' range.
    """

    name = "median"

    def combine(self, deltas: torch.Tensor, weights: torch.Tensor, key: str) -> torch.Tensor:
        return weighted_median(deltas, weights)


class TrimmedMeanAggregator(BaseAggregator):
    """Coordinate-wise trimmed mean: drop the ``b`` largest and ``b`` smallest values, weighted mean of the rest.

    ``b = trim`` if given, else ``max(1, floor(trim_ratio * m))`` for ``m >= 3`` participants (so a
    ring still trims), capped so at least one value survives. ``trim=0`` is the plain mean.
    """

    name = "trimmed_mean"

    def __init__(self, trim: int | None = None, trim_ratio: float = 0.2) -> None:
        if trim is not None and trim < 0:
            raise ValueError(f"trim must be >= 0, got {trim}")
        if not 0.0 <= trim_ratio < 0.5:
            raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
        self.trim = trim
        self.trim_ratio = trim_ratio

    def n_trim(self, m: int) -> int:
        b = self.trim if self.trim is not None else (max(1, math.floor(self.trim_ratio * m)) if m >= 3 else 0)
        return min(b, (m - 1) // 2)

    def combine(self, deltas: torch.Tensor, weights: torch.Tensor, key: str) -> torch.Tensor:
        m = deltas.shape[0]
        b = self.n_trim(m)
        vals, idx = deltas.sort(dim=0)
        w = _expand(weights, deltas).gather(0, idx)
        keep = torch.zeros_like(vals)
        keep[b : m - b] = 1.0
        wk = w * keep
        # if every surviving value carries zero weight, fall back to an unweighted trimmed mean
        denom = wk.sum(dim=0)
        fallback = denom <= 0
        if bool(fallback.any()):
            wk = torch.where(fallback.unsqueeze(0), keep, wk)
            denom = wk.sum(dim=0)
        return (wk * vals).sum(dim=0) / denom


class NormClipAggregator(BaseAggregator):
    """Clip each neighbour's whole-model delta to L2 norm ``tau``, then take the weighted mean.

    ``tau = max_norm`` if given, else ``norm_multiplier`` times the lower median of the neighbours'
    delta norms (adaptive, as in centred/self-centred clipping): with a minority of outliers ``tau``
    is an honest norm, so an outlier's pull on the result is at most ``w_j * tau``.
    Honest neighbours with norms below ``tau`` pass unchanged.

    ``noise > 0`` adds Gaussian noise of expected L2 norm ``noise * tau`` to the merged delta
    (FLAME's and Sun et al.'s "clipping with weak noise": a backdoor rides on small, precise
    weight changes that noise blurs more than it blurs the task), drawn from the context's seed.

    It bounds influence and selects nobody, so it does not need per-peer bases: with one basis
    the norms compare like with like (``needs_own_basis = False``).
    """

    name = "norm_clip"
    needs_own_basis = False

    def __init__(self, max_norm: float | None = None, norm_multiplier: float = 1.0, noise: float = 0.0) -> None:
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        if not norm_multiplier > 0:
            raise ValueError(f"norm_multiplier must be > 0, got {norm_multiplier}")
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.max_norm = max_norm
        self.norm_multiplier = norm_multiplier
        self.noise = noise
        self.last_tau: float | None = None

    def aggregate_deltas(
        self,
        deltas: dict[str, torch.Tensor],
        weights: torch.Tensor,
        own: Mapping[str, torch.Tensor],
        context: AggregationContext | None,
    ) -> dict[str, torch.Tensor]:
        norms = flat_norms(deltas)
        neighbour = norms[1:].sort().values
        tau = self.max_norm if self.max_norm is not None else self.norm_multiplier * float(neighbour[(len(neighbour) - 1) // 2])
        self.last_tau = tau
        scale = torch.clamp(tau / norms.clamp_min(1e-30), max=1.0)
        scale[0] = 1.0
        merged = {k: weighted_mean(d * _expand(scale, d), weights) for k, d in deltas.items()}
        if self.noise > 0 and tau > 0:
            if context is None:
                raise ValueError("norm_clip with noise needs an AggregationContext (its seed)")
            gen = torch.Generator().manual_seed(int(context.seed))
            total = sum(d[0].numel() for d in deltas.values())
            std = self.noise * tau / math.sqrt(max(total, 1))
            for k in sorted(merged):  # a fixed order: the same seed gives the same noise
                merged[k] = merged[k] + std * torch.randn(merged[k].shape, generator=gen, dtype=merged[k].dtype).to(
                    merged[k].device)
        return merged


class MultiKrumAggregator(BaseAggregator):
    """Multi-Krum (Blanchard et al. 2017) over whole-model deltas, own always kept.

    Each participant's score is the sum of squared distances to its ``max(1, m - f - 2)`` nearest
    other participants (own's zero delta included in the pool, ``f = num_byzantine``); the
    ``num_selected`` (default ``k - f``, at least 1) best-scored neighbours are averaged with own,
    weights renormalised. With ``f = 0`` and ``num_selected = k`` it is the plain mean.
    """

    name = "multi_krum"

    def __init__(self, num_byzantine: int = 1, num_selected: int | None = None) -> None:
        if num_byzantine < 0:
            raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
        if num_selected is not None and num_selected < 1:
            raise ValueError(f"num_selected must be >= 1, got {num_selected}")
        self.num_byzantine = num_byzantine
        self.num_selected = num_selected
        self.last_selected: list[int] = []

    def aggregate_deltas(
        self,
        deltas: dict[str, torch.Tensor],
        weights: torch.Tensor,
        own: Mapping[str, torch.Tensor],
        context: AggregationContext | None,
    ) -> dict[str, torch.Tensor]:
        m = weights.shape[0]
        k = m - 1
        dist = torch.zeros(m, m, dtype=torch.float64)
        for d in deltas.values():
            x = d.reshape(m, -1).double().cpu()
            sq = (x * x).sum(dim=1)
            dist += sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
        dist = dist.clamp_min(0.0)
        n_close = max(1, m - self.num_byzantine - 2)
        n_close = min(n_close, m - 1)
        others_dist = dist + torch.diag(torch.full((m,), float("inf"), dtype=torch.float64))
        scores = others_dist.sort(dim=1).values[:, :n_close].sum(dim=1)
        n_sel = self.num_selected if self.num_selected is not None else max(1, k - self.num_byzantine)
        n_sel = min(n_sel, k)
        chosen = (torch.argsort(scores[1:], stable=True)[:n_sel] + 1).tolist()
        self.last_selected = sorted(int(c) - 1 for c in chosen)  # indices into `others`
        keep_rows = torch.zeros(m, dtype=torch.float64)
        keep_rows[0] = 1.0
        keep_rows[chosen] = 1.0
        w = weights * keep_rows
        if float(w.sum()) <= 0:
            w = keep_rows
        w = w / w.sum()
        return {key: weighted_mean(d, w) for key, d in deltas.items()}


class SignConsensusAggregator(BaseAggregator):
    """TIES-style merge of neighbour deltas: trim, elect sign, disjoint mean.

    1. Trim: per neighbour and entry keep the ``density`` share of coordinates with the largest
       ``|delta|``; the rest become 0.
    2. Elect: per coordinate the sign of ``sum_j w_j * delta_j`` (``elect="mass"``, as TIES) or of
       ``sum_j w_j * sign(delta_j)`` (``elect="count"``, weight of votes regardless of magnitude).
    3. Merge: weighted mean of the kept deltas that agree with the elected sign, scaled by the
       neighbours' total weight ``1 - w_0`` so ``density=1`` on agreeing inputs is the plain mean.
    """

    name = "sign_consensus"

    def __init__(self, density: float = 0.8, elect: str = "mass") -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        if elect not in ("mass", "count"):
            raise ValueError(f"elect must be 'mass' or 'count', got {elect!r}")
        self.density = density
        self.elect = elect

    def trim(self, d: torch.Tensor) -> torch.Tensor:
        """Zero all but the ``density`` share of largest-magnitude coordinates of each row."""
        if self.density >= 1.0 or d[0].numel() == 0:
            return d
        flat = d.reshape(d.shape[0], -1)
        n_keep = max(1, int(math.ceil(self.density * flat.shape[1])))
        thresh = flat.abs().topk(n_keep, dim=1).values[:, -1:]
        return (flat * (flat.abs() >= thresh)).reshape(d.shape)

    def elected_sign(self, trimmed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        w = _expand(weights, trimmed)
        votes = trimmed if self.elect == "mass" else torch.sign(trimmed)
        return torch.sign((w * votes).sum(dim=0))

    def combine(self, deltas: torch.Tensor, weights: torch.Tensor, key: str) -> torch.Tensor:
        nb, wn = deltas[1:], weights[1:]
        if float(wn.sum()) <= 0:
            return torch.zeros_like(deltas[0])
        trimmed = self.trim(nb)
        sign = self.elected_sign(trimmed, wn)
        agree = (torch.sign(trimmed) == sign.unsqueeze(0)) & (trimmed != 0)
        w = _expand(wn, trimmed) * agree.to(trimmed.dtype)
        denom = w.sum(dim=0)
        mean = torch.where(denom > 0, (w * trimmed).sum(dim=0) / denom.clamp_min(1e-300), torch.zeros_like(denom))
        return mean * float(wn.sum())


__all__ = [
    "MedianAggregator",
    "MultiKrumAggregator",
    "NormClipAggregator",
    "SignConsensusAggregator",
    "TrimmedMeanAggregator",
    "masked_weighted_mean",
    "weighted_median",
]
