"""Delta mode: both ends of an edge keep the reference a message is relative to.

A sender's *reference* is what its neighbours reconstruct from its messages (CHOCO-SGD's public
copy ``x_hat``); the sender tracks it exactly by decoding its own messages. Every message carries
``[seq, base, kind, chunk]`` (:class:`dimat.exchange.payload.Meta`):

* ``FULL`` (dense codecs): a whole state; the reference becomes its decoding. ``base = 0``.
* ``DELTA``: ``C(x - reference)``; a receiver applies it only if its reference for this sender is
  the one the message names (``base`` = the seq of the sender's previous message).
* ``CHUNK c`` (chunked codecs, whose fixed layout cannot carry a usable state: sparse and sign):
  a stretch of every tensor's entries, by assignment (sparse: entries ``c*k .. c*k+k-1`` exactly;
  sign: the ``c``-th quarter in int4); chunk 0 starts from zeros, the last completes the reference.
  Such a sender's full state is spread over ``ceil(1/ratio)`` (sparse) or 4 (sign) exchanges,
  during which its neighbours do not merge it. A chunked sender also starts over when its unit
  basis tag changes (relabelled by a merge: the change is then as large as the state).

Falling back to a full state. Every delta-mode payload also carries the sender's *acks*: for every
peer ``j`` of the federation, the seq of the complete reference it holds for ``j`` (0: none). A
sender that hears from an out-neighbour whose ack is not the seq of the completing message it sent
it in the previous exchange (the neighbour missed it, refused it, or restarted) sends a full state
next; so does a sender without a reference (its first exchange, or after its own restart: references
live in memory only, both sides start over). A receiver that cannot apply a message (wrong base)
drops its reference for that sender, so its acks say so. Acks travel on the reverse edge: on a
topology where an out-neighbour never sends back, a miss there is only repaired by the next full
state the sender sends for another reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

FULL, DELTA, CHUNK = 0, 1, 2


@dataclass
class Outgoing:
    """A local sender's side: its reference, and what it expects its out-neighbours to ack."""

    ref: dict[str, torch.Tensor] | None = None  # floating tensors, work dtype
    seq: int = 0  # seq of the last message sent (0: none)
    chunk: int | None = None  # next chunk while a sparse full state is being sent
    need_full: bool = True
    contraction: float | None = None  # 1 - ||d - C(d)||^2 / ||d||^2 of the last dense message
    basis: torch.Tensor | None = None  # the unit-basis tag of the last message (a chunked codec restarts on a change)
    pending: dict[int, int] = field(default_factory=dict)  # acks expected for this exchange's message
    expect: dict[int, int] = field(default_factory=dict)  # acks expected in the payloads being received now


@dataclass
class Incoming:
    """A local receiver's copy of one sender's reference."""

    ref: dict[str, torch.Tensor]  # floating tensors, work dtype
    seq: int
    complete: bool  # False while a chunked full state is still arriving

    @property
    def ack(self) -> int:
        return self.seq if self.complete else 0


__all__ = ["CHUNK", "DELTA", "FULL", "Incoming", "Outgoing"]
