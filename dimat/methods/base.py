"""The method interface: one object, built once from the config, that owns the algorithm.

A *method* (the strategy, in Flower's words) decides everything that makes one decentralized
algorithm differ from another; the round loop, the peers and the transports are the same for all:

* **when** peers exchange: :meth:`Method.exchanges_per_round` (0 for a method that never talks);
* **what** a peer sends: :meth:`Method.payload` (its weights and basis tag, plus any extra tensors
  the method needs, such as control variates, under :data:`EXTRA_PREFIX`);
* **how** it merges what arrived: :meth:`Method.merge` (alignment, aggregation, BatchNorm
  statistics, what happens to the optimizer);
* the **local-training hooks**: :meth:`Method.start_round` and :meth:`Method.before_step` (a
  gradient correction, applied after ``backward`` and before the optimizer step);
* the **per-peer state** it keeps (:attr:`Method.peer_state`): checkpointed with the peer
  (:meth:`checkpoint`, :meth:`restore`) and permuted with the peer's units whenever the peer's model
  is relabelled (:meth:`permute`).

Built-in methods are one module each in this package (``dimat.methods.registry`` names them); a
user's method is ``merge=custom merge.class=pkg.mod:Class`` (docs/methods.md).
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch

from dimat.align.permute import permute_state
from dimat.align.spec import get_spec
from dimat.config import MergeSettings
from dimat.merge.basis import BASIS_KEY, attach_basis
from dimat.peer import Peer
from dimat.typing import StateDict

#: extra tensors a method sends travel in the payload under this prefix (never a model's own key)
EXTRA_PREFIX = "_dimat.extra."


def param_of(key: str) -> str:
    """The parameter a per-peer state key belongs to: ``"d/fc.weight"`` -> ``"fc.weight"`` (a tag before ``/``)."""
    return key.rsplit("/", 1)[-1]


def split_extras(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, StateDict]:
    """``(model state with its basis tag, extras without their prefix)`` of a received payload."""
    model = {k: v for k, v in state.items() if not k.startswith(EXTRA_PREFIX)}
    extras = {k[len(EXTRA_PREFIX):]: v for k, v in state.items() if k.startswith(EXTRA_PREFIX)}
    return model, extras


class Method:
    """Base class of every method: the hooks the round loop calls, with plain defaults.

    Subclasses set :attr:`name` and override the hooks they need. ``settings`` is the validated
    ``merge:`` section (:class:`dimat.config.MergeSettings`); ``settings.options`` holds the keys
    of that section no built-in field reads, which a method declares in :attr:`options`.

    Example:
        >>> class Local(Method):            # never talks: every peer trains alone
        ...     name = "local"
        ...     def exchanges_per_round(self, steps_per_round):
        ...         return 0
    """

    #: the name ``merge.method`` gives (``custom`` for a class loaded with ``merge.class``)
    name: ClassVar[str] = "method"
    #: one model trained on the union of every peer's data (the federation is one peer)
    centralized: ClassVar[bool] = False
    #: its merge is a plain mixing step that CHOCO-gossip's consensus step may replace (``exchange.choco_step``)
    choco: ClassVar[bool] = False
    #: keys of the ``merge:`` section beyond the shared ones that this method reads (``settings.options``)
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: MergeSettings) -> None:
        self.settings = settings
        #: per-peer state: ``{peer id: {name: tensor}}``; tensors shaped like a model parameter are
        #: permuted with the peer's units (:meth:`permute`) and all of it is checkpointed
        self.peer_state: dict[int, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ when
    def exchanges_per_round(self, steps_per_round: Sequence[int]) -> int:
        """How many exchanges a round has, given every peer's local steps per round.

        Computed from the partition sizes, which every process knows, so all agree without talking.
        The default: one, after local training; with ``merge.every_steps`` one every that many steps
        of the median peer; with ``merge.merges_per_round``, that many.
        """
        if self.settings.merges_per_round is not None:
            return int(self.settings.merges_per_round)
        return _every(self.settings.every_steps, steps_per_round)

    # ------------------------------------------------------------ local hooks
    def setup(self, peer: Peer) -> None:
        """Called once per local peer when the federation is built (allocate per-peer state here)."""

    def start_round(self, peer: Peer) -> None:
        """Local training of a round begins (the proximal anchor of FedProx is set here)."""
        peer.start_round()

    def has_step_hook(self) -> bool:
        """Whether :meth:`before_step` does anything (a stacked executor cannot run per-peer hooks)."""
        return type(self).before_step is not Method.before_step

    def before_step(self, peer: Peer) -> None:
        """After ``backward`` and before the optimizer step: change ``p.grad`` in place to correct the step."""

    # ------------------------------------------------------------------- what
    def payload(self, peer: Peer, *, live: bool = False) -> StateDict:
        """What ``peer`` sends: its state with its basis tag, plus :meth:`extras` under :data:`EXTRA_PREFIX`.

        ``live=True`` gives views of the live tensors (in-process delivery copies on write, see
        ``dimat.federation.sent_states``); otherwise detached CPU copies that are safe to keep.
        """
        state = (attach_basis(peer.model.state_dict(), peer.basis) if live else peer.shared_state())
        for k, v in self.extras(peer).items():
            state[EXTRA_PREFIX + k] = v if live else v.detach().to("cpu", copy=True)
        return state

    def extras(self, peer: Peer) -> StateDict:
        """Extra tensors this method sends besides the weights (counted in ``bytes_sent``); none by default."""
        return {}

    # -------------------------------------------------------------------- how
    def merge(self, peer: Peer, received: Mapping[int, Mapping[str, torch.Tensor]], weights: Mapping[int, float],
              *, shared: Any | None = None) -> StateDict:
        """Merge what ``peer`` received into it; returns the merged model state.

        Args:
            peer: the receiving peer (its model is updated in place).
            received: ``{sender: payload}`` that passed the receive checks.
            weights: the peer's raw row of the topology's mixing weights (``{id: weight}``, itself
                included, possibly naming senders that did not arrive: renormalise it with
                :func:`dimat.topology.membership.renormalise`).
            shared: a :class:`dimat.federation.shared_merge.SharedMerges` a plain average may use.
        """
        raise NotImplementedError(f"method {self.name!r} exchanges but does not define merge()")

    def adopt(self, peer: Peer, payload: Mapping[str, torch.Tensor]) -> None:
        """Take a neighbour's payload as ``peer``'s own state (a peer rejoining behind its neighbours).

        The model and basis tag are loaded and the optimizer restarts; extras are dropped (a
        method whose state must follow overrides this).
        """
        state, _ = split_extras(payload)
        peer.load_state(state, reset_optimizer=True)

    # ------------------------------------------------------------------ state
    def permute(self, peer: Peer, perms: Mapping[str, torch.Tensor]) -> None:
        """The peer's units were relabelled by ``perms``: move the per-peer state with them."""
        state = self.peer_state.get(peer.id)
        if not state or not perms:
            return
        state.update(permute_like_params(peer, state, perms))

    def relabel(self, peer: Peer, perms: Mapping[str, torch.Tensor]) -> None:
        """Relabel ``peer``'s units (model, optimizer state and this method's state) by ``perms``."""
        peer.permute_units(perms)
        self.permute(peer, perms)

    def checkpoint(self, peer: Peer) -> dict[str, torch.Tensor]:
        """The per-peer state to save with ``peer``'s checkpoint (copies)."""
        return {k: v.detach().clone() for k, v in self.peer_state.get(peer.id, {}).items()}

    def restore(self, peer: Peer, saved: Mapping[str, torch.Tensor]) -> None:
        """Inverse of :meth:`checkpoint`."""
        if saved:
            self.peer_state[peer.id] = {k: v.clone() for k, v in saved.items()}


def permute_like_params(peer: Peer, tensors: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor]
                        ) -> StateDict:
    """The entries of ``tensors`` named and shaped like a parameter of ``peer`` (``name`` or ``tag/name``),
    relabelled by ``perms`` as that parameter would be; other entries are left out."""
    params = dict(peer.model.named_parameters())
    movable = {k: v for k, v in tensors.items()
               if param_of(k) in params and v.shape == params[param_of(k)].shape}
    if not movable or not perms:
        return movable
    spec = get_spec(peer.model)
    return {k: permute_state({param_of(k): v}, spec, perms, partial=True)[param_of(k)] for k, v in movable.items()}


def _every(every: int | None, steps_per_round: Sequence[int]) -> int:
    """Exchanges a round has when peers exchange every ``every`` local steps (None: once a round)."""
    if not every or not len(steps_per_round):
        return 1
    return max(1, round(float(np.median(list(steps_per_round))) / every))


__all__ = ["EXTRA_PREFIX", "Method", "split_extras", "BASIS_KEY"]
