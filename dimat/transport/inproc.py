"""In-process transport: every peer lives in this process (simulation).

Each receiver gets its own clone of every tensor, so no peer can mutate another's model or
another receiver's copy. Bytes are counted as a wire transport would send them (raw tensor data
once per out-neighbour), so simulated communication cost is comparable with gRPC and torchrun.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from dimat.transport.base import StateDict, TransportError


class InProcTransport:
    """Exchange state dicts between peers hosted in one process by copying tensors."""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.messages_sent = 0
        self._closed = False

    def exchange(
        self,
        round_idx: int,
        states: Mapping[int, StateDict],
        in_neighbours: Mapping[int, Sequence[int]],
        out_neighbours: Mapping[int, Sequence[int]],
        timeout: float | None = None,
    ) -> dict[int, dict[int, StateDict]]:
        """Deliver ``states[p]`` to each of ``out_neighbours[p]``; return what each local peer received.

        A sender listed in ``in_neighbours[q]`` that did not address ``q`` (asymmetric lists) or
        is not hosted here is simply absent, as a missed deadline would be for a remote transport.
        """
        if self._closed:
            raise TransportError("transport is closed")
        inbox: dict[int, dict[int, StateDict]] = {q: {} for q in states}
        for sender, targets in out_neighbours.items():
            if sender not in states:
                raise TransportError(f"round {round_idx}: peer {sender} has no state to send")
            for q in targets:
                if q == sender or q not in inbox or sender not in in_neighbours.get(q, ()):
                    continue
                inbox[q][sender] = {k: v.detach().clone() for k, v in states[sender].items()}
                self.messages_sent += 1
                self.bytes_sent += sum(v.numel() * v.element_size() for v in states[sender].values())
        return inbox

    def close(self) -> None:
        """Nothing to release; later exchanges are refused."""
        self._closed = True

