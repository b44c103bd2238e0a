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
import random
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import grpc

from dimat.transport.base import DataLossError, StateDict, TransportError
from dimat.transport.checks import StateRejected
from dimat.transport.grpc.codec import decode_chunk, header_entries, stream_messages
from dimat.transport.grpc.proto import REFUSED_METADATA, RETRYABLE, SERVICE_NAME, pb2, pb2_grpc
from dimat.transport.grpc.streams import BoundedStream, Slot, StreamReclaimed, StreamSlots, StreamTimeout
from dimat.transport.wire import IncomingPayload, TransferAborted

if TYPE_CHECKING:
    from dimat.transport.grpc.transport import GrpcTransport

log = logging.getLogger("dimat.transport.grpc")

#: refusals logged per second at most; the rest are counted (every one is kept in ``transport.errors``)
LOG_PER_SECOND = 10


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
    """Verified and refused states per (round, sender), plus the transfers still being assembled.

    Exactly one push commits per (round, sender): the first complete, verified one. Transfers of
    one key are assembled side by side (none can cut another off; a stream's slot already bounds
    how many there are, and a transfer allocates nothing before its first payload byte); when one
    commits, the others are aborted and told ``ALREADY_EXISTS``. ``committed`` remembers the key
    after the exchange took its state out of ``states``, so a later push for it (a slow duplicate,
    a replay) gets ``ALREADY_EXISTS`` too and never reaches the inbox.
    """

    cv: threading.Condition = field(default_factory=threading.Condition)
    states: dict[tuple[int, int], StateDict] = field(default_factory=dict)
    #: (round, sender) -> the reason its push was refused (a receive check's wording); a later
    #: valid push for the same key replaces it
    refused: dict[tuple[int, int], str] = field(default_factory=dict)
    #: (round, sender) -> transfer id -> the transfer being assembled
    pending: dict[tuple[int, int], dict[int, IncomingPayload]] = field(default_factory=dict)
    committed: set[tuple[int, int]] = field(default_factory=set)

    def drop_before(self, round_idx: int) -> None:
        """Forget everything of rounds older than ``round_idx`` (caller holds ``cv``)."""
        for key in [k for k in self.states if k[0] < round_idx]:
            del self.states[key]
        for key in [k for k in self.refused if k[0] < round_idx]:
            del self.refused[key]
        for key in [k for k in self.pending if k[0] < round_idx]:
            for payload in self.pending.pop(key).values():
                payload.abort()
        # older rounds' pushes are refused as stale at admission, so their commits need no memory
        self.committed = {k for k in self.committed if k[0] >= round_idx}

    def claim(self, key: tuple[int, int], transfer_id: int,
              make: Callable[[], IncomingPayload]) -> tuple[IncomingPayload | None, bool]:
        """The transfer a stream of ``key`` belongs to and whether it joined an existing one.

        The pending transfer with ``transfer_id``, else a new one from ``make`` (which checks the
        header and may raise); ``(None, False)`` once ``key`` committed. Caller holds ``cv``.
        """
        if key in self.committed:
            return None, False
        transfers = self.pending.get(key, {})
        if transfer_id in transfers:
            return transfers[transfer_id], True
        payload = make()
        self.pending.setdefault(key, {})[transfer_id] = payload
        return payload, False

    def commit(self, key: tuple[int, int], payload: IncomingPayload, state: StateDict) -> bool:
        """Make ``state`` the one state of ``key``; False when another transfer committed first (or the
        round was left). The other transfers of ``key`` are aborted. Caller holds ``cv``."""
        transfers = self.pending.get(key, {})
        if key in self.committed or payload not in transfers.values():
            return False
        for other in self.pending.pop(key).values():
            if other is not payload:
                other.abort()
        self.refused.pop(key, None)
        self.states[key] = state
        self.committed.add(key)
        self.cv.notify_all()
        return True

    def fail(self, key: tuple[int, int], payload: IncomingPayload | None, reason: str | None) -> None:
        """``payload`` (a transfer of ``key``, or None for a stream refused at its header) failed: forget
        it and, given a ``reason`` (a verdict on the state, not a stall), record the refusal unless
        ``key`` committed or another transfer of it is still under way. Caller holds ``cv``."""
        transfers = self.pending.get(key, {})
        for tid in [tid for tid, p in transfers.items() if p is payload]:
            del transfers[tid]
        if not transfers:
            self.pending.pop(key, None)
        if reason is not None and key not in self.committed and not transfers:
            self.refused[key] = reason
            self.cv.notify_all()


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

    def open_stream(self, context, what: str) -> Slot:
        """Take a stream slot for the caller (or abort ``RESOURCE_EXHAUSTED``)."""
        slot = self.t.slots.enter(self.caller_key(context))
        if slot is None:
            self.reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"peer {self.t.peer_id}: {what}: too many concurrent streams "
                        f"(at most {self.t.slots.total}, {self.t.slots.per_caller} per caller); retry")
        return slot  # type: ignore[return-value]

    def bounded(self, request_iterator) -> BoundedStream:
        t = self.t
        return BoundedStream(request_iterator, idle=t.stream_idle_timeout, total=t.deadline + 1.0,
                             depth=max(1, t.prefetch))

    # ---- weights ----
    def PushWeights(self, request_iterator, context):  # noqa: N802 (generated service API)
        slot = self.open_stream(context, "push")  # counted by connection, then by sender
        stream = self.bounded(request_iterator)  # after the slot: a refused flood starts no reader threads
        slot.stream = stream  # reclaimable from here on, while it sends nothing
        try:
            return self._push(stream, context, slot)
        finally:
            stream.close()
            self.t.slots.leave(slot)

    def _push(self, stream: BoundedStream, context, slot: Slot):
        t = self.t
        try:
            first = stream.next()
        except StreamReclaimed as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"peer {t.peer_id}: push before its header: {exc}; retry")
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
        if not t.slots.rekey(slot, f"sender:{sender}"):
            self.reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{where}: too many concurrent streams from peer {sender} (at most {t.slots.per_caller}); retry")
        return self._receive(stream, context, first, round_idx, sender, key, where)

    def _receive(self, stream: BoundedStream, context, first, round_idx: int, sender: int, key, where: str):
        t = self.t
        inbox = t.inbox
        h = first.header
        payload = None

        def new_payload() -> IncomingPayload:
            return IncomingPayload(header_entries(h), h.total_bytes, h.hash_algorithm, h.num_streams, t.schema,
                                   allow_half=t.accept_half, max_total_bytes=t.max_payload_bytes, label=where)

        try:
            with inbox.cv:  # the round and the schema change together under cv (GrpcTransport.begin_round)
                try:
                    got, joining = inbox.claim(key, h.transfer_id, new_payload)
                except StateRejected as exc:
                    if round_idx <= t.current_round:
                        raise
                    # a round the receiver has not entered: its model for that round is not known yet
                    # (the schema may change between rounds), so this is no verdict; the sender retries
                    context.abort(grpc.StatusCode.UNAVAILABLE,
                                  f"{where}: does not fit the receiver's model of round {t.current_round} "
                                  f"({exc.reason}); retry once it enters round {round_idx}")
                if got is None:
                    context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{where}: already received")
                # a stream that joins a transfer with a bad table or segment is refused alone: it does
                # not fail the transfer it names (whose other streams may be fine)
                payload = None if joining else got
                if not got.same_table(header_entries(h), h.total_bytes, max(1, h.num_streams)):
                    raise TransportError(f"{where}: stream {h.stream_index} announces a different tensor table",
                                         reason=f"stream {h.stream_index} announces a different tensor table")
                got.open_stream(h.stream_index, *segment_of(h))
                payload = got
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
            done = payload.close_stream(h.stream_index, digest)
            if done:
                state = payload.finalize()
                with inbox.cv:
                    committed = inbox.commit(key, payload, state)
                if not committed:  # another push of this key committed first (it stays), or the round was left
                    raise TransferAborted(f"{where}: not the first complete push", reason="not the first complete push")
            a, b = segment_of(h)
            return pb2.PushReply(round=round_idx, sender=t.peer_id, bytes_received=b - a, complete=done)
        except TransferAborted:
            # another transfer of this key committed first (or its round was left): never a refusal
            with inbox.cv:
                inbox.fail(key, payload, None)
                committed = key in inbox.committed
            if committed:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{where}: already received")
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{where}: dropped (the receiver left round {round_idx})")
        except TransportError as exc:
            timed_out = isinstance(exc, StreamTimeout)
            with inbox.cv:
                # the receiving exchange reports a refusal and stops waiting; a stall is not a verdict
                # on the state (the sender may retry), so it is only logged
                inbox.fail(key, payload, None if timed_out else exc.reason)
            if payload is not None:
                payload.abort()
            if isinstance(exc, StreamReclaimed):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{where}: {exc}; retry")
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
        slot = self.open_stream(context, f"fetch from peer {request.sender}")
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
            t.slots.leave(slot)

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
