"""Client side of a gRPC peer: channels and stubs per address, retries, push, fetch, membership calls."""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dimat.transport.base import StateDict, TransportError
from dimat.transport.grpc.codec import header_entries, stream_messages
from dimat.transport.grpc.proto import REFUSED_METADATA, RETRYABLE, SERVICE_NAME, channel_options, pb2, pb2_grpc
from dimat.transport.schema import Schema
from dimat.transport.security import TlsConfig, token_metadata
from dimat.transport.wire import IncomingPayload, OutgoingPayload

log = logging.getLogger("dimat.transport.grpc")


#: seconds between looks at ``give_up`` while a push waits (a peer marked down stops it this soon)
POLL_S = 0.1

#: ``() -> reason or None``: why a call should stop now (its peer was marked down), else None
GiveUp = Callable[[], "str | None"]


class PushRefused(TransportError):
    """The receiver got the state and refused it by a receive check (delivered, not accepted)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of a call on a retryable status: exponential backoff with jitter, within the deadline."""

    retries: int
    backoff: float
    backoff_max: float


class PeerClient:
    """Dials the other peers of one local peer ``peer_id``.

    ``peers`` is the transport's live address book (shared, not copied), so an address updated by a
    join reaches the next call; a channel is opened once per address.
    """

    def __init__(self, peer_id: int, peers: dict[int, str], *, tls: TlsConfig | None, token: str | None,
                 retry: RetryPolicy, max_message_bytes: int, window_bytes: int | None,
                 chunk_bytes: int, num_streams: int) -> None:
        self.peer_id = peer_id
        self.peers = peers
        self.tls, self.token, self.retry = tls, token, retry
        self.max_message_bytes, self.window_bytes = max_message_bytes, window_bytes
        self.chunk_bytes, self.num_streams = chunk_bytes, num_streams
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, object] = {}
        self.lock = threading.Lock()
        #: peer -> pushes to it in progress (tests and diagnostics wait on it)
        self.pushing: dict[int, int] = {}

    def address(self, peer: int) -> str:
        addr = self.peers.get(peer)
        if addr is None:
            raise TransportError(f"peer {self.peer_id}: no address for peer {peer}")
        return addr

    def channel(self, peer: int) -> grpc.Channel:
        """The channel to ``peer`` (opened on first use with this peer's TLS settings)."""
        addr = self.address(peer)
        with self.lock:
            ch = self._channels.get(addr)
            if ch is None:
                opts = channel_options(self.max_message_bytes, self.window_bytes)
                if self.tls is not None:
                    ch = grpc.secure_channel(addr, self.tls.channel_credentials(), options=opts + self.tls.channel_options())
                else:
                    ch = grpc.insecure_channel(addr, options=opts)
                self._channels[addr] = ch
                self._stubs[addr] = pb2_grpc.PeerStub(ch)
            return ch

    def stub(self, peer: int):
        """The generated ``Peer`` stub for ``peer``."""
        self.channel(peer)
        with self.lock:
            return self._stubs[self.address(peer)]

    def close(self) -> None:
        with self.lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
            self._stubs.clear()

    def call_with_retries(self, peer: int, what: str, fn: Callable[[float], object], deadline: float, *,
                          bounded: bool = True, give_up: GiveUp | None = None):
        """Run ``fn(remaining_seconds)`` until success, a non-retryable status, or the deadline.

        Args:
            peer, what: who is called and what for (the error line names both).
            fn: one attempt, given the seconds left.
            deadline: seconds from now; retries (exponential backoff with jitter) never pass it.
            bounded: also stop after ``retry.retries`` retries (join, fetch, heartbeat). A push passes
                False: it is retried until it lands or its round's deadline passes, so a receiver
                whose slots are taken for a while (stalled streams) still gets it.
            give_up: called between attempts; a non-None reason (the peer went down) ends the call.
        """
        end = time.monotonic() + deadline
        delay = self.retry.backoff
        attempt = 0
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise TransportError(f"peer {self.peer_id}: {what} to peer {peer} missed its {deadline:.1f}s deadline")
            try:
                return fn(remaining)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                details = exc.details() if hasattr(exc, "details") else str(exc)
                if code == grpc.StatusCode.ALREADY_EXISTS:
                    return None  # an earlier attempt got through; its reply was lost
                retry = (code in RETRYABLE and (not bounded or attempt < self.retry.retries)
                         and end - time.monotonic() > delay)
                if not retry:
                    name = code.name if code is not None else "ERROR"
                    trailing = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
                    cls = PushRefused if trailing.get(REFUSED_METADATA) else TransportError
                    raise cls(f"peer {self.peer_id}: {what} to peer {peer} failed [{name}]: {details}") from None
            attempt += 1
            # full jitter around the backoff, so senders refused together do not come back together
            pause = min(delay * (0.5 + random.random()), max(0.0, end - time.monotonic()))
            stop = time.monotonic() + pause
            while True:
                why = give_up() if give_up is not None else None
                if why is not None:
                    raise TransportError(f"peer {self.peer_id}: {what} to peer {peer} abandoned: {why}")
                left = stop - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(left, POLL_S))
            delay = min(delay * 2, self.retry.backoff_max)

    def push(self, peer: int, round_idx: int, payload: OutgoingPayload, deadline: float, *,
             give_up: GiveUp | None = None) -> None:
        """Stream ``payload`` to ``peer`` for ``round_idx`` over parallel streams; raises TransportError.

        Retried until it lands or ``deadline`` passes; ``give_up`` (e.g. "the peer is marked down")
        is asked while an attempt waits and between attempts, and cancels the push.
        """
        self.channel(peer)
        push = self._channels[self.address(peer)].stream_unary(
            f"/{SERVICE_NAME}/PushWeights", request_serializer=None,  # pre-serialized (encode_data_chunk)
            response_deserializer=pb2.PushReply.FromString)
        md = token_metadata(self.token)
        n = max(1, min(self.num_streams, -(-payload.total_bytes // self.chunk_bytes) or 1))
        what = f"push of round {round_idx}"

        def attempt(remaining: float):
            tid = random.getrandbits(63)
            calls = [
                push.future(
                    stream_messages(payload, round_idx, self.peer_id, transfer_id=tid, stream_index=k,
                                    num_streams=n, chunk_bytes=self.chunk_bytes, serialized=True),
                    timeout=remaining, metadata=md, wait_for_ready=True)
                for k in range(n)
            ]
            try:
                out = []
                for c in calls:
                    while True:
                        try:
                            out.append(c.result(timeout=POLL_S))
                            break
                        except grpc.FutureTimeoutError:
                            why = give_up() if give_up is not None else None
                            if why is not None:  # wait_for_ready would hold a dead peer's push to the deadline
                                raise TransportError(f"peer {self.peer_id}: {what} to peer {peer} abandoned: {why}") from None
                return out
            except (grpc.RpcError, TransportError):
                for c in calls:
                    c.cancel()
                raise

        with self.lock:
            self.pushing[peer] = self.pushing.get(peer, 0) + 1
        try:
            self.call_with_retries(peer, what, attempt, deadline, bounded=False, give_up=give_up)
        finally:
            with self.lock:
                self.pushing[peer] -= 1
                if not self.pushing[peer]:
                    del self.pushing[peer]

    def fetch(self, peer: int, my_round: int, schema: Schema, *, accept_half: bool,
              max_payload_bytes: int | None, deadline: float) -> tuple[int, StateDict]:
        """Pull ``peer``'s latest state, checked like a push; returns ``(round, state)``."""
        stub = self.stub(peer)
        md = token_metadata(self.token)

        def attempt(remaining: float):
            it = stub.FetchState(pb2.FetchRequest(round=my_round, sender=self.peer_id),
                                 timeout=remaining, metadata=md, wait_for_ready=True)
            first = next(it, None)
            if first is None or first.WhichOneof("body") != "header":
                raise TransportError(f"peer {self.peer_id}: fetch from peer {peer}: reply does not start with a header")
            h = first.header
            where = f"peer {self.peer_id}: state fetched from peer {peer}"
            inc = IncomingPayload(header_entries(h), h.total_bytes, h.hash_algorithm, h.num_streams, schema,
                                  allow_half=accept_half, max_total_bytes=max_payload_bytes, label=where)
            try:
                inc.open_stream(h.stream_index, h.segment_start, h.segment_end)
                digest = None
                for msg in it:
                    if msg.WhichOneof("body") == "data":
                        inc.write(h.stream_index, msg.data.offset, msg.data.data)
                    elif msg.WhichOneof("body") == "trailer":
                        digest = msg.trailer.digest
                inc.close_stream(h.stream_index, digest)
                return int(first.round), inc.finalize()
            except BaseException:
                inc.abort()
                raise

        return self.call_with_retries(peer, "state fetch", attempt, deadline)

    def heartbeat(self, peer: int, my_round: int, timeout: float, *, retries: bool = True) -> int:
        """Ping ``peer``; returns its round. Without ``retries`` one attempt (the heartbeat loop's own pace)."""
        stub = self.stub(peer)
        req = pb2.HeartbeatRequest(round=my_round, sender=self.peer_id)
        md = token_metadata(self.token)
        if not retries:
            return int(stub.Heartbeat(req, timeout=timeout, metadata=md).round)
        reply = self.call_with_retries(peer, "heartbeat", lambda rem: stub.Heartbeat(req, timeout=rem, metadata=md), timeout)
        return int(reply.round)

    def join(self, peer: int, my_round: int, my_address: str, timeout: float) -> tuple[int, dict[int, str]]:
        stub = self.stub(peer)
        reply = self.call_with_retries(
            peer, "join",
            lambda rem: stub.Join(pb2.JoinRequest(round=my_round, sender=self.peer_id, address=my_address),
                                  timeout=rem, metadata=token_metadata(self.token), wait_for_ready=True), timeout)
        return int(reply.round), {int(m.id): m.address for m in reply.members}

    def leave(self, peers: Iterable[int], my_round: int, timeout: float) -> None:
        """Tell ``peers`` this peer is leaving (best effort: failures are logged, not raised)."""
        for p in peers:
            try:
                self.stub(p).Leave(pb2.LeaveRequest(round=my_round, sender=self.peer_id),
                                   timeout=timeout, metadata=token_metadata(self.token))
            except (grpc.RpcError, TransportError) as exc:
                log.info("peer %s: leave to peer %s failed: %s", self.peer_id, p, exc)

    def serving(self, peer: int, timeout: float) -> bool:
        """Whether ``peer`` answers the standard health check with SERVING within ``timeout`` (no token needed)."""
        try:
            rep = health_pb2_grpc.HealthStub(self.channel(peer)).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout, wait_for_ready=True)
        except grpc.RpcError:
            return False
        return rep.status == health_pb2.HealthCheckResponse.SERVING
