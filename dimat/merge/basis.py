"""Basis tags: which neuron ordering a model is in, so that a federation converges to one basis.

Peers that start from different inits hold the same functions in different unit orders (bases).
DIMAT as published keeps every peer in its own basis and re-matches each neighbour every round.
Pairwise matchings are not transitive: around a cycle of the topology the composed permutations
are not the identity, so the peers can never agree on one model, and every round's re-matching of
drifted models adds noise (docs/results.md measures both).

A basis tag fixes that. Every model carries an integer tag (its peer id with different inits, 0
with a shared init). When a peer merges, neighbours with its own tag are already in its basis and
are averaged as they are; the others are aligned by matching. The merged model is then relabelled
(a pure permutation: its function does not change) into the basis of the lowest tag in the
neighbourhood and takes that tag. The lowest tag floods the graph, so after about a diameter of
rounds every peer is in one basis, and from then on DIMAT merges like averaging in that basis.

The tag travels in the exchanged state dict under :data:`BASIS_KEY`, so every transport carries it.
A neighbour can lie about its tag: it can be averaged without alignment (the ``average``
baseline), or make peers relabel into its ordering, which changes no function by itself.
Defences still anchor on the peer's own model: alignment and aggregation happen in the peer's own
basis, the relabelling comes after. But in the round after a switch every peer's model is a noisy
copy of the lowest-tag neighbour's ordering, which makes that neighbour look central to
distance-based defences; ``merge.consensus_basis: auto`` therefore turns tags off under a defence
(docs/safety.md measures it).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from dimat.typing import StateDict

#: Key of the basis tag in exchanged state dicts (an int64 scalar); never a key of a model's own state.
BASIS_KEY = "_dimat.basis"


def attach_basis(state: Mapping[str, torch.Tensor], basis: int) -> StateDict:
    """``state`` plus its basis tag, ready to send."""
    if BASIS_KEY in state:
        raise ValueError(f"state already has a '{BASIS_KEY}' entry")
    out = dict(state)
    out[BASIS_KEY] = torch.tensor(int(basis), dtype=torch.int64)
    return out


def split_basis(state: Mapping[str, torch.Tensor], label: str = "state") -> tuple[StateDict, int | None]:
    """``(model state, tag)``; the tag is ``None`` when the state carries none."""
    if BASIS_KEY not in state:
        return dict(state), None
    out = dict(state)
    t = out.pop(BASIS_KEY)
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != torch.int64 or int(t) < 0:
        raise ValueError(f"{label}: '{BASIS_KEY}' must be a non-negative int64 scalar, got {t!r}")
    return out, int(t)


def plan_rebase(own: int, tags: Sequence[int | None]) -> tuple[list[bool], int | None, int]:
    """How to merge with neighbours carrying ``tags`` when the own model's tag is ``own``.

    Returns ``(same, into, new_tag)``: ``same[k]`` says neighbour ``k`` is in the own basis (not
    re-matched); ``into`` is the neighbour whose basis the merged model is relabelled into (``None``:
    stay); ``new_tag`` is the merged model's tag. A neighbour without a tag is always matched.
    """
    same = [t is not None and t == own for t in tags]
    lower = [(t, k) for k, t in enumerate(tags) if t is not None and t < own]
    if not lower:
        return same, None, own
    tag, k = min(lower)
    return same, k, tag
