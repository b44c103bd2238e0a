"""The states a process's peers send in one exchange, held once and copied only when they must be.

Peers merge one after another, and a peer's merge overwrites its model, which neighbours that merge
later still need as it was. The plain answer is a copy of every peer's state before the exchange:
N model copies at once. In-process delivery (``transport=inproc``) hands receivers the very state
that was sent, so here the sent state is the live model (no copy) and a peer's state is copied
only just before its own merge overwrites it, and only if a local receiver that has not merged
yet holds it; the copy is dropped as soon as its last reader has merged. On a ring that keeps
about three copies alive instead of N.

Any other transport (or an attack, whose sent states are not the models) gets the copies
``Method.payload`` makes, as before: a remote transport may read the sent tensors after
:meth:`exchange` returns.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Mapping

import torch


from dimat.typing import StateDict


class SentStates:
    """One exchange's sent states (``states``) and who still reads them."""

    def __init__(self, peers: Mapping[int, Any], payload: Callable[..., StateDict], *, live: bool) -> None:
        """``payload(peer, live=...)`` is what a peer sends (the method's, ``Method.payload``)."""
        self.live = live
        # live: detached views of the live tensors, copied on write (before_merge); else copies
        self.states: dict[int, StateDict] = {pid: payload(p, live=live) for pid, p in peers.items()}
        self._readers: Counter[int] = Counter()
        #: every receiver got exactly what was sent (the very dicts): what one peer computes from its
        #: received states, another computes from the same (a merge may be shared, shared_merge)
        self.exact = False

    def delivered(self, received: Mapping[int, Mapping[int, StateDict]]) -> None:
        """Count the local receivers holding each sender's state as sent (not a decoded copy)."""
        if not self.live:
            return
        exact = True
        for got in received.values():
            for sender, state in got.items():
                if state is self.states.get(sender):
                    self._readers[sender] += 1
                else:
                    exact = False  # decoded or re-encoded on the way (e.g. compression)
        self.exact = exact

    def before_merge(self, pid: int) -> None:
        """Peer ``pid`` is about to overwrite its model: copy its sent state if someone still reads it."""
        state = self.states.get(pid)
        if self.live and self._readers[pid] > 0 and state is not None:
            for k, v in state.items():  # in place: every receiver holds this very dict
                state[k] = v.clone()

    def after_merge(self, got: Mapping[int, StateDict]) -> None:
        """A receiver has merged ``got``: senders nobody reads any more are released."""
        if not self.live:
            return
        for sender, state in got.items():
            if state is self.states.get(sender):
                self._readers[sender] -= 1
                if self._readers[sender] == 0:
                    self.states[sender] = None  # type: ignore[assignment]


__all__ = ["SentStates"]
