"""In-process transport: every peer lives in this process (simulation).

Each receiver gets its own clone of every tensor, so no peer can mutate another's model or
another receiver's copy. With ``share_states=True`` (what ``dimat simulate`` uses) every receiver
of a sender's state reads the very state handed to :meth:`exchange` instead, held once rather than
once per receiver, so memory for received states does not grow with the degree; receivers then
treat received states as read-only (nothing in dimat modifies one in place;
``tests/test_scale_memory.py`` checks a round leaves them intact), and the round loop copies a
sender's state before its own merge overwrites it (``dimat.federation.sent_states``). Every delivered state passes the same receive checks as a remote one
(:mod:`dimat.transport.checks`, against the receiving peer's own state), so a bad state is refused
with the same text as over gRPC or torchdist. Bytes are counted as a wire transport would send them
(raw tensor data once per out-neighbour), so simulated communication cost is comparable.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from dimat.transport.base import ExchangeResult, StateDict, TransportError
from dimat.transport.checks import Receipts, verdict
from dimat.transport.schema import Schema


def state_nbytes(state: Mapping[str, object]) -> int:
    """Raw tensor bytes of a state (what a full-precision wire carries, framing excluded)."""
    return sum(v.numel() * v.element_size() for v in state.values())  # type: ignore[attr-defined]


class InProcTransport:
    """Exchange state dicts between peers hosted in one process by copying tensors (or, with
    ``share_states``, by handing every receiver the sent state itself)."""

    def __init__(self, share_states: bool = False) -> None:
        self.share_states = bool(share_states)
        #: totals over the transport's life (the per-exchange figures are in ExchangeResult)
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
    ) -> ExchangeResult:
        """Deliver ``states[p]`` to each of ``out_neighbours[p]``; return what each local peer received.

        A sender listed in ``in_neighbours[q]`` that did not address ``q`` (asymmetric lists) or
        is not hosted here is missing, as a missed deadline would be for a remote transport. A
        state that fails the receive checks is refused (in ``missing`` and ``refused``). A delivery
        counts toward ``bytes_sent`` whether accepted or refused (the bytes moved).
        """
        if self._closed:
            raise TransportError("transport is closed")
        receipts = Receipts(round_idx, states)
        bytes_sent: dict[int, int] = {p: 0 for p in out_neighbours}
        # receivers nearly always share one schema: check each sender's state once per schema. A
        # receiver's schema is interned once (an index), so the N^2 deliveries of a fully connected
        # exchange look up small ints rather than hashing and comparing schemas
        distinct: list[Schema] = []
        schema_of: dict[int, int] = {}
        verdicts: dict[tuple[int, int], str | None] = {}
        listening = {q: set(in_neighbours.get(q, ())) for q in states}
        for sender, targets in out_neighbours.items():
            if sender not in states:
                raise TransportError(f"round {round_idx}: peer {sender} has no state to send")
            state = states[sender]
            size = state_nbytes(state)  # once per sender: a fully connected exchange has N^2 deliveries
            for q in targets:
                if q == sender or q not in listening or sender not in listening[q]:
                    continue
                self.messages_sent += 1
                bytes_sent[sender] += size
                if q not in schema_of:
                    own = Schema.from_state(states[q])
                    schema_of[q] = next((i for i, sc in enumerate(distinct) if sc == own), len(distinct))
                    if schema_of[q] == len(distinct):
                        distinct.append(own)
                key = (sender, schema_of[q])
                if key not in verdicts:
                    verdicts[key] = verdict(state, distinct[key[1]])
                reason = verdicts[key]
                copy = state if self.share_states or reason is not None else {k: v.detach().clone() for k, v in state.items()}
                receipts.record(q, sender, copy, reason)
        self.bytes_sent += sum(bytes_sent.values())
        return receipts.result(in_neighbours, bytes_sent)

    def close(self) -> None:
        """Nothing to release; later exchanges are refused."""
        self._closed = True
