"""Server side of a gRPC peer: the ``dimat.v1.Peer`` servicer and the inbox it fills.

A push is admitted (certificate identity, allowed sender, round window) before anything is
allocated, then assembled by :class:`~dimat.transport.wire.IncomingPayload`, which applies the
shared receive checks (:mod:`dimat.transport.checks`) per entry and per chunk. A verified state
lands in the :class:`Inbox`; a state refused by a check is recorded there too, with the reason, so
the receiving exchange can report it and stop waiting for that sender.
"""
from __future__ import annotations

import logging
import random
import threading
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


def _prefetch(it: Iterator, depth: int) -> Iterator:
    """Iterate ``it`` on a helper thread, at most ``depth`` items ahead.

    gRPC reads the next message only when asked; pulling on another thread overlaps receiving the
    next chunk with copying and hashing this one (bounded: ``depth`` chunks of memory).
    """
    if depth <= 0:
        yield from it
        return
    import queue

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def pump() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as exc:  # re-raised in the consumer
            q.put(exc)

    th = threading.Thread(target=pump, name="dimat-prefetch", daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()



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

    # ---- admission ----
    def admit(self, round_idx: int, sender: int, context, for_fetch: bool = False):
        """``(None, None)`` if the call may proceed, else ``(status, reason)``."""
        t = self.t
        if t.require_cert_identity:
            names = [n.decode() for n in context.auth_context().get("x509_common_name", [])]
            if f"peer-{sender}" not in names:
                return grpc.StatusCode.PERMISSION_DENIED, f"sender id {sender} does not match the client certificate {names}"
        if for_fetch:  # joins and state fetches come from any authenticated peer (a new one too)
            return None, None
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
            log.warning("%s", msg)
        context.abort(code, msg)

    # ---- weights ----
    def PushWeights(self, request_iterator, context):  # noqa: N802 (generated service API)
        t = self.t
        inbox = t.inbox
        first = next(request_iterator, None)
        if first is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty PushWeights stream")
        round_idx, sender = int(first.round), int(first.sender)
        key = (round_idx, sender)
        where = f"peer {t.peer_id}: push from peer {sender} for round {round_idx}"
        if first.WhichOneof("body") != "header":
            self.reject(context, grpc.StatusCode.INVALID_ARGUMENT, f"{where}: first message is not a header")
        code, why = self.admit(round_idx, sender, context)
        if code is not None:
            self.reject(context, code, f"{where}: {why}")
        h = first.header
        payload = None
        try:
            with inbox.cv:
                if key in inbox.states:
                    context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{where}: already received")
                cur = inbox.pending.get(key)
                if cur is not None and cur[0] == h.transfer_id:
                    payload = cur[1]
                    if not payload.same_table(header_entries(h), h.total_bytes, h.num_streams):
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
                payload.open_stream(h.stream_index, h.segment_start, h.segment_end)
            digest = None
            for msg in _prefetch(request_iterator, t.prefetch):
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
            return pb2.PushReply(round=round_idx, sender=t.peer_id, bytes_received=h.segment_end - h.segment_start,
                                 complete=done)
        except TransportError as exc:
            with inbox.cv:
                cur = inbox.pending.get(key)
                if cur is not None and cur[1] is payload:
                    del inbox.pending[key]
                if key not in inbox.states:  # the receiving exchange reports it and stops waiting
                    inbox.refused[key] = refusal_message(sender, round_idx, exc.reason)
                    inbox.cv.notify_all()
            if payload is not None:
                payload.abort()
            code = grpc.StatusCode.DATA_LOSS if isinstance(exc, DataLossError) else grpc.StatusCode.INVALID_ARGUMENT
            if isinstance(exc, StateRejected):  # delivered, then refused: the sender counts the bytes as sent
                context.set_trailing_metadata(((REFUSED_METADATA, "1"),))
            self.reject(context, code, str(exc))

    def FetchState(self, request, context):  # noqa: N802
        t = self.t
        code, why = self.admit(int(request.round), int(request.sender), context, for_fetch=True)
        if code is not None:
            self.reject(context, code, f"peer {t.peer_id}: fetch from peer {request.sender}: {why}")
        latest = t.latest
        if latest is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"peer {t.peer_id} has no state yet")
        round_idx, payload = latest
        yield from stream_messages(payload, round_idx, t.peer_id, transfer_id=random.getrandbits(63),
                                   chunk_bytes=t.chunk_bytes)

    # ---- membership ----
    def Join(self, request, context):  # noqa: N802
        t = self.t
        code, why = self.admit(int(request.round), int(request.sender), context, for_fetch=True)
        if code is not None:
            self.reject(context, code, f"peer {t.peer_id}: join from peer {request.sender}: {why}")
        t.membership.seen(int(request.sender), int(request.round), request.address or None)
        return pb2.JoinReply(round=max(t.current_round, 0), sender=t.peer_id, members=t.membership.member_msgs())

    def Leave(self, request, context):  # noqa: N802
        t = self.t
        t.membership.left(int(request.sender))
        return pb2.LeaveReply(round=max(t.current_round, 0), sender=t.peer_id)

    def Heartbeat(self, request, context):  # noqa: N802
        t = self.t
        t.membership.seen(int(request.sender), int(request.round), None)
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
