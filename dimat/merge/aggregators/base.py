"""The aggregator contract of ``dimat.merge``: how aligned neighbour states are combined.

An aggregator is called as ``aggregate(own, others, weights, context=None) -> StateDict``:
``others`` are neighbour states already aligned into ``own``'s basis, ``weights[0]`` is own's
mixing weight and ``weights[1:]`` the others', summing to 1. Only floating-point entries are
aggregated; integer buffers (e.g. ``num_batches_tracked``) are copied from ``own``. Defences work
on the deltas ``delta_j = theta_j - theta_own``; own's delta is 0 and it always counts as a
trusted, honest vote.

This module names no aggregator: the built-ins (``mean``, ``robust``, ``safety``) import it, and
``registry`` imports them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol, Sequence

import torch
from torch import nn

from dimat.topology.membership import check_weights

from dimat.typing import StateDict, work_dtype


@dataclass
class AggregationContext:
    """What an aggregator may use beyond the weights: who sent what, the receiving peer's model and data, memory.

    ``model`` is the reference model (its architecture is used with ``torch.func.functional_call``;
    its parameters are not changed), ``data`` any iterable of input tensors or ``(input, label)``
    pairs (labels are ignored), ``device`` where to compute, ``seed`` for any randomness (a fresh one
    per merge). ``senders[j]`` is the peer id of ``others[j]``; ``memory`` is this receiving peer's
    own store of tensors across merges (a defence's per-neighbour history: the method keeps it in
    its per-peer state, so it is checkpointed and survives a resume; ``None``: no history kept).
    ``moments`` names the BatchNorm modules whose running variance arrives as a second moment
    (``merge.bn_stats=mixture``: :func:`dimat.align.batchnorm.from_second_moments` turns a state
    back into one the model can run).
    """

    model: nn.Module | None = None
    data: Iterable[Any] | None = None
    device: str | torch.device = "cpu"
    seed: int = 0
    peer_id: int | None = None
    senders: tuple[int, ...] = ()
    memory: dict[str, torch.Tensor] | None = None
    moments: tuple[str, ...] = ()


class Aggregator(Protocol):
    def __call__(
        self,
        own: Mapping[str, torch.Tensor],
        others: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        context: AggregationContext | None = None,
    ) -> StateDict: ...


class BaseAggregator:
    """Validates inputs, handles the no-neighbour case and integer buffers; subclasses combine deltas.

    Subclasses implement ``combine(deltas, weights, key) -> Tensor``: ``deltas`` has shape
    ``(1 + k, *shape)`` with row 0 being own's zero delta, ``weights`` a float64 vector of length
    ``1 + k`` summing to 1; the return value is the delta to add to own for that entry.
    Aggregators that need the whole model at once override ``aggregate_deltas`` instead, and
    ones that do not work on deltas at all (the mean) override ``aggregate_states``.
    """

    name = "base"
    needs_context = False  # True: the caller should pass an AggregationContext (model + own data)
    #: compares neighbours' weights with each other, so every neighbour must be aligned into own basis
    #: each merge (``merge.consensus_basis: auto`` then keeps per-peer bases: docs/safety.md says why)
    needs_own_basis = True

    def __call__(
        self,
        own: Mapping[str, torch.Tensor],
        others: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        context: AggregationContext | None = None,
    ) -> StateDict:
        w = validate_inputs(own, others, weights)
        if not others:
            return {k: v.clone() for k, v in own.items()}
        return self.aggregate_states(own, others, w, context)

    aggregate = __call__  # the contract's name for the same call

    def aggregate_states(self, own: Mapping[str, torch.Tensor], others: Sequence[Mapping[str, torch.Tensor]],
                         weights: torch.Tensor, context: AggregationContext | None) -> StateDict:
        """Combine validated inputs (at least one neighbour); by default through stacked deltas."""
        deltas = {k: stack_deltas(own, others, k) for k in float_keys(own)}
        return finish(own, self.aggregate_deltas(deltas, weights, own, context))

    def aggregate_deltas(
        self,
        deltas: dict[str, torch.Tensor],
        weights: torch.Tensor,
        own: Mapping[str, torch.Tensor],
        context: AggregationContext | None,
    ) -> dict[str, torch.Tensor]:
        return {k: self.combine(d, weights, k) for k, d in deltas.items()}

    def combine(self, deltas: torch.Tensor, weights: torch.Tensor, key: str) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


# --- shared helpers -----------------------------------------------------------------------------


def validate_inputs(
    own: Mapping[str, torch.Tensor], others: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> torch.Tensor:
    """Check keys, shapes and weights (`check_weights`: own + others, summing to 1); return the
    weights, as given, as a float64 tensor."""
    w = torch.as_tensor(check_weights(weights, 1 + len(others), sums_to_one=True), dtype=torch.float64)
    for j, other in enumerate(others):
        if set(other) != set(own):
            diff = sorted(set(other) ^ set(own))
            raise ValueError(f"neighbour state {j} has different keys from own: {diff[:5]}")
        for k, v in own.items():
            if other[k].shape != v.shape:
                raise ValueError(
                    f"neighbour state {j} entry {k!r} has shape {tuple(other[k].shape)}, own has {tuple(v.shape)}"
                )
            # the transports refuse these on receipt; a defence called directly must not pass them on either
            if other[k].is_floating_point() and not bool(torch.isfinite(other[k]).all()):
                raise ValueError(f"neighbour state {j} entry {k!r} holds NaN or Inf")
    return w


def float_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Entries that are aggregated (floating point); the rest are copied from own."""
    return [k for k, v in state.items() if torch.is_floating_point(v)]


def stack_deltas(own: Mapping[str, torch.Tensor], others: Sequence[Mapping[str, torch.Tensor]], key: str) -> torch.Tensor:
    """``(1 + k, *shape)``: own's zero delta followed by each neighbour's ``theta_j - theta_own``."""
    base = own[key]
    dt = work_dtype(base.dtype)
    b = base.detach().to(dt)
    rows = [torch.zeros_like(b)] + [o[key].detach().to(device=b.device, dtype=dt) - b for o in others]
    return torch.stack(rows)


def finish(own: Mapping[str, torch.Tensor], new_deltas: Mapping[str, torch.Tensor]) -> StateDict:
    """``own + delta`` for aggregated entries, cast back to own's dtype; others cloned from own."""
    out: StateDict = {}
    for k, v in own.items():
        if k in new_deltas:
            out[k] = (v.detach().to(new_deltas[k].dtype) + new_deltas[k]).to(v.dtype)
        else:
            out[k] = v.detach().clone()
    return out


def weighted_mean(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    w = weights.to(deltas.dtype).to(deltas.device).view(-1, *([1] * (deltas.ndim - 1)))
    return (w * deltas).sum(dim=0)


def masked_weighted_mean(deltas: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Weighted mean over the kept rows, per coordinate, renormalising the weights of the kept ones.

    Row 0 (own) should always be kept so the denominator is never zero.
    """
    w = weights.to(deltas.dtype).to(deltas.device).view(-1, *([1] * (deltas.ndim - 1)))
    wk = w * keep.to(deltas.dtype)
    denom = wk.sum(dim=0).clamp_min(torch.finfo(deltas.dtype).tiny)
    return (wk * deltas).sum(dim=0) / denom


def flat_norms(deltas: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-row L2 norm of the concatenation of all entries: shape ``(1 + k,)``."""
    sq = None
    for d in deltas.values():
        s = d.reshape(d.shape[0], -1).double().pow(2).sum(dim=1)
        sq = s if sq is None else sq + s
    assert sq is not None
    return sq.sqrt()


def first_inputs(data: Iterable[Any], max_samples: int) -> torch.Tensor:
    """The first ``max_samples`` inputs of ``data`` (tensors or ``(input, label)`` pairs) as one batch."""
    xs, n = [], 0
    for item in data:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"context data must yield tensors or (input, label) pairs, got {type(x).__name__}")
        xs.append(x)
        n += x.shape[0]
        if n >= max_samples:
            break
    if not xs:
        raise ValueError("context data is empty; safety-mask refinement needs unlabelled inputs")
    return torch.cat(xs)[:max_samples]
