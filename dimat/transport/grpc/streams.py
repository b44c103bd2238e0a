"""Admission and time bounds of streaming RPCs: :class:`StreamSlots` and :class:`BoundedStream`.

Every PushWeights and FetchState takes a slot (a global cap below the server's
``maximum_concurrent_rpcs``, so unary RPCs, health checks and heartbeats always find a worker, and a
cap per caller key); a push is read through a :class:`BoundedStream`, which ends it when the next
message does not come within the idle timeout, the stream outlives its total bound, or its slot is
reclaimed because it sent nothing while an admitted stream needed the slot (docs/grpc.md, "Threat
model").
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from dimat.transport.base import TransportError

_END = object()


class StreamTimeout(TransportError):
    """A stream stalled (no message within the idle timeout) or outlived its total bound."""


class StreamReclaimed(StreamTimeout):
    """A stream that had sent no payload data gave its slot to a stream that needed one."""


class BoundedStream:
    """A request iterator read on a helper thread, at most ``depth`` messages ahead, with time bounds.

    gRPC reads the next message only when asked; pulling on another thread overlaps receiving the
    next chunk with copying and hashing this one (bounded: ``depth`` chunks of memory) and lets the
    servicer stop waiting: :meth:`next` raises :class:`StreamTimeout` when no message came within
    ``idle`` seconds (the first one included) or the stream is older than ``total`` seconds, and
    :class:`StreamReclaimed` after :meth:`reclaim`. The servicer then aborts the RPC, which ends the
    helper's blocked read. Time the servicer spends on a message itself is not idle time.
    """

    def __init__(self, it: Iterator, *, idle: float, total: float, depth: int = 2) -> None:
        self.idle, self.end = float(idle), time.monotonic() + float(total)
        self.total = float(total)
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._it = it
        #: messages read from the client so far, and when the latest came (slot reclaiming reads them)
        self.pulled = 0
        self.last_at = time.monotonic()
        self._thread = threading.Thread(target=self._pump, name="dimat-stream", daemon=True)
        self._thread.start()

    @property
    def silent(self) -> bool:
        """True while the client sent no payload data (nothing, or only its header)."""
        return self.pulled <= 1

    def _pump(self) -> None:
        try:
            for item in self._it:
                self.pulled += 1
                self.last_at = time.monotonic()
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._q.put(_END)
        except BaseException as exc:  # re-raised in the consumer
            self._q.put(exc)

    def reclaim(self, why: str) -> None:
        """Make the consumer's next (or current) wait raise :class:`StreamReclaimed` (a silent stream's queue is empty)."""
        try:
            self._q.put_nowait(StreamReclaimed(why, reason=why))
        except queue.Full:  # it holds data after all: it is not silent, and keeps going
            pass

    def next(self):
        """The next message, ``None`` at the end of the stream; raises :class:`StreamTimeout`."""
        now = time.monotonic()
        wait = min(self.idle, self.end - now)
        if wait <= 0:
            raise StreamTimeout(f"stream open longer than its {self.total:.1f}s bound",
                                reason=f"stream open longer than its {self.total:.1f}s bound")
        try:
            item = self._q.get(timeout=wait)
        except queue.Empty:
            why = (f"no message for {self.idle:.1f}s (stream idle timeout)" if wait >= self.idle
                   else f"stream open longer than its {self.total:.1f}s bound")
            raise StreamTimeout(why, reason=why) from None
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self) -> Iterator:
        while True:
            item = self.next()
            if item is None:
                return
            yield item

    def close(self) -> None:
        self._stop.set()


@dataclass(eq=False)
class Slot:
    """One admitted stream: the key it counts against and, for a push, its stream (None: not reclaimable)."""

    key: str | None
    stream: BoundedStream | None = None


class StreamSlots:
    """Admission of streaming RPCs: at most ``total`` at once, at most ``per_caller`` per caller key.

    A push enters under its connection (or certificate) key, and once its header names the sender
    moves to that sender's key (:meth:`rekey`): the connection cap bounds streams that have not said
    who they are, the sender cap those that have. A cap that is full is first relieved by
    *reclaiming* the longest-idle push that has sent no payload data (nothing, or a header and then
    nothing) among the streams counted against it (the whole table for the total, that sender's
    streams for a sender): a stalled stream holds a slot only until somebody needs it, so streams
    that stall (whoever opens them) cannot keep an admitted sender's push out. The connection cap
    is not relieved (those are the caller's own streams). ``refused`` counts the streams turned
    away (``RESOURCE_EXHAUSTED``), ``reclaimed`` the silent ones cut off.
    """

    def __init__(self, total: int, per_caller: int) -> None:
        self.total, self.per_caller = int(total), int(per_caller)
        self.lock = threading.Lock()
        self.used = 0
        self.by_caller: dict[str, int] = {}
        self.held: list[Slot] = []
        self.refused = 0
        self.reclaimed = 0

    def enter(self, key: str) -> Slot | None:
        """A slot under ``key`` (None when refused); a push sets :attr:`Slot.stream`, which makes it
        reclaimable while it sends nothing (a fetch does not: it is this server that sends)."""
        with self.lock:
            n = self.by_caller.get(key, 0)
            if n >= self.per_caller or (self.used >= self.total and not self._reclaim(None)):
                self.refused += 1
                return None
            slot = Slot(key)
            self.by_caller[key] = n + 1
            self.used += 1
            self.held.append(slot)
            return slot

    def rekey(self, slot: Slot, new: str) -> bool:
        """Move ``slot`` to ``new`` (False, nothing moved, when ``new`` is full of streams that sent data)."""
        with self.lock:
            if slot.key is None:  # reclaimed meanwhile
                return False
            if slot.key == new:
                return True
            if self.by_caller.get(new, 0) >= self.per_caller and not self._reclaim(new, spare=slot):
                self.refused += 1
                return False
            self.by_caller[new] = self.by_caller.get(new, 0) + 1
            self._drop(slot.key)
            slot.key = new
            return True

    def leave(self, slot: Slot) -> None:
        with self.lock:
            if slot.key is None:  # its slot was reclaimed and already given back
                return
            self._forget(slot)

    def _forget(self, slot: Slot) -> None:
        self._drop(slot.key)  # type: ignore[arg-type]
        slot.key = None
        self.used = max(0, self.used - 1)
        self.held.remove(slot)

    def _reclaim(self, key: str | None, spare: Slot | None = None) -> bool:
        """Cut off the longest-idle silent push under ``key`` (any key: None); True if one was (caller holds the lock)."""
        silent = [s for s in self.held if s is not spare and s.stream is not None and s.stream.silent
                  and (key is None or s.key == key)]
        if not silent:
            return False
        victim = min(silent, key=lambda s: s.stream.last_at)  # type: ignore[union-attr]
        self._forget(victim)
        self.reclaimed += 1
        victim.stream.reclaim("stream reclaimed: it sent no payload data while an admitted stream needed its slot")  # type: ignore[union-attr]
        return True

    def _drop(self, key: str) -> None:
        n = self.by_caller.get(key, 0) - 1
        if n > 0:
            self.by_caller[key] = n
        else:
            self.by_caller.pop(key, None)


__all__ = ["BoundedStream", "Slot", "StreamReclaimed", "StreamSlots", "StreamTimeout"]
