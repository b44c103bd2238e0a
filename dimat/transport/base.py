"""The one seam every transport implements.

A transport moves state dicts between peers for a round; it never decides *who* (the topology
does) nor *what* is done with the states (the peer does). One process may host several peers
(in-process simulation hosts all of them; torchrun may host several per rank), so the interface
speaks of the peers that live *here*.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import torch

StateDict = dict[str, torch.Tensor]


@dataclass
class ExchangeResult:
    """What one :meth:`Transport.exchange` did, for the peers hosted here.

    ``received``: local receiver -> sender -> state that passed the receive checks
    (:mod:`dimat.transport.checks`); fresh CPU tensors the caller may keep.
    ``missing``: local receiver -> sorted in-neighbours it got no valid state from (late, down,
    did not address it, or refused).
    ``refused``: local receiver -> sender -> the one-line reason its state was refused (the text
    is the same on every transport: :func:`dimat.transport.checks.refusal_message`).
    ``bytes_sent``: local sender -> tensor payload bytes it sent in this exchange after encoding
    (compressed by :mod:`dimat.exchange` where configured: the transport moves payloads), summed over the out-neighbours it addressed,
    same-process edges included: the logical cost, equal across transports for the same states,
    topology and encoding. Framing (headers, hashes, protobuf) is not counted.

    Transports and the compressor build it through :class:`dimat.transport.checks.Receipts`, the
    one receive path (check, word a refusal, record it, derive ``missing``).
    """

    received: dict[int, dict[int, StateDict]]
    missing: dict[int, list[int]]
    refused: dict[int, dict[int, str]]
    bytes_sent: dict[int, int]


class Transport(Protocol):
    """Exchange weights between the peers hosted here and their neighbours."""

    def exchange(
        self,
        round_idx: int,
        states: Mapping[int, StateDict],
        in_neighbours: Mapping[int, Sequence[int]],
        out_neighbours: Mapping[int, Sequence[int]],
        timeout: float | None = None,
    ) -> ExchangeResult:
        """Send ``states[p]`` to every ``out_neighbours[p]`` and collect what ``in_neighbours[p]`` sent.

        ``states`` holds the states of the peers hosted by this process, keyed by peer id.
        ``round_idx`` is an opaque, increasing exchange sequence number (a round loop with several
        gossip exchanges per round numbers them consecutively). A neighbour that missed the
        deadline, or whose state failed a receive check, is absent from ``received`` (never a
        partial or corrupt state) and listed in ``missing``; the caller renormalises weights.
        """
        ...

    def close(self) -> None:
        """Release sockets, servers and process groups."""
        ...


class TransportError(RuntimeError):
    """A message was rejected (bad hash, wrong shape, unknown sender...). The receiver is unchanged.

    ``reason`` is the problem without the transport-specific "who/where" prefix, so that the same
    problem reads the same on every transport.
    """

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = message if reason is None else reason

    def __reduce__(self):  # keep picklable (a keyword-only argument breaks the default)
        return (_rebuild_error, (type(self), str(self), self.reason))


def _rebuild_error(cls: type, message: str, reason: str) -> "TransportError":
    return cls(message, reason=reason)


class DataLossError(TransportError):
    """Bytes were lost or corrupted in transit (truncated stream, missing trailer, hash mismatch).

    Distinct from a well-formed but unacceptable state (:class:`~dimat.transport.checks.StateRejected`):
    gRPC maps it to ``DATA_LOSS`` rather than ``INVALID_ARGUMENT``.
    """
