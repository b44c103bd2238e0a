"""Peers leaving and joining, and the per-round rule for neighbours that miss the deadline.

Peer ids are stable: removing peer 2 from ``(0, 1, 2, 3)`` leaves ``(0, 1, 3)``, and a joining peer
keeps the id it is given. Weights are recomputed with the topology's rule over the *induced* graph:
no links are rewired, so removing a ring peer leaves a path (check `is_connected` if it matters).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

from dimat.topology.core import RULES, Topology, mixing_matrix


def without_peers(topology: Topology, ids: Iterable[int]) -> Topology:
    """The topology with peers ``ids`` removed and the weights recomputed.

    With a rule (``topology.rule``) the rule is re-applied to the remaining graph. For explicit
    weights (``rule=None``) each remaining row drops the removed peers and is rescaled to sum 1 (see
    `renormalise`); a row left with nothing keeps its own model (self weight 1).
    """
    gone = {int(i) for i in ids}
    unknown = sorted(gone - set(topology.peers))
    if unknown:
        raise ValueError(f"cannot remove peers {unknown}: not in topology (peers {list(topology.peers)})")
    keep = [k for k, p in enumerate(topology.peers) if p not in gone]
    if not keep:
        raise ValueError("cannot remove every peer from a topology")
    peers = tuple(topology.peers[k] for k in keep)
    sub = np.ix_(keep, keep)
    if topology.rule is not None:
        W = mixing_matrix(topology.adjacency[sub], topology.rule)
    else:
        W = topology.W[sub].copy()
        sums = W.sum(axis=1)
        empty = sums <= 0
        W[empty] = 0.0
        W[empty, np.flatnonzero(empty)] = 1.0
        W /= W.sum(axis=1, keepdims=True)
    return Topology(W, name=topology.name, peers=peers, rule=topology.rule)


def with_peer(
    topology: Topology, new_id: int, neighbours: Iterable[int], rule: str | None = None
) -> Topology:
    """The topology with peer ``new_id`` joined, linked both ways to ``neighbours``, weights recomputed.

    The rule is ``rule`` if given, else ``topology.rule``; a topology with explicit weights has no
    rule to re-apply, so then ``rule`` is required. The new peer takes the last row/column.
    """
    new_id = int(new_id)
    if new_id < 0:
        raise ValueError(f"peer ids must be non-negative, got {new_id}")
    if new_id in topology.peers:
        raise ValueError(f"peer {new_id} is already in topology {topology.name!r}")
    use = rule if rule is not None else topology.rule
    if use is None:
        raise ValueError(
            f"topology {topology.name!r} has explicit weights; pass rule='uniform' or 'metropolis' to add a peer"
        )
    if use not in RULES:
        raise ValueError(f"unknown mixing rule {use!r}; choose one of {', '.join(RULES)}")
    nbrs = [topology.index_of(j) for j in dict.fromkeys(int(j) for j in neighbours)]
    n = topology.n
    adj = np.zeros((n + 1, n + 1), dtype=bool)
    adj[:n, :n] = topology.adjacency
    for k in nbrs:
        adj[n, k] = adj[k, n] = True
    return Topology(mixing_matrix(adj, use), name=topology.name, peers=(*topology.peers, new_id), rule=use)


# how far from 1 the weights handed to a merge may sum: rows written as rounded text (0.3333) pass
WEIGHT_SUM_TOL = 1e-4


def check_weights(
    weights: Sequence[float] | Mapping[int, float], n: int | None = None, *, sums_to_one: bool = False
) -> list[float]:
    """The one check of mixing weights; returns them as floats, in order, unchanged.

    ``ValueError`` unless there are ``n`` of them (when given: own + ``n - 1`` neighbours), each is
    finite and non-negative, they are not all zero and, with ``sums_to_one``, they sum to 1 within
    ``WEIGHT_SUM_TOL``. Nothing is rescaled here: that is `renormalise`, applied once per round.
    """
    values = [float(w) for w in (weights.values() if isinstance(weights, Mapping) else weights)]
    # the row as printed in an error (copied then only: a copy per row was N^2 on a full graph)
    shown = (lambda: dict(weights)) if isinstance(weights, Mapping) else (lambda: values)
    if n is not None and len(values) != n:
        raise ValueError(f"expected {n} weights for {n} models (own + {n - 1} neighbours), got {len(values)}")
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"weights must be finite and non-negative, got {shown()}")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"weights must not all be zero, got {shown()}")
    if sums_to_one and abs(total - 1.0) > WEIGHT_SUM_TOL:
        raise ValueError(f"mixing weights must sum to 1, got sum {total:.6f}")
    return values


def renormalise(
    weights: Mapping[int, float], present: Iterable[int], self_id: int | None = None
) -> dict[int, float]:
    """Merge weights for a round in which some neighbours missed the deadline.

    Rule: drop every peer not in ``present`` and rescale the remaining weights (self included) so they
    sum to 1; the ratios between the remaining peers are unchanged. ``self_id``, when given, is always
    kept (a peer always has its own model). If nothing with positive weight remains, the peer keeps its
    own model: ``{self_id: 1.0}``; without ``self_id`` that is a ``ValueError``. The row itself must
    pass `check_weights` (finite, non-negative, not all zero).
    """
    check_weights(weights)
    keep = set(int(p) for p in present)
    if self_id is not None:
        keep.add(int(self_id))
    out = {int(p): float(w) for p, w in weights.items() if p in keep or int(p) in keep}
    total = sum(out.values())
    if total <= 0:
        if self_id is not None:
            return {int(self_id): 1.0}
        raise ValueError(f"no positive weight left after dropping absent peers (present: {sorted(keep)})")
    return {p: w / total for p, w in out.items()}
