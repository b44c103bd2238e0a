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

When the lower basis is joined (``merge.rebase``): ``after`` aligns every neighbour into the own
basis, merges, then relabels the result; ``before`` relabels the own model into the lowest
neighbour's basis by one matching and averages only the neighbours already in it (the others join
at a later merge). At the first merge of a federation of different inits every neighbour is in a
basis of its own, so ``after`` costs one matching per neighbour, N x degree in all (about a million
at 1,000 fully connected peers), and ``before`` one per peer. ``auto`` (the default) is ``before``
where ``after`` would match more than ``merge.match_limit`` neighbours of several other bases
(:func:`rebase_mode`), and ``after`` everywhere else: wherever a peer's neighbours bring one other
basis (a shared init, a flooded graph) or are few (the default five peers), nothing changes.
``before`` starts less well mixed (each peer averages only the neighbours already in the lowest
basis; docs/scale.md measures it), which is why it is not used where ``after`` is affordable.
"""
from __future__ import annotations

import weakref
from typing import Mapping, Sequence

import torch

from dimat.typing import StateDict

#: Key of the basis tag in exchanged state dicts (an int64 scalar); never a key of a model's own state.
BASIS_KEY = "_dimat.basis"
#: ``merge.rebase``: when a peer joins the lowest basis of its neighbourhood (see above)
REBASE_MODES = ("auto", "after", "before")


def attach_basis(state: Mapping[str, torch.Tensor], basis: int) -> StateDict:
    """``state`` plus its basis tag, ready to send."""
    if BASIS_KEY in state:
        raise ValueError(f"state already has a '{BASIS_KEY}' entry")
    out = dict(state)
    out[BASIS_KEY] = torch.tensor(int(basis), dtype=torch.int64)
    return out


def split_basis(state: Mapping[str, torch.Tensor], label: str = "state") -> tuple[StateDict, int | None]:
    """``(model state, tag)``; the tag is ``None`` when the state carries none."""
    tag = basis_of(state, label)
    out = dict(state)
    out.pop(BASIS_KEY, None)
    return out, tag


def basis_of(state: Mapping[str, torch.Tensor], label: str = "state") -> int | None:
    """The tag ``state`` carries (``None``: none), read without copying the state.

    A merge reads every neighbour's tag; on a fully connected graph that is N x (N - 1) reads an
    exchange, so this looks the one key up rather than splitting each state as :func:`split_basis` does.
    """
    t = state.get(BASIS_KEY)
    if t is None:
        return None
    seen = _TAGS.get(id(t))
    if seen is not None and seen[0]() is t:  # every receiver of a sender reads the same tag tensor
        return seen[1]
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != torch.int64 or int(t) < 0:
        raise ValueError(f"{label}: '{BASIS_KEY}' must be a non-negative int64 scalar, got {t!r}")
    tag = int(t)
    if len(_TAGS) > 1 << 16:
        _TAGS.clear()
    _TAGS[id(t)] = (weakref.ref(t), tag)
    return tag


# tag tensors already read: id -> (the tensor, weakly, its value); reading a one-element tensor costs
# microseconds, which at N x (N - 1) reads an exchange is seconds. The weak reference tells a
# reused id from the tensor read before; a tag tensor is never changed in place (attach_basis
# makes a new one for every state sent).
_TAGS: dict[int, tuple[weakref.ref, int]] = {}


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


def rebase_mode(setting: str, own: int, tags: Sequence[int | None], limit: int) -> str:
    """``after`` or ``before``: what ``merge.rebase=setting`` does for a peer in basis ``own``
    whose neighbours carry ``tags``.

    ``auto`` is ``after`` unless that would match more than ``limit`` neighbours (those not in
    ``own``; an untagged one is always matched) while they bring more than one basis: then
    ``before``, one matching. So a merge costs at most ``limit`` matchings, the first merge of a
    federation of N different inits on a full graph N of them rather than N x (N - 1), and wherever
    a peer's neighbours bring one basis, or few neighbours, nothing changes.

    Example:
        >>> rebase_mode("auto", 9, list(range(9)), limit=4), rebase_mode("auto", 9, [0, 1, 2], limit=4)
        ('before', 'after')
    """
    if setting not in REBASE_MODES:
        raise ValueError(f"merge.rebase must be one of {', '.join(REBASE_MODES)} (got {setting!r})")
    if setting != "auto":
        return setting
    matched = [("tag", t) if t is not None else ("untagged", k) for k, t in enumerate(tags) if t != own]
    return "before" if len(matched) > limit and len(set(matched)) > 1 else "after"
