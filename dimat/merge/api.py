"""Merging: align neighbours into the reference's basis, combine, reset BatchNorm statistics."""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..align.api import check_compatible, check_state_compatible, find_permutations, spec_for
from ..align.batchnorm import bn_names, from_second_moments, has_batchnorm, reset_bn_stats, to_second_moments
from ..align.inputs import reiterable_inputs
from ..align.permute import invert, permute_state
from ..topology.membership import check_weights, renormalise
from .aggregators import get_aggregator, weighted_average
from .aggregators.base import AggregationContext, StateDict
from .scratch import working_copy

#: how a merge aligns neighbours before combining: activation matching (DIMAT), weight matching, or not at all
ALIGNMENTS = ("activation", "weight", None)
#: what a merge does with BatchNorm statistics (``merge.bn_stats``, validated by the run config)
BN_STATS = ("own", "average", "mixture")

# What a merged model's BatchNorm running statistics become (``merge.bn_stats``):
#   own      recomputed on the merging peer's data (the paper; REPAIR-style reset)
#   average  combined like the weights (mean and variance averaged)
#   mixture  the mixture of the merged states' statistics: mean and E[x^2] combined, so the variance
#            holds the spread between the peers' data; each peer's were measured on its own data


def check_bn_stats(bn_stats: str) -> str:
    if bn_stats not in BN_STATS:
        raise ValueError(f"unknown bn_stats {bn_stats!r}; choose one of {list(BN_STATS)}")
    return bn_stats

Aggregator = Callable[..., StateDict]


def _resolve_aggregator(aggregator: str | Aggregator | None) -> Aggregator:
    """None is the weighted mean; else a name from ``dimat.merge.available_aggregators()`` or a callable."""
    if aggregator is None:
        return weighted_average
    if isinstance(aggregator, str):
        return get_aggregator(aggregator)
    return aggregator


def check_alignment(alignment: str | None) -> str | None:
    if alignment not in ALIGNMENTS:
        raise ValueError(f"unknown alignment {alignment!r}; choose one of {list(ALIGNMENTS)}")
    return alignment


def merge_states(reference: nn.Module, states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                 data: Iterable | None = None, *, alignment: str | None, bn_stats: str,
                 aggregator: str | Aggregator | None = None, max_batches: int | None = None,
                 context: object | None = None, same_basis: Sequence[bool] | None = None,
                 into: int | None = None, relabel: dict[str, torch.Tensor] | None = None,
                 alignments: dict[int, dict[str, torch.Tensor]] | None = None) -> StateDict:
    """Merge neighbour ``states`` into ``reference`` (the peer's own model; ``weights[0]`` is its own).

    ``alignment`` and ``bn_stats`` have no default here: the caller's method or config decides
    (one source of defaults). ``weights`` are used as given: one per model, summing to 1 (`check_weights`); a round's
    renormalisation over the neighbours that arrived is the caller's (``Peer.merge``).

    Neighbours are aligned into the reference's basis (``alignment``: "activation", "weight" or None),
    combined by ``aggregator`` (None: the weighted average); BatchNorm running statistics follow ``bn_stats`` (:data:`BN_STATS`:
    recomputed on ``data``, averaged, or mixed as moments; the aggregator combines them in every
    case, so a defence also screens statistics). Returns a new state dict; ``reference`` is untouched.
    ``same_basis[k]`` marks neighbour ``k`` as already in the reference's basis (not re-matched);
    ``into`` relabels the result into neighbour ``into``'s basis (see :mod:`dimat.merge.basis`);
    the permutation it applied is put into ``relabel`` when given, and the permutation that aligned
    neighbour ``k`` into ``alignments[k]`` (so a caller can move what else that neighbour sent in its
    unit order, such as a method's extras).
    """
    check_alignment(alignment)
    weights = check_weights(weights, len(states) + 1, sums_to_one=True)
    own = reference.state_dict()
    for k, s in enumerate(states):
        check_state_compatible(own, s, label=f"neighbour state {k}")
    check_bn_stats(bn_stats)
    needs_bn = bn_stats == "own" and has_batchnorm(reference)
    if alignment == "activation" or needs_bn:
        data = reiterable_inputs(data, max_batches)

    if same_basis is not None and len(same_basis) != len(states):
        raise ValueError(f"same_basis has {len(same_basis)} entries for {len(states)} neighbour states")
    if into is not None and not 0 <= into < len(states):
        raise ValueError(f"into={into} is not a neighbour index (0..{len(states) - 1})")
    aligned = [dict(s) for s in states]
    perms: dict[int, dict[str, torch.Tensor]] = {}
    spec = None
    if alignment is not None:  # declared, or traced on the first batch of data
        spec, data = spec_for(reference, data, max_batches)
    todo = [k for k in range(len(states)) if spec is not None and not (same_basis and same_basis[k])]
    if todo:
        others = []
        for slot, k in enumerate(todo):
            m = working_copy(reference, slot)
            m.load_state_dict(states[k])
            others.append(m)
        found = find_permutations(reference, others, data, alignment, spec, max_batches)
        for k, p in zip(todo, found):
            perms[k] = p
            if alignments is not None:
                alignments[k] = p
            aligned[k] = permute_state(states[k], spec, p)

    combine = _resolve_aggregator(aggregator)
    own = {k: v.detach() for k, v in own.items()}
    mixed = bn_names(reference) if bn_stats == "mixture" else []
    if mixed:  # statistics (permuted with the weights above) become moments, which mix
        own, aligned = to_second_moments(own, mixed), [to_second_moments(s, mixed) for s in aligned]
    if mixed and isinstance(context, AggregationContext):  # a defence that runs the model must undo the moments
        context = dataclasses.replace(context, moments=tuple(mixed))
    merged = combine(own, aligned, weights, context)
    if mixed:
        merged = from_second_moments(merged, mixed)
    if needs_bn:
        model = working_copy(reference, len(todo))
        model.load_state_dict(merged)
        reset_bn_stats(model, data, max_batches)
        merged = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if into is not None and into in perms:  # a relabelling: the function is unchanged
        to_basis = {g: invert(p) for g, p in perms[into].items()}
        merged = permute_state(merged, spec, to_basis)
        if relabel is not None:  # the caller permutes what else lives in the old unit order (momentum)
            relabel.update(to_basis)
    return merged


def merge(models: Sequence[nn.Module], weights: Sequence[float], data: Iterable | None = None,
          alignment: str | None = "activation", bn_stats: str = "own", aggregator: str | Aggregator | None = None,
          max_batches: int | None = None) -> nn.Module:
    """A new model: ``models[1:]`` aligned to ``models[0]`` and averaged with ``weights``.

    ``alignment`` is ``"activation"`` (DIMAT: activation matching on ``data``), ``"weight"``
    (weight matching, data-free) or ``None`` (plain averaging). BatchNorm statistics are recomputed on ``data`` when the
    model has BatchNorm and ``bn_stats`` is ``"own"`` (see :data:`BN_STATS`). Inputs are not modified. ``weights`` need not sum
    to 1: they are rescaled by the one rule, `dimat.topology.membership.renormalise`.
    """
    models = list(models)
    if not models:
        raise ValueError("merge needs at least one model")
    check_alignment(alignment)
    if not isinstance(models[0], nn.Module):
        raise ValueError(f"model 0 is a {type(models[0]).__name__}, not a torch.nn.Module")
    row = renormalise(dict(enumerate(check_weights(weights, len(models)))), range(len(models)))
    weights = [row[k] for k in range(len(models))]
    check_compatible(models[0], models[1:])
    if alignment is not None:
        _, data = spec_for(models[0], data, max_batches)
    if check_bn_stats(bn_stats) == "own" and has_batchnorm(models[0]) and data is None:
        raise ValueError("this model has BatchNorm: pass data to recompute its statistics, or bn_stats='average'")
    state = merge_states(models[0], [m.state_dict() for m in models[1:]], weights, data, alignment=alignment,
                         bn_stats=bn_stats, aggregator=aggregator, max_batches=max_batches)
    out = copy.deepcopy(models[0])
    out.load_state_dict(state)
    return out
