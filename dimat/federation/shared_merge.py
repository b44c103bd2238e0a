"""Merges shared by several peers, computed once per exchange.

When peers merge by plain weighted averaging (``average``, gossip, or DIMAT once every state is in
one basis) with the default mean aggregator, a peer's merged model depends only on its renormalised
row of mixing weights, ``{peer id: weight}``, and the states those peers sent. On a fully connected
graph every row is the same, so N peers would compute the same average of N states N times (N^2
state additions a round); this computes it once, and each peer only adds what is its own: the
BatchNorm reset on its own data.

The average is always taken over the contributors in ascending id order, whether or not another
peer shares it, so the result does not depend on which peer computed it or on how the peers are
spread over processes (it equals the per-peer merge up to float rounding of the summation order).
An average is kept only while peers that will use it have not merged yet, so memory stays one
state per distinct shared row. Not used under an attack, where a malicious peer's sent state is
not its own model.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping

import torch
from torch import nn

from dimat.align.batchnorm import bn_names, from_second_moments, has_batchnorm, reset_bn_stats, to_second_moments
from dimat.merge.aggregators import weighted_average

from dimat.typing import StateDict
Row = tuple[tuple[int, float], ...]


def row_key(weights: Mapping[int, float]) -> Row:
    """The identity of a merge's inputs: who contributes, with which (renormalised) weight.

    Weights are rounded to 12 decimals: rows that are equal on paper differ in the last bit after
    renormalisation (the sum is taken in each row's own order). The average is then taken with
    the rounded weights, so it does not depend on which peer computed it.
    """
    # N rows of N entries an exchange on a full graph: no conversions for what is already int and float
    return tuple(sorted((p if type(p) is int else int(p), round(w if type(w) is float else float(w), 12))
                        for p, w in weights.items()))


class SharedMerges:
    """One exchange's shared averages; ``uses`` counts the peers expected to merge each row."""

    def __init__(self, uses: Iterable[Row], *, reuse: bool = True) -> None:
        #: whether one peer's average may serve another: only when every peer received exactly the
        #: states that were sent (a peer's own contribution is its live model, the others' the
        #: copy they received); otherwise each peer computes its own, in the same canonical order
        self.reuse = reuse
        self._left = Counter(uses)
        self._kept: dict[Row, StateDict] = {}
        #: averages computed, and merges served from one computed before (for tests and benches)
        self.computed = 0
        self.reused = 0

    def merge(self, model: nn.Module, own_id: int, neighbours: Mapping[int, Mapping[str, torch.Tensor]],
              weights: Mapping[int, float], *, bn_stats: str, data: list | None) -> StateDict:
        """The merged state for the peer ``own_id`` whose live model is ``model`` (``neighbours``: the
        payloads as received; keys beyond the model's are not read). ``model`` is not changed here
        unless BatchNorm is recomputed, ``bn_stats="own"``, which happens on ``model`` itself: it is
        loaded next anyway. ``bn_stats="mixture"`` mixes the statistics as moments, as
        ``merge_states`` does; ``average`` averages them with the weights."""
        key = row_key(weights)
        avg = self._kept.get(key)
        if avg is None:
            own = model.state_dict()
            states = [own if p == own_id else neighbours[p] for p, _ in key]
            # a payload as sent may carry more than the model (its basis tag, a method's extras):
            # the average reads the model's own keys, and the first state's keys are the ones it reads
            states[0] = {k: states[0][k] for k in own}
            mixed = bn_names(model) if bn_stats == "mixture" else []
            if mixed:
                states = [to_second_moments(s, mixed) for s in states]
            avg = weighted_average(states[0], states[1:], [w for _, w in key])
            if mixed:
                avg = from_second_moments(avg, mixed)
            self.computed += 1
        else:
            self.reused += 1
        self._left[key] -= 1
        if self.reuse and self._left[key] > 0:
            self._kept[key] = avg
        else:
            self._kept.pop(key, None)
        if bn_stats == "own" and has_batchnorm(model):
            model.load_state_dict(avg)
            reset_bn_stats(model, data)
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
        return avg


__all__ = ["SharedMerges", "row_key"]
