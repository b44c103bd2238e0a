"""The one seam every transport implements.

A transport moves state dicts between peers for a round; it never decides *who* (the topology
does) nor *what* is done with the states (the peer does). One process may host several peers
(in-process simulation hosts all of them; torchrun may host several per rank), so the interface
speaks of the peers that live *here*.
"""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import torch

StateDict = dict[str, torch.Tensor]


class Transport(Protocol):
    """Exchange weights between the peers hosted here and their neighbours."""

    def exchange(
        self,
        round_idx: int,
        states: Mapping[int, StateDict],
        in_neighbours: Mapping[int, Sequence[int]],
        out_neighbours: Mapping[int, Sequence[int]],
        timeout: float | None = None,
    ) -> dict[int, dict[int, StateDict]]:
        """Send ``states[p]`` to every ``out_neighbours[p]`` and collect what ``in_neighbours[p]`` sent.

        ``states`` holds the states of the peers hosted by this process, keyed by peer id.
        Returns ``{local_peer: {sender: state}}``. A neighbour that missed the deadline is absent
        from the inner dict (never a partial or corrupt state); the caller renormalises weights.
        Received tensors are fresh CPU tensors that the caller may keep.
        """
        ...

    def close(self) -> None:
        """Release sockets, servers and process groups."""
        ...


class TransportError(RuntimeError):
    """A message was rejected (bad hash, wrong shape, unknown sender...). The receiver is unchanged."""
