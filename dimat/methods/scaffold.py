"""SCAFFOLD-style drift correction between infrequent merges, on top of DIMAT's aligned merge.

Under label skew a peer's local steps drift towards its own classes; merging rarely then averages
models that went apart. SCAFFOLD (Karimireddy et al., 2020) corrects every local step by the
difference between the federation's update direction and the peer's own: ``g + d_i`` with
``d_i = c - c_i``. Two ways to know ``d_i`` (``merge.variates``):

* ``local`` (zero extra bytes): SCAFFOLD's option II gives ``c_i^+ = c_i - c + (x - y_i)/(K lr)`` and,
  with ``c`` the neighbourhood mean of the ``c_i``, ``d_i^+ = d_i + (y_i - x_i^merged)/(K lr)``: the gap
  between the peer's own model before the merge ``y_i`` and the merged one. Every peer computes it
  from what it already holds. On a fully connected graph the ``d_i`` sum to zero exactly as in
  SCAFFOLD; elsewhere it is each peer's neighbourhood estimate.
* ``sent`` (twice the bytes): the variates ``c_i^+`` travel with the weights (extras) and are
  averaged with the mixing weights, aligned with the neighbours' units: ``d_i = c̄_i - c_i``.

With SGD momentum ``beta`` a step moves the weights by about ``lr / (1 - beta)`` times the gradient,
so the displacement is scaled by ``(1 - beta)``: taken raw, the correction is ``1/(1-beta)`` = 10x
too large and training diverges (measured: chance accuracy). ``K`` is the local steps since the
last merge. A merge that matches models of another basis (the first merges of peers with
different inits) measures the alignment jump, not drift: ``local`` then only relabels ``d_i``.

Everything per peer (``d``, and for ``sent`` the variate, its neighbourhood mean and the merged
model it was measured from) is parameter-shaped, so it is permuted with the units whenever the
model is relabelled, and it is checkpointed with the peer.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from dimat.config import ConfigError, MergeSettings
from dimat.methods.aligned import AlignedAverage
from dimat.peer import Peer
from dimat.topology.membership import renormalise
from dimat.typing import StateDict

#: ``merge.alignment``: how a neighbour is aligned before it is averaged
ALIGNMENT = {"activation": "activation", "weight": "weight", "none": None}
VARIATES = ("local", "sent")


class Scaffold(AlignedAverage):
    """DIMAT (or weight matching, or averaging) whose local steps are drift-corrected."""

    name = "scaffold"
    options = ("alignment", "variates", "correction_scale")

    def __init__(self, settings: MergeSettings) -> None:
        super().__init__(settings)
        opts = settings.options
        missing = [k for k in self.options if k not in opts]
        if missing:
            raise ValueError(f"merge=scaffold needs merge.{', merge.'.join(missing)} (configs/merge/scaffold.yaml)")
        if opts["alignment"] not in ALIGNMENT:
            raise ValueError(f"merge.alignment must be one of {', '.join(ALIGNMENT)} (got {opts['alignment']!r})")
        if opts["variates"] not in VARIATES:
            raise ValueError(f"merge.variates must be one of {', '.join(VARIATES)} (got {opts['variates']!r})")
        self.alignment = ALIGNMENT[opts["alignment"]]  # type: ignore[misc]
        self.variates = str(opts["variates"])
        self.scale = float(opts["correction_scale"])
        self._step_keys: dict[int, list[tuple[torch.nn.Parameter, str]]] = {}
        if self.scale < 0:
            raise ValueError(f"merge.correction_scale must be non-negative (got {self.scale})")

    # ------------------------------------------------------------ local hooks
    def setup(self, peer: Peer) -> None:
        if peer.config.optimizer.lower() != "sgd":
            raise ConfigError(f"merge=scaffold corrects SGD steps (train.optimizer={peer.config.optimizer}): "
                              "use train.optimizer=sgd, or merge=dimat")
        state: dict[str, torch.Tensor] = {"steps": torch.tensor(0), "merges": torch.tensor(0)}
        for n, q in self._params(peer):
            state[f"d/{n}"] = torch.zeros_like(q)
            if self.variates == "sent":
                state[f"c/{n}"] = torch.zeros_like(q)
                state[f"cbar/{n}"] = torch.zeros_like(q)
                state[f"x/{n}"] = q.detach().clone()
        self.peer_state[peer.id] = state
        # every local step reads these: the (parameter, correction key) pairs, built once per peer
        self._step_keys[peer.id] = [(q, f"d/{n}") for n, q in self._params(peer)]
        peer.before_step = self.before_step

    def before_step(self, peer: Peer) -> None:
        state = self.peer_state[peer.id]
        for q, key in self._step_keys[peer.id]:
            if q.grad is not None:
                q.grad.add_(state[key], alpha=self.scale)
        state["steps"] += 1

    # ------------------------------------------------------------------- what
    def extras(self, peer: Peer) -> StateDict:
        return self._variate(peer) if self.variates == "sent" else {}

    def _variate(self, peer: Peer) -> StateDict:
        """``c_i^+ = c_i - c̄_i + (x - y_i)(1 - beta)/(K lr)``: a pure function of the peer's state now."""
        state = self.peer_state[peer.id]
        per_step = self._per_step(peer)
        return {f"c/{n}": state[f"c/{n}"] - state[f"cbar/{n}"] + (state[f"x/{n}"] - q.detach()) * per_step
                for n, q in self._params(peer)}

    def _per_step(self, peer: Peer) -> float:
        """``(1 - beta) / (K lr)``: turns a displacement over ``K`` momentum steps into a gradient."""
        steps = max(int(self.peer_state[peer.id]["steps"]), 1)
        return (1.0 - peer.config.momentum) / (steps * peer.lr)  # the round's rate (train.lr_schedule)

    # -------------------------------------------------------------------- how
    def merge(self, peer: Peer, received: Mapping[int, Mapping[str, torch.Tensor]], weights: Mapping[int, float],
              *, shared: Any | None = None) -> StateDict:
        state = self.peer_state[peer.id]
        row = renormalise(weights, received, self_id=peer.id)
        if not any(j != peer.id for j in row):
            return super().merge(peer, received, weights, shared=shared)  # nobody arrived: nothing changes
        per_step = self._per_step(peer)
        # kept in the state, so a relabelling inside the merge moves them with the units
        for n, q in self._params(peer):
            state[f"y/{n}"] = q.detach().clone()
        if self.variates == "sent":
            state.update(self._variate(peer))
        merged = super().merge(peer, received, weights, shared=shared)
        cross_basis = self.last_cross_basis  # a neighbour in another basis than the peer's before the merge
        if self.variates == "local":
            # aligned merges change basis while bases differ; plain averaging only at the first merge
            jump = cross_basis and (self.alignment is not None or int(state["merges"]) == 0)
            if not jump:
                for n, q in self._params(peer):
                    state[f"d/{n}"] += (state[f"y/{n}"] - q.detach()) * per_step
        else:
            got = self.received_extras(peer, received)
            for n, q in self._params(peer):
                cbar = row[peer.id] * state[f"c/{n}"]
                for j, extras in got.items():
                    cbar = cbar + row[j] * extras[f"c/{n}"]
                state[f"cbar/{n}"] = cbar
                state[f"d/{n}"] = cbar - state[f"c/{n}"]
                state[f"x/{n}"] = q.detach().clone()
        for n, _ in self._params(peer):
            del state[f"y/{n}"]
        state["steps"] = torch.tensor(0)
        state["merges"] += 1
        return merged

    @staticmethod
    def _params(peer: Peer) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, q) for n, q in peer.model.named_parameters() if q.requires_grad]


__all__ = ["Scaffold"]
