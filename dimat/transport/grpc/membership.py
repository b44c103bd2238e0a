"""Who is out there: the members a peer has heard of, and liveness by heartbeats.

A peer that misses ``max_missed_heartbeats`` heartbeats in a row is *down*: the exchange neither
pushes to it nor waits for it, until a heartbeat succeeds again (it came back).

Members are the ids of the peers file (the ``peers`` map the transport was built with): a Join or
Heartbeat from any other id is refused (``PERMISSION_DENIED``) and stored nowhere, unless an
admission rule (:attr:`Membership.admission`, ``id -> bool``) lets it in; even then the table holds
at most :data:`MAX_MEMBERS` entries.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import grpc

from dimat.transport.base import TransportError
from dimat.transport.grpc.proto import pb2

if TYPE_CHECKING:
    from dimat.transport.grpc.transport import GrpcTransport

log = logging.getLogger("dimat.transport.grpc")

#: the most members one peer tracks when an admission rule lets in ids beyond the peers file
MAX_MEMBERS = 4096


@dataclass
class Member:
    """What this peer knows of another one."""

    address: str
    round: int  # the latest round it reported (heartbeat, join)
    alive: bool  # False after it said goodbye (Leave)
    last_seen: float  # time.monotonic() of its latest message


class Membership:
    """Members heard of and heartbeat liveness of the other peers of one :class:`GrpcTransport`."""

    def __init__(self, transport: "GrpcTransport", heartbeat_interval: float | None, max_missed_heartbeats: int) -> None:
        self.t = transport
        self.heartbeat_interval = heartbeat_interval
        self.max_missed_heartbeats = max(1, int(max_missed_heartbeats))
        self.members: dict[int, Member] = {}
        #: optional rule ``id -> bool`` for ids outside the peers file (None: nobody else)
        self.admission: Callable[[int], bool] | None = None
        self.lock = threading.Lock()
        self.missed: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def admits(self, peer: int) -> bool:
        """Whether ``peer`` may be a member: in the peers map the owner gave (constructor, ``set_peers``:
        the peers file), or let in by the admission rule."""
        if peer in self.t.peers:
            return True
        return self.admission is not None and bool(self.admission(peer))

    def seen(self, peer: int, round_idx: int, address: str | None) -> None:
        """``peer`` spoke to us (join, heartbeat) from ``round_idx``; ``address`` if it told one."""
        if not self.admits(peer):
            return
        with self.lock:
            m = self.members.get(peer)
            if m is None:
                if len(self.members) >= MAX_MEMBERS:
                    log.warning("peer %s: member table full (%d); ignoring peer %s", self.t.peer_id, MAX_MEMBERS, peer)
                    return
                m = self.members[peer] = Member(self.t.peers.get(peer, ""), round_idx, True, time.monotonic())
            m.round, m.alive, m.last_seen = round_idx, True, time.monotonic()
            if address:
                m.address = address
        if address:
            self.t.set_peers({peer: address})

    def left(self, peer: int) -> None:
        with self.lock:
            m = self.members.get(peer)
            if m is not None:
                m.alive = False

    def member_msgs(self) -> list:
        """Every peer this one knows, itself first, as ``Member`` messages for a join reply."""
        t = self.t
        with self.lock:
            known = dict(self.members)
        out = [pb2.Member(id=t.peer_id, address=t.address, round=max(t.current_round, 0), alive=True)]
        for pid, addr in sorted(t.peers.items()):
            if pid == t.peer_id:
                continue
            m = known.get(pid)
            out.append(pb2.Member(id=pid, address=(m.address if m else "") or addr,
                                  round=m.round if m else 0, alive=m.alive if m else True))
        return out

    def is_up(self, peer: int) -> bool:
        return self.missed.get(peer, 0) < self.max_missed_heartbeats

    def known_round(self, peer: int) -> int:
        with self.lock:
            m = self.members.get(peer)
            return -1 if m is None else int(m.round)

    # -- heartbeats --
    def start(self, interval: float | None = None) -> None:
        if interval is not None:
            self.heartbeat_interval = interval
        if not self.heartbeat_interval or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name=f"dimat-hb-{self.t.peer_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        t = self.t
        interval = float(self.heartbeat_interval or 1.0)
        while not self._stop.wait(interval):
            for pid in [p for p in list(t.peers) if p != t.peer_id]:
                if self._stop.is_set():
                    return
                try:
                    their_round = t.client.heartbeat(pid, max(t.current_round, 0), max(2 * interval, 1.0), retries=False)
                except (grpc.RpcError, TransportError, ValueError):
                    was_up = self.is_up(pid)
                    self.missed[pid] = self.missed.get(pid, 0) + 1
                    if was_up and not self.is_up(pid):
                        log.warning("peer %s: peer %s is down (%d missed heartbeats)", t.peer_id, pid, self.missed[pid])
                        with t.inbox.cv:
                            t.inbox.cv.notify_all()  # a receive waiting for it can stop waiting
                    continue
                if not self.is_up(pid):
                    log.warning("peer %s: peer %s is back (round %s)", t.peer_id, pid, their_round)
                self.missed[pid] = 0
                with self.lock:
                    m = self.members.get(pid)
                    if m is None:
                        m = self.members[pid] = Member(t.peers.get(pid, ""), their_round, True, time.monotonic())
                    m.round, m.alive, m.last_seen = their_round, True, time.monotonic()
