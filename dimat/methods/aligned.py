"""Align, then average: the merge that DIMAT, weight matching, averaging and gossip share.

``AlignedAverage`` merges what a peer received the way the DIMAT paper does, with this project's
consensus basis (:mod:`dimat.merge.basis`):

1. renormalise the peer's row of mixing weights over the senders that arrived (the one rule,
   :func:`dimat.topology.membership.renormalise`);
2. align each neighbour into the peer's basis (``alignment``: activation matching on the data
   merging sees, weight matching, or none) unless it is already in that basis;
3. combine with the aggregator (the weighted mean, or a defence), BatchNorm statistics by
   ``merge.bn_stats``;
4. relabel the result into the lowest basis of the neighbourhood (the function is unchanged) and
   keep or restart the optimizer's momentum (``merge.keep_momentum``), permuting whatever lives
   in the old unit order: the optimizer state and this method's per-peer state.

Subclasses fix ``alignment`` (and gossip its BatchNorm and momentum policy); a drift-correcting
method extends :meth:`AlignedAverage.merge` and inherits all of the above.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import torch

from dimat.align.api import find_permutations, spec_for
from dimat.align.permute import invert
from dimat.config import MergeSettings
from dimat.merge.aggregators import AggregationContext, get_aggregator, is_plain_mean
from dimat.merge.api import merge_states
from dimat.merge.basis import BASIS_KEY, basis_of, plan_rebase, rebase_mode
from dimat.merge.scratch import working_copy
from dimat.methods.base import Method, permute_like_params, split_extras
from dimat.peer import Peer
from dimat.typing import StateDict
from dimat.seeds import AGGREGATION, derive_seed
from dimat.topology.membership import renormalise


#: per-peer state keys of a defence's history (:attr:`AggregationContext.memory`)
DEFENCE_PREFIX = "defence/"


def is_plain_average(aggregator: object | None, alignment: str | None, same_basis: list[bool] | None,
                     into: int | None) -> bool:
    """Whether a merge is the plain mean of the states as sent (no matching, no relabel, no defence).

    Only such a merge depends on nothing but the row of weights, so peers may share it
    (:class:`dimat.federation.shared_merge.SharedMerges`).
    """
    no_alignment = alignment is None or (same_basis is not None and all(same_basis))
    return is_plain_mean(aggregator) and into is None and no_alignment


class _ModelStates(Sequence):
    """The model states of received payloads (tag and extras left out), each split when first read."""

    def __init__(self, payloads: list[Mapping[str, torch.Tensor]]) -> None:
        self._payloads = payloads
        self._split: dict[int, StateDict] = {}

    def __len__(self) -> int:
        return len(self._payloads)

    def __getitem__(self, k):  # noqa: ANN001, ANN204 (Sequence's signature)
        if isinstance(k, slice):
            return [self[i] for i in range(len(self))[k]]
        if k not in self._split:
            model = split_extras(self._payloads[k])[0]
            model.pop(BASIS_KEY, None)
            self._split[k] = model
        return self._split[k]


class AlignedAverage(Method):
    """Align neighbours (``alignment``), combine with the aggregator, keep one basis."""

    # within one basis the merge is a mixing step, so CHOCO's consensus step (exchange.choco_step)
    # may replace it there (the compressor leaves states of another basis alone)
    choco = True

    #: how neighbours are aligned: "activation" (DIMAT), "weight" (weight matching) or None (averaging)
    alignment: ClassVar[str | None] = None

    def __init__(self, settings: MergeSettings) -> None:
        super().__init__(settings)
        #: the combining rule; None is the weighted mean (as ``AveragedModel(avg_fn=None)`` is SWA)
        self.aggregator = None if settings.aggregator == "mean" else get_aggregator(
            settings.aggregator, **settings.aggregator_kwargs)
        # consensus_basis auto: on unless a defence compares neighbours' weights (dimat.merge.basis says why)
        auto = self.aggregator is None or not getattr(self.aggregator, "needs_own_basis", True)
        self.consensus_basis = auto if settings.consensus_basis is None else settings.consensus_basis
        #: models matched into another's basis by this method's merges so far (the cost that
        #: ``merge.rebase=auto`` keeps at one per peer for the first merge of many bases)
        self.matchings = 0

    @property
    def bn_stats(self) -> str:
        return self.settings.bn_stats

    @property
    def reset_optimizer(self) -> bool:
        return not self.settings.keep_momentum

    def merge(self, peer: Peer, received: Mapping[int, Mapping[str, torch.Tensor]], weights: Mapping[int, float],
              *, shared: Any | None = None) -> StateDict:
        """Align, combine and load; with no sender to merge nothing changes (not even the optimizer).

        Returns the merged model state. ``received`` payloads may carry extras (a subclass reads
        them with :func:`dimat.methods.base.split_extras`); they are dropped here.
        """
        w = renormalise(weights, received, self_id=peer.id)
        senders = sorted(j for j in w if j != peer.id)
        self.last_cross_basis = False
        if not senders:
            return peer.state()
        # the tags are read in place; the states are split (copied without tag and extras) only for a
        # merge of this peer's own: the shared average reads the model's keys of each payload as sent
        tags = [basis_of(received[j], label=f"peer {peer.id}: state from peer {j}") for j in senders]
        #: whether the last merge had a neighbour in another basis than the peer's own (before it)
        self.last_cross_basis: bool = any(t != peer.basis for t in tags)
        states: list = _ModelStates([received[j] for j in senders])
        same, into, new_basis = None, None, peer.basis
        batches = peer.alignment_batches()
        rebase_first = (self.consensus_basis and self.alignment is not None
                        and rebase_mode(self.settings.rebase, peer.basis, tags, self.settings.match_limit) == "before")
        own_relabelled = False
        if rebase_first:
            own_relabelled = self._join_lowest_basis(peer, states, tags, batches)
            self.matchings += int(own_relabelled)
            keep = [k for k, t in enumerate(tags) if t == peer.basis]  # the others join later
            senders, states = [senders[k] for k in keep], _ModelStates([received[senders[k]] for k in keep])
            w = renormalise(weights, senders, self_id=peer.id)
            if not senders:
                return peer.state()
            same, new_basis = [True] * len(states), peer.basis
        elif self.consensus_basis and self.alignment is not None:
            same, into, new_basis = plan_rebase(peer.basis, tags)
        context, memory = None, None
        if self.aggregator is not None:
            # a defence gets who sent what, own model and data, a fresh seed and its history at this peer
            memory = self.defence_memory(peer)
            context = AggregationContext(model=peer.model, data=batches, device=peer.device,
                                         seed=derive_seed(peer.seed, AGGREGATION, peer.id, peer.steps_done),
                                         peer_id=peer.id, senders=tuple(senders), memory=memory)
        relabel: dict[str, torch.Tensor] = {}
        alignments: dict[int, dict[str, torch.Tensor]] = {}
        # a relabelled own model (rebase before) is no longer the state the others received
        if shared is not None and not own_relabelled and is_plain_average(self.aggregator, self.alignment, same, into):
            merged = shared.merge(peer.model, peer.id, {j: received[j] for j in senders}, w, bn_stats=self.bn_stats,
                                  data=batches)
        else:
            merged = merge_states(
                peer.model, list(states), [w.get(peer.id, 0.0)] + [w[j] for j in senders], batches,
                alignment=self.alignment, bn_stats=self.bn_stats, aggregator=self.aggregator, context=context,
                same_basis=same, into=into, relabel=relabel, alignments=alignments,
            )
        self.matchings += len(alignments)
        if memory is not None:
            self.keep_defence_memory(peer, memory)
        peer.load_state(merged, reset_optimizer=self.reset_optimizer)
        if relabel:
            if not self.reset_optimizer:
                peer.permute_optimizer_state(relabel)  # kept momentum follows its units into the new basis
            self.permute(peer, relabel)
        peer.basis = new_basis
        # how each sender's units were mapped into the peer's (new) basis (read by received_extras;
        # kept as found, not as a per-sender dict: N x degree entries an exchange otherwise)
        self._last_alignment = (senders, alignments, relabel)
        return merged

    @property
    def last_alignment(self) -> dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """``{sender: (its alignment, the relabelling)}`` of the last :meth:`merge`: how each sender's
        units were mapped into the peer's (new) basis (empty permutations: none)."""
        senders, alignments, relabel = getattr(self, "_last_alignment", ((), {}, {}))
        return {j: (alignments.get(k, {}), relabel) for k, j in enumerate(senders)}

    def defence_memory(self, peer: Peer) -> dict[str, torch.Tensor]:
        """The defence's history at ``peer`` (a copy: a merge that fails keeps the old one)."""
        state = self.peer_state.get(peer.id, {})
        return {k[len(DEFENCE_PREFIX):]: v.clone() for k, v in state.items() if k.startswith(DEFENCE_PREFIX)}

    def keep_defence_memory(self, peer: Peer, memory: Mapping[str, torch.Tensor]) -> None:
        """Store the defence's history in the per-peer state: checkpointed, and moved with the units
        where an entry is named ``.../<parameter>`` and shaped like it."""
        state = self.peer_state.setdefault(peer.id, {})
        for k in [k for k in state if k.startswith(DEFENCE_PREFIX)]:
            del state[k]
        for k, v in memory.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"aggregator {self.aggregator!r} put a {type(v).__name__} in its memory under {k!r}: "
                                "only tensors are checkpointed")
            state[DEFENCE_PREFIX + k] = v.detach()

    def received_extras(self, peer: Peer, received: Mapping[int, Mapping[str, torch.Tensor]]
                        ) -> dict[int, StateDict]:
        """The extras each sender of the last :meth:`merge` sent, moved into ``peer``'s basis.

        A neighbour's extras that are shaped like a parameter are permuted as its weights were
        (its alignment, then the relabelling into the consensus basis); others pass unchanged.
        """
        out: dict[int, StateDict] = {}
        for j, (aligned, relabel) in self.last_alignment.items():
            extras = split_extras(received[j])[1]
            for perms in (aligned, relabel):
                if perms:
                    extras.update(permute_like_params(peer, extras, perms))
            out[j] = extras
        return out

    def _join_lowest_basis(self, peer: Peer, states: list, tags: list, batches: list) -> bool:
        """``merge.rebase=before``: relabel the own model into the lowest-tagged neighbour's basis.

        One matching (the neighbour's model onto own, on the data merging sees), applied inversely to
        the own model, its momentum and this method's state: the function is unchanged. Every model
        thus enters the common basis through the permutation its own peer found, so merged models
        agree across peers; with ``after`` each peer re-matches every neighbour and the results disagree.
        Returns whether the own model was relabelled (False: no neighbour is in a lower basis).
        """
        lower = [(t, k) for k, t in enumerate(tags) if t is not None and t < peer.basis]
        if not lower:
            return False
        tag, k = min(lower)
        spec, batches = spec_for(peer.model, batches)
        other = working_copy(peer.model, 0)  # the merge's pooled copy; free again once matching returns
        other.load_state_dict(states[k])
        found = find_permutations(peer.model, [other], batches, self.alignment, spec)[0]
        self.relabel(peer, {g: invert(p) for g, p in found.items()})
        peer.basis = tag
        return True


__all__ = ["AlignedAverage"]
