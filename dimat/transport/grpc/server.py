"""Server side of a gRPC peer: the ``dimat.v1.Peer`` servicer and the inbox it fills.

A push is admitted (certificate identity, allowed sender, round window) before anything is
allocated, then assembled by :class:`~dimat.transport.wire.IncomingPayload`, which applies the
shared receive checks (:mod:`dimat.transport.checks`) per entry and per chunk. A verified state
lands in the :class:`Inbox`; a state refused by a check is recorded there too, with the reason, so
the receiving exchange can report it and stop waiting for that sender.

Every RPC is bounded (docs/grpc.md, "Threat model"): a streaming RPC takes a slot of
:class:`StreamSlots` (a global cap below the server's ``maximum_concurrent_rpcs``, so unary RPCs,
health checks and heartbeats always find a worker, and a cap per caller: its certificate identity
under mTLS, else its connection before the header and its sender id after it) and is read through
:class:`BoundedStream`, which aborts it with ``DEADLINE_EXCEEDED`` when the next message does not
come within the idle timeout or the stream outlives the total one. Heartbeat, Leave and Join are
bound to the caller's identity like pushes, and only ids of the peers file are members.
"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import grpc

from dimat.transport.base import DataLossError, StateDict, TransportError
from dimat.transport.checks import StateRejected, refusal_message
from dimat.transport.grpc.codec import decode_chunk, header_entries, stream_messages
from dimat.transport.grpc.proto import REFUSED_METADATA, RETRYABLE, SERVICE_NAME, pb2, pb2_grpc
from dimat.transport.wire import IncomingPayload

if TYPE_CHECKING:
    from dimat.transport.grpc.transport import GrpcTransport

log = logging.getLogger("dimat.transport.grpc")

_END = object()
#: refusals logged per second at most; the rest are counted (every one is kept in ``transport.errors``)
LOG_PER_SECOND = 10


class StreamTimeout(TransportError):
    """A stream stalled (no message within the idle timeout) or outlived its total bound."""


class BoundedStream:
    """A request iterator read on a helper thread, at most ``depth`` messages ahead, with time bounds.

    gRPC reads the next message only when asked; pulling on another thread overlaps receiving the
    next chunk with copying and hashing this one (bounded: ``depth`` chunks of memory) and lets the
    servicer stop waiting: :meth:`next` raises :class:`StreamTimeout` when no message came within
    ``idle`` seconds (the first one included) or the stream is older than ``total`` seconds. The
    servicer then aborts the RPC, which ends the helper's blocked read. Time the servicer spends on a
    message itself is not idle time.
    """

    def __init__(self, it: Iterator, *, idle: float, total: float, depth: int = 2) -> None:
        self.idle, self.end = float(idle), time.monotonic() + float(total)
        self.total = float(total)
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._it = it
        self._thread = threading.Thread(target=self._pump, name="dimat-stream", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            for item in self._it:
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


class StreamSlots:
    """Admission of streaming RPCs: at most ``total`` at once, at most ``per_caller`` per caller key.

    A push enters under its connection (or certificate) key, and once its header names the sender
    moves to that sender's key (:meth:`rekey`): the connection cap bounds streams that have not said
    who they are, the sender cap those that have. The table holds one counter per key with a stream
    open, so it never exceeds ``total`` keys. ``refused`` counts the streams turned away
    (``RESOURCE_EXHAUSTED``; an honest sender retries with backoff).
    """

    def __init__(self, total: int, per_caller: int) -> None:
        self.total, self.per_caller = int(total), int(per_caller)
        self.lock = threading.Lock()
        self.used = 0
        self.by_caller: dict[str, int] = {}
        self.refused = 0

    def enter(self, key: str) -> bool:
        with self.lock:
            n = self.by_caller.get(key, 0)
            if n >= self.per_caller or self.used >= self.total:
                self.refused += 1
                return False
            self.by_caller[key] = n + 1
            self.used += 1
            return True

    def rekey(self, old: str, new: str) -> bool:
        """Move one stream from ``old`` to ``new`` (False, nothing moved, when ``new`` is full)."""
        with self.lock:
            if old == new:
                return True
            n = self.by_caller.get(new, 0)
            if n >= self.per_caller:
                self.refused += 1
                return False
            self.by_caller[new] = n + 1
            self._drop(old)
            return True

    def leave(self, key: str) -> None:
        with self.lock:
            self._drop(key)
            self.used = max(0, self.used - 1)

    def _drop(self, key: str) -> None:
        n = self.by_caller.get(key, 0) - 1
        if n > 0:
            self.by_caller[key] = n
        else:
            self.by_caller.pop(key, None)


def segment_of(header) -> tuple[int, int]:
    """A header's segment; proto3 defaults (peer.proto): a single stream with no segment carries it all."""
    if (header.num_streams or 1) == 1 and header.segment_start == 0 and header.segment_end == 0:
        return 0, int(header.total_bytes)
    return int(header.segment_start), int(header.segment_end)


def cert_names(context) -> list[str]:
    """The common names of the client certificate (empty without mutual TLS)."""
    try:
        return [n.decode() for n in (context.auth_context() or {}).get("x509_common_name", [])]
    except (AttributeError, ValueError):
        return []


@dataclass
class Inbox:
    """Verified and refused states per (round, sender), plus the transfers still being assembled."""

    cv: threading.Condition = field(default_factory=threading.Condition)
    states: dict[tuple[int, int], StateDict] = field(default_factory=dict)
    #: (round, sender) -> refusal line (:func:`~dimat.transport.checks.refusal_message`); a later
    #: valid push for the same key replaces it
    refused: dict[tuple[int, int], str] = field(default_factory=dict)
    pending: dict[tuple[int, int], tuple[int, IncomingPayload]] = field(default_factory=dict)

    def drop_before(self, round_idx: int) -> None:
        """Forget everything of rounds older than ``round_idx`` (caller holds ``cv``)."""
        for key in [k for k in self.states if k[0] < round_idx]:
            del self.states[key]
        for key in [k for k in self.refused if k[0] < round_idx]:
            del self.refused[key]
        for key in [k for k in self.pending if k[0] < round_idx]:
            self.pending.pop(key)[1].abort()


class Servicer(pb2_grpc.PeerServicer):
    """Serves one :class:`GrpcTransport`'s peer: weights in (push), latest state out (fetch), membership."""

    def __init__(self, transport: "GrpcTransport"):
        self.t = transport
        self._log_lock = threading.Lock()
        self._log_window, self._logged, self._suppressed = 0.0, 0, 0

    # ---- admission ----
    def identify(self, sender: int, context, *, member: bool = True):
        """``(None, None)`` if the caller may speak for ``sender``, else ``(status, reason)``.

        Under mutual TLS with ``require_cert_identity`` the client certificate must name
        ``peer-<sender>``; otherwise the token (checked by the interceptor) is the identity. With
        ``member`` the sender id must also be one of the peers file (or pass the membership's
        admission rule); pushes check the stricter allowed senders instead.
        """
        t = self.t
        if t.require_cert_identity:
            names = cert_names(context)
            if f"peer-{sender}" not in names:
                return grpc.StatusCode.PERMISSION_DENIED, f"sender id {sender} does not match the client certificate {names}"
        if member and not t.membership.admits(sender):
            return grpc.StatusCode.PERMISSION_DENIED, f"peer {sender} is not in the peers file"
        return None, None

    def admit(self, round_idx: int, sender: int, context, for_fetch: bool = False):
        """``(None, None)`` if the call may proceed, else ``(status, reason)``."""
        t = self.t
        code, why = self.identify(sender, context, member=for_fetch)
        if code is not None or for_fetch:  # state fetches come from any member (a restarted one too)
            return code, why
        allowed = t.allowed_senders(round_idx)
        if sender not in allowed:
            return grpc.StatusCode.PERMISSION_DENIED, f"unknown sender {sender} (accepted: {sorted(allowed)})"
        if t.schema is None:
            return grpc.StatusCode.UNAVAILABLE, "receiver not ready (no model schema yet); retry"
        if round_idx < t.current_round:
            return grpc.StatusCode.FAILED_PRECONDITION, f"stale round (receiver is at round {t.current_round})"
        if round_idx > t.current_round + t.max_rounds_ahead:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, f"too far ahead (receiver is at round {t.current_round}); retry"
        return None, None

    def reject(self, context, code: grpc.StatusCode, msg: str) -> None:
        if code not in RETRYABLE:
            self.t.errors.append(msg)
            self._log(msg)
        context.abort(code, msg)

    def _log(self, msg: str) -> None:
        """Log a refusal, at most :data:`LOG_PER_SECOND` a second (a flood must not fill the disk)."""
        now = time.monotonic()
        with self._log_lock:
            if now - self._log_window >= 1.0:
                if self._suppressed:
                    log.warning("peer %s: %d more refusals in the last second not logged", self.t.peer_id, self._suppressed)
                self._log_window, self._logged, self._suppressed = now, 0, 0
            if self._logged >= LOG_PER_SECOND:
                self._suppressed += 1
                return
            self._logged += 1
        log.warning("%s", msg)

    def caller_key(self, context) -> str:
        """Who holds a stream before its first message: the certificate identity, else the connection."""
        if self.t.require_cert_identity:
            names = cert_names(context)
            if names:
                return f"cert:{names[0]}"
        return f"conn:{context.peer()}"

    def open_stream(self, context, what: str) -> str:
        """Take a stream slot for the caller (or abort ``RESOURCE_EXHAUSTED``); returns its key."""
        key = self.caller_key(context)
        if not self.t.slots.enter(key):
            self.reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"peer {self.t.peer_id}: {what}: too many concurrent streams "
                        f"(at most {self.t.slots.total}, {self.t.slots.per_caller} per caller); retry")
        return key

    def bounded(self, request_iterator) -> BoundedStream:
        t = self.t
        return BoundedStream(request_iterator, idle=t.stream_idle_timeout, total=t.deadline + 1.0,
                             depth=max(1, t.prefetch))

    # ---- weights ----
    def PushWeights(self, request_iterator, context):  # noqa: N802 (generated service API)
        held = [self.open_stream(context, "push")]  # the slot's key: the connection, then the sender
        stream = self.bounded(request_iterator)
        try:
            return self._push(stream, context, held)
        finally:
            stream.close()
            self.t.slots.leave(held[0])

    def _push(self, stream: BoundedStream, context, held: list[str]):
        t = self.t
        try:
            first = stream.next()
        except StreamTimeout as exc:
            self.reject(context, grpc.StatusCode.DEADLINE_EXCEEDED, f"peer {t.peer_id}: push before its header: {exc}")
        if first is None:
            self.reject(context, grpc.StatusCode.INVALID_ARGUMENT, f"peer {t.peer_id}: empty PushWeights stream")
        round_idx, sender = int(first.round), int(first.sender)
        key = (round_idx, sender)
        where = f"peer {t.peer_id}: push from peer {sender} for round {round_idx}"
        if first.WhichOneof("body") != "header":
            self.reject(context, grpc.StatusCode.INVALID_ARGUMENT, f"{where}: first message is not a header")
        code, why = self.admit(round_idx, sender, context)
        if code is not None:
            self.reject(context, code, f"{where}: {why}")
        sender_key = f"sender:{sender}"
        if not t.slots.rekey(held[0], sender_key):
            self.reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{where}: too many concurrent streams from peer {sender} (at most {t.slots.per_caller}); retry")
        held[0] = sender_key
        return self._receive(stream, context, first, round_idx, sender, key, where)

    def _receive(self, stream: BoundedStream, context, first, round_idx: int, sender: int, key, where: str):
        t = self.t
        inbox = t.inbox
        h = first.header
        payload = None
        try:
            with inbox.cv:
                if key in inbox.states:
                    context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{where}: already received")
                cur = inbox.pending.get(key)
                if cur is not None and cur[0] == h.transfer_id:
                    payload = cur[1]
                    if not payload.same_table(header_entries(h), h.total_bytes, max(1, h.num_streams)):
                        raise TransportError(f"{where}: stream {h.stream_index} announces a different tensor table",
                                             reason=f"stream {h.stream_index} announces a different tensor table")
                else:
                    if cur is not None:  # a retry supersedes a broken earlier transfer
                        cur[1].abort()
                    payload = IncomingPayload(
                        header_entries(h), h.total_bytes, h.hash_algorithm, h.num_streams, t.schema,
                        allow_half=t.accept_half, max_total_bytes=t.max_payload_bytes, label=where,
                    )
                    inbox.pending[key] = (h.transfer_id, payload)
                payload.open_stream(h.stream_index, *segment_of(h))
            digest = None
            for msg in stream:
                if msg.round != round_idx or msg.sender != sender:
                    problem = f"message for round {msg.round} from peer {msg.sender} inside the stream"
                    raise TransportError(f"{where}: {problem}", reason=problem)
                kind = msg.WhichOneof("body")
                if kind == "data":
                    if digest is not None:
                        raise TransportError(f"{where}: data after the trailer", reason="data after the trailer")
                    payload.write(h.stream_index, msg.data.offset, msg.data.data)
                elif kind == "trailer":
                    digest = msg.trailer.digest
                else:
                    raise TransportError(f"{where}: unexpected {kind} message inside the stream",
                                         reason=f"unexpected {kind} message inside the stream")
            payload.close_stream(h.stream_index, digest)
            done = payload.complete
            if done:
                state = payload.finalize()
                with inbox.cv:
                    inbox.pending.pop(key, None)
                    inbox.refused.pop(key, None)
                    inbox.states[key] = state
                    inbox.cv.notify_all()
            a, b = segment_of(h)
            return pb2.PushReply(round=round_idx, sender=t.peer_id, bytes_received=b - a,
                                 complete=done)
        except TransportError as exc:
            timed_out = isinstance(exc, StreamTimeout)
            with inbox.cv:
                cur = inbox.pending.get(key)
                if cur is not None and cur[1] is payload:
                    del inbox.pending[key]
                # the receiving exchange reports it and stops waiting; a stall is not a verdict on the
                # state (the sender may retry), so it is only logged
                if key not in inbox.states and not timed_out:
                    inbox.refused[key] = refusal_message(sender, round_idx, exc.reason)
                    inbox.cv.notify_all()
            if payload is not None:
                payload.abort()
            if timed_out:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            else:
                code = grpc.StatusCode.DATA_LOSS if isinstance(exc, DataLossError) else grpc.StatusCode.INVALID_ARGUMENT
            if isinstance(exc, StateRejected):  # delivered, then refused: the sender counts the bytes as sent
                context.set_trailing_metadata(((REFUSED_METADATA, "1"),))
            self.reject(context, code, f"{where}: {exc}" if timed_out else str(exc))

    def FetchState(self, request, context):  # noqa: N802
        t = self.t
        code, why = self.admit(int(request.round), int(request.sender), context, for_fetch=True)
        if code is not None:
            self.reject(context, code, f"peer {t.peer_id}: fetch from peer {request.sender}: {why}")
        latest = t.latest
        if latest is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"peer {t.peer_id} has no state yet")
        key = self.open_stream(context, f"fetch from peer {request.sender}")
        # a reader that stops reading blocks the writes: cancel the call at the total bound
        timer = threading.Timer(t.deadline + 1.0, context.cancel)
        timer.daemon = True
        timer.start()
        try:
            round_idx, payload = latest
            yield from stream_messages(payload, round_idx, t.peer_id, transfer_id=random.getrandbits(63),
                                       chunk_bytes=t.chunk_bytes)
        finally:
            timer.cancel()
            t.slots.leave(key)

    # ---- membership ----
    def _member_call(self, what: str, request, context) -> int:
        sender = int(request.sender)
        code, why = self.identify(sender, context)
        if code is not None:
            self.reject(context, code, f"peer {self.t.peer_id}: {what} from peer {sender}: {why}")
        return sender

    def Join(self, request, context):  # noqa: N802
        t = self.t
        sender = self._member_call("join", request, context)
        t.membership.seen(sender, int(request.round), request.address or None)
        return pb2.JoinReply(round=max(t.current_round, 0), sender=t.peer_id, members=t.membership.member_msgs())

    def Leave(self, request, context):  # noqa: N802
        t = self.t
        t.membership.left(self._member_call("leave", request, context))
        return pb2.LeaveReply(round=max(t.current_round, 0), sender=t.peer_id)

    def Heartbeat(self, request, context):  # noqa: N802
        t = self.t
        t.membership.seen(self._member_call("heartbeat", request, context), int(request.round), None)
        with t.inbox.cv:
            t.inbox.cv.notify_all()  # a receive may stop waiting for a peer now in a later round
        return pb2.HeartbeatReply(round=max(t.current_round, 0), sender=t.peer_id)


def service_handler(servicer: Servicer) -> grpc.GenericRpcHandler:
    """The Peer service's handlers (the generated ones, but PushWeights with :func:`decode_chunk`)."""
    u, s = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "PushWeights": grpc.stream_unary_rpc_method_handler(
            servicer.PushWeights, request_deserializer=decode_chunk, response_serializer=pb2.PushReply.SerializeToString),
        "FetchState": s(servicer.FetchState, request_deserializer=pb2.FetchRequest.FromString,
                        response_serializer=pb2.WeightChunk.SerializeToString),
        "Join": u(servicer.Join, request_deserializer=pb2.JoinRequest.FromString,
                  response_serializer=pb2.JoinReply.SerializeToString),
        "Leave": u(servicer.Leave, request_deserializer=pb2.LeaveRequest.FromString,
                   response_serializer=pb2.LeaveReply.SerializeToString),
        "Heartbeat": u(servicer.Heartbeat, request_deserializer=pb2.HeartbeatRequest.FromString,
                       response_serializer=pb2.HeartbeatReply.SerializeToString),
    })
