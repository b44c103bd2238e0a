"""gRPC transport: every peer process serves the ``dimat.v1.Peer`` service and dials its neighbours.

Push model: in ``exchange(r, ...)`` the local peer streams its state to each out-neighbour
(``PushWeights``, client streaming, optionally split over parallel streams) while its own server
receives the in-neighbours' pushes. Received states are buffered per ``(round, sender)`` so a
neighbour that runs a round ahead is kept until the local round loop asks for it. A push is accepted
only from an allowed sender (the topology's in-neighbours), only with the shared token (if set),
only for a round inside the buffering window, and only if it matches the receiver's own model
schema, hash and finiteness checks (see :mod:`dimat.transport.wire`); otherwise the RPC is aborted
with a status naming the problem, nothing is buffered, and the server keeps serving.

See docs/grpc.md for the protocol, the generated-code policy and tuning figures.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Iterator, Mapping, Sequence

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dimat.transport import protogen
from dimat.transport.base import StateDict, TransportError
from dimat.transport.security import TlsConfig, TokenAuthInterceptor, token_metadata
from dimat.transport.wire import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_HASH,
    IncomingPayload,
    OutgoingPayload,
    Schema,
    TensorEntry,
    segments,
)

pb2, pb2_grpc = protogen.load()
log = logging.getLogger(__name__)

SERVICE_NAME = "dimat.v1.Peer"
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})
#: wire failures (corrupt or incomplete data) vs. well-formed but unacceptable content
_DATA_LOSS_MARKERS = ("truncated", "hash mismatch", "without its trailer", "incomplete")

AllowedSenders = Callable[[int], Iterable[int]] | Collection[int] | None


MAX_FRAME_BYTES = (16 << 20) - 1  # the HTTP/2 maximum (2**24 - 1)


def channel_options(max_message_bytes: int, window_bytes: int | None = None) -> list[tuple[str, int]]:
    """Options for both servers and channels: message limits sized to our chunks, HTTP/2 windows.

    ``window_bytes`` fixes the per-stream flow-control window (BDP probing off), which bounds how much
    a receiver buffers per stream; ``None`` lets gRPC grow it by bandwidth-delay probing.
    """
    opts = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # a restarted neighbour must be reachable again within a heartbeat or two, not after gRPC's
        # default reconnect backoff (which grows to minutes)
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        # bulk transfers: gRPC's defaults (16 KiB HTTP/2 frames, 8 KiB initial TCP reads) cost a call
        # per few KiB; 4 MiB frames and large reads made a 256 MiB stream 1.2-1.4x faster on loopback
        # (bench/transport.py, "bare-grpc-tuned"), with no measurable change in receiver memory
        ("grpc.http2.max_frame_size", MAX_FRAME_BYTES),
        ("grpc.experimental.tcp_read_chunk_size", 4 << 20),
        ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
        ("grpc.experimental.tcp_max_read_chunk_size", 16 << 20),
    ]
    if window_bytes:
        opts += [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", window_bytes),
                 ("grpc.http2.write_buffer_size", window_bytes)]
    return opts


@dataclass
class ExchangeReport:
    """What happened in the last ``exchange``: who was missing and why (for metrics/logs)."""

    round: int
    received: list[int]
    missing: list[int]
    send_failed: dict[int, str]
    seconds: float


def _entries(header) -> list[TensorEntry]:
    return [TensorEntry(t.name, t.dtype, tuple(t.shape), t.offset, t.nbytes) for t in header.tensors]


def _header_msg(payload: OutgoingPayload, transfer_id: int, k: int, n: int, a: int, b: int):
    return pb2.PayloadHeader(
        tensors=[pb2.TensorSpec(name=e.name, dtype=e.dtype, shape=list(e.shape), offset=e.offset, nbytes=e.nbytes)
                 for e in payload.entries],
        total_bytes=payload.total_bytes, hash_algorithm=payload.hash_algorithm, transfer_id=transfer_id,
        num_streams=n, stream_index=k, segment_start=a, segment_end=b,
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def encode_data_chunk(round_idx: int, sender: int, offset: int, pieces: Sequence[memoryview]) -> bytes:
    """Serialized ``WeightChunk(round, sender, data=PayloadData(offset, data=b"".join(pieces)))``.

    Byte-identical to the generated ``SerializeToString`` (a test checks it) but copies the tensor bytes
    exactly once, straight from tensor memory into the message; building the protobuf object first
    costs two more copies of every chunk on the sender's hot path.
    """
    n = sum(len(p) for p in pieces)
    inner = (b"\x08" + _varint(offset) if offset else b"") + (b"\x12" + _varint(n) if n else b"")
    head = ((b"\x08" + _varint(round_idx) if round_idx else b"")
            + (b"\x10" + _varint(sender & 0xFFFFFFFFFFFFFFFF) if sender else b"")
            + b"\x22" + _varint(len(inner) + n))
    return b"".join([head, inner, *pieces])


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


class _DataBody:
    __slots__ = ("offset", "data")

    def __init__(self, offset: int, data: memoryview):
        self.offset, self.data = offset, data


class RawDataChunk:
    """A data ``WeightChunk`` whose bytes are a zero-copy view of the received message."""

    __slots__ = ("round", "sender", "data")

    def __init__(self, round_idx: int, sender: int, body: _DataBody):
        self.round, self.sender, self.data = round_idx, sender, body

    def WhichOneof(self, _name: str) -> str:  # noqa: N802 (mirrors the protobuf API)
        return "data"


def decode_chunk(raw: bytes):
    """Request deserializer for PushWeights: data messages parsed without copying their payload.

    Only the exact shape :func:`encode_data_chunk` produces (fields round, sender, data{offset,
    data}) takes the fast path; anything else (headers, trailers, unknown or repeated fields) is
    parsed by the generated protobuf code, so the semantics are protobuf's either way.
    """
    try:
        n = len(raw)
        pos = rnd = snd = 0
        body = None
        while pos < n:
            tag, pos = _read_varint(raw, pos)
            field, wt = tag >> 3, tag & 7
            if field in (1, 2) and wt == 0:
                v, pos = _read_varint(raw, pos)
                if field == 1:
                    rnd = v
                else:
                    snd = v - (1 << 64) if v >= 1 << 63 else v
            elif field == 4 and wt == 2 and body is None:
                ln, pos = _read_varint(raw, pos)
                body = (pos, pos + ln)
                pos += ln
            else:
                return pb2.WeightChunk.FromString(raw)
        if body is None or pos != n:
            return pb2.WeightChunk.FromString(raw)
        p, end = body
        off, data = 0, None
        while p < end:
            tag, p = _read_varint(raw, p)
            field, wt = tag >> 3, tag & 7
            if field == 1 and wt == 0:
                off, p = _read_varint(raw, p)
            elif field == 2 and wt == 2 and data is None:
                ln, p = _read_varint(raw, p)
                data = memoryview(raw)[p : p + ln]
                p += ln
            else:
                return pb2.WeightChunk.FromString(raw)
        if p != end or (data is not None and len(data) == 0):
            return pb2.WeightChunk.FromString(raw)
        return RawDataChunk(rnd, snd, _DataBody(off, data if data is not None else memoryview(b"")))
    except (IndexError, ValueError):
        return pb2.WeightChunk.FromString(raw)  # raises DecodeError for a truly malformed message


def _service_handler(servicer: "_Servicer") -> grpc.GenericRpcHandler:
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


def stream_messages(payload: OutgoingPayload, round_idx: int, sender: int, *, transfer_id: int,
                    stream_index: int = 0, num_streams: int = 1, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                    serialized: bool = False) -> Iterator:
    """The ``WeightChunk`` messages of one stream: header, data chunks of its segment, trailer.

    ``serialized=True`` yields wire bytes (for a call without request serializer) and encodes data
    chunks with :func:`encode_data_chunk`.
    """
    a, b = segments(payload.total_bytes, num_streams)[stream_index]
    payload.start_digest()
    enc = (lambda m: m.SerializeToString()) if serialized else (lambda m: m)
    yield enc(pb2.WeightChunk(round=round_idx, sender=sender,
                              header=_header_msg(payload, transfer_id, stream_index, num_streams, a, b)))
    step = chunk_bytes
    for off in range(a, b, step):
        pieces = list(payload.pieces(off, min(off + step, b)))
        if serialized:
            yield encode_data_chunk(round_idx, sender, off, pieces)
        else:
            yield pb2.WeightChunk(round=round_idx, sender=sender,
                                  data=pb2.PayloadData(offset=off, data=b"".join(pieces)))
    yield enc(pb2.WeightChunk(round=round_idx, sender=sender, trailer=pb2.PayloadTrailer(digest=payload.digest())))


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


class _Inbox:
    """Verified states per (round, sender), plus the transfers still being assembled."""

    def __init__(self):
        self.cv = threading.Condition()
        self.states: dict[tuple[int, int], StateDict] = {}
        self.pending: dict[tuple[int, int], tuple[int, IncomingPayload]] = {}


class _Servicer(pb2_grpc.PeerServicer):
    def __init__(self, transport: "GrpcTransport"):
        self.t = transport

    # ---- weights ----
    def PushWeights(self, request_iterator, context):
        t = self.t
        first = next(request_iterator, None)
        if first is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty PushWeights stream")
        round_idx, sender = int(first.round), int(first.sender)
        key = (round_idx, sender)
        where = f"peer {t.peer_id}: push from peer {sender} for round {round_idx}"
        if first.WhichOneof("body") != "header":
            t._reject(context, grpc.StatusCode.INVALID_ARGUMENT, f"{where}: first message is not a header")
        code, why = t._admit(round_idx, sender, context)
        if code is not None:
            t._reject(context, code, f"{where}: {why}")
        h = first.header
        payload = None
        try:
            with t._inbox.cv:
                if key in t._inbox.states:
                    context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{where}: already received")
                cur = t._inbox.pending.get(key)
                if cur is not None and cur[0] == h.transfer_id:
                    payload = cur[1]
                    if not payload.same_table(_entries(h), h.total_bytes, h.num_streams):
                        raise TransportError(f"{where}: stream {h.stream_index} announces a different tensor table")
                else:
                    if cur is not None:  # a retry supersedes a broken earlier transfer
                        cur[1].abort()
                    payload = IncomingPayload(
                        _entries(h), h.total_bytes, h.hash_algorithm, h.num_streams, t._schema,
                        allow_half=t.accept_half, max_total_bytes=t.max_payload_bytes, label=where,
                    )
                    t._inbox.pending[key] = (h.transfer_id, payload)
                payload.open_stream(h.stream_index, h.segment_start, h.segment_end)
            digest = None
            for msg in _prefetch(request_iterator, t.prefetch):
                if msg.round != round_idx or msg.sender != sender:
                    raise TransportError(f"{where}: message for round {msg.round} from peer {msg.sender} inside the stream")
                kind = msg.WhichOneof("body")
                if kind == "data":
                    if digest is not None:
                        raise TransportError(f"{where}: data after the trailer")
                    payload.write(h.stream_index, msg.data.offset, msg.data.data)
                elif kind == "trailer":
                    digest = msg.trailer.digest
                else:
                    raise TransportError(f"{where}: unexpected {kind} message inside the stream")
            payload.close_stream(h.stream_index, digest)
            done = payload.complete
            if done:
                state = payload.finalize()
                with t._inbox.cv:
                    t._inbox.pending.pop(key, None)
                    t._inbox.states[key] = state
                    t._inbox.cv.notify_all()
            return pb2.PushReply(round=round_idx, sender=t.peer_id, bytes_received=h.segment_end - h.segment_start,
                                 complete=done)
        except TransportError as exc:
            with t._inbox.cv:
                cur = t._inbox.pending.get(key)
                if cur is not None and cur[1] is payload:
                    del t._inbox.pending[key]
            if payload is not None:
                payload.abort()
            msg = str(exc)
            code = grpc.StatusCode.DATA_LOSS if any(m in msg for m in _DATA_LOSS_MARKERS) else grpc.StatusCode.INVALID_ARGUMENT
            t._reject(context, code, msg)

    def FetchState(self, request, context):
        t = self.t
        code, why = t._admit(int(request.round), int(request.sender), context, for_fetch=True)
        if code is not None:
            t._reject(context, code, f"peer {t.peer_id}: fetch from peer {request.sender}: {why}")
        latest = t._latest
        if latest is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"peer {t.peer_id} has no state yet")
        round_idx, payload = latest
        yield from stream_messages(payload, round_idx, t.peer_id, transfer_id=random.getrandbits(63),
                                   chunk_bytes=t.chunk_bytes)

    # ---- membership ----
    def Join(self, request, context):
        t = self.t
        code, why = t._admit(int(request.round), int(request.sender), context, for_fetch=True)
        if code is not None:
            t._reject(context, code, f"peer {t.peer_id}: join from peer {request.sender}: {why}")
        t._seen(int(request.sender), int(request.round), request.address or None)
        return pb2.JoinReply(round=max(t.current_round, 0), sender=t.peer_id, members=t._member_msgs())

    def Leave(self, request, context):
        t = self.t
        with t._members_lock:
            m = t.members.get(int(request.sender))
            if m is not None:
                m["alive"] = False
        return pb2.LeaveReply(round=max(t.current_round, 0), sender=t.peer_id)

    def Heartbeat(self, request, context):
        self.t._seen(int(request.sender), int(request.round), None)
        with self.t._inbox.cv:
            self.t._inbox.cv.notify_all()  # a receive may stop waiting for a peer now in a later round
        return pb2.HeartbeatReply(round=max(self.t.current_round, 0), sender=self.t.peer_id)


class GrpcTransport:
    """One local peer served over gRPC. Implements :class:`dimat.transport.base.Transport`.

    Args:
        peer_id: id of the peer this process hosts.
        peers: ``{id: "host:port"}`` for every peer (the local one included; its port may be 0 to
            bind a free port, see :attr:`address`).
        allowed_senders: who may push weights: a callable ``round -> ids``, a fixed collection, or
            ``None`` (default) for the in-neighbours given to the latest ``exchange`` (all known peers
            before the first one). Pushes from anyone else are rejected with PERMISSION_DENIED.
        schema: the expected state dict (or :class:`Schema`); defaults to the state passed to
            ``exchange``. Pushes arriving before any schema is known are told to retry (UNAVAILABLE).
        token: shared secret; every RPC but health must carry ``authorization: Bearer <token>``.
        tls: certificate files for TLS (``mutual=True`` for mTLS).
        deadline: default per-neighbour deadline in seconds (covers retries).
        retries, backoff, backoff_max: retry policy for retryable statuses (exponential + jitter).
        chunk_bytes, num_streams, half, hash_algorithm: wire options (see :mod:`dimat.transport.wire`).
        max_rounds_ahead: how many rounds past the local one a neighbour may push (bounded memory).
        heartbeat_interval: seconds between heartbeats to every known peer (None = no heartbeats).
            A peer that misses ``max_missed_heartbeats`` in a row is *down*: ``exchange`` neither
            pushes to it nor waits for it until a heartbeat succeeds again (it rejoined).
        report_path: append one JSON line per exchange (received, missing, failed sends) here.
        delay: seconds to sleep before every exchange: makes this peer a straggler (tests, benches).
    """

    def __init__(
        self,
        peer_id: int,
        peers: Mapping[int, str],
        *,
        bind: str | None = None,
        allowed_senders: AllowedSenders = None,
        schema: Schema | Mapping[str, torch.Tensor] | None = None,
        token: str | None = None,
        tls: TlsConfig | None = None,
        deadline: float = 60.0,
        retries: int = 5,
        backoff: float = 0.05,
        backoff_max: float = 2.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        num_streams: int = 1,
        half: str | None = None,
        hash_algorithm: str = DEFAULT_HASH,
        accept_half: bool = True,
        max_message_bytes: int | None = None,
        max_payload_bytes: int | None = None,
        max_rounds_ahead: int = 2,
        max_workers: int = 16,
        require_cert_identity: bool = False,
        prefetch: int = 2,
        window_bytes: int | None = None,
        heartbeat_interval: float | None = None,
        max_missed_heartbeats: int = 3,
        report_path: str | None = None,
        delay: float = 0.0,
    ):
        if peer_id not in peers:
            raise ValueError(f"peer id {peer_id} is not in the peers map {sorted(peers)}")
        if not 0 < chunk_bytes <= (64 << 20):
            raise ValueError(f"chunk_bytes must be in (0, 64 MiB], got {chunk_bytes}")
        self.peer_id = int(peer_id)
        self.peers = {int(k): str(v) for k, v in peers.items()}
        self.token, self.tls = token, tls
        self.deadline, self.retries, self.backoff, self.backoff_max = deadline, retries, backoff, backoff_max
        self.chunk_bytes, self.num_streams, self.half = chunk_bytes, num_streams, half
        self.hash_algorithm, self.accept_half = hash_algorithm, accept_half
        self.max_payload_bytes, self.max_rounds_ahead = max_payload_bytes, max_rounds_ahead
        self.require_cert_identity = require_cert_identity
        self.prefetch = prefetch
        self.window_bytes = window_bytes
        self.heartbeat_interval = heartbeat_interval
        self.max_missed_heartbeats = max(1, int(max_missed_heartbeats))
        self.report_path = report_path
        self.delay = float(delay)
        self._missed: dict[int, int] = {}
        self._hb_stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        if require_cert_identity and not (tls and tls.mutual):
            raise ValueError("require_cert_identity needs mutual TLS")
        # a chunk plus protobuf framing, or a large tensor table, must fit in one message
        self.max_message_bytes = max_message_bytes or max(chunk_bytes + (1 << 20), 16 << 20)
        self._allowed_policy = allowed_senders
        self._allowed_by_round: dict[int, frozenset[int]] = {}
        self._schema: Schema | None = None
        if schema is not None:
            self.set_schema(schema)
        self._inbox = _Inbox()
        self.current_round = -1
        self._latest: tuple[int, OutgoingPayload] | None = None
        self.errors: deque[str] = deque(maxlen=100)  # recent rejections, newest last
        self.last_report: ExchangeReport | None = None
        self.members: dict[int, dict] = {}
        self._members_lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, object] = {}
        self._chan_lock = threading.Lock()
        self._pool = futures.ThreadPoolExecutor(max_workers=max(4, 2 * num_streams), thread_name_prefix=f"dimat-send-{peer_id}")
        self._closed = False

        opts = channel_options(self.max_message_bytes, self.window_bytes)
        interceptors = [TokenAuthInterceptor(token)] if token else []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"dimat-srv-{peer_id}"),
                                   options=opts, interceptors=interceptors)
        self._server.add_generic_rpc_handlers((_service_handler(_Servicer(self)),))
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        bind = bind or self.peers[self.peer_id]
        if tls is not None:
            port = self._server.add_secure_port(bind, tls.server_credentials())
        else:
            port = self._server.add_insecure_port(bind)
        if port == 0:
            raise OSError(f"peer {peer_id}: could not bind {bind}")
        host = bind.rsplit(":", 1)[0]
        self.port = port
        self.address = f"{host}:{port}"
        self.peers[self.peer_id] = self.address
        self._server.start()
        for svc in ("", SERVICE_NAME):
            self._health.set(svc, health_pb2.HealthCheckResponse.SERVING)

    # ------------------------------------------------------------------ configuration
    def set_schema(self, schema: Schema | Mapping[str, torch.Tensor]) -> None:
        """What pushes must look like: the names, shapes and dtypes of the local model."""
        self._schema = schema if isinstance(schema, Schema) else Schema.from_state(schema)

    def set_peers(self, peers: Mapping[int, str]) -> None:
        """Update neighbour addresses (a restarted peer may come back on another port)."""
        with self._chan_lock:
            for k, v in peers.items():
                if int(k) != self.peer_id:
                    self.peers[int(k)] = str(v)

    def allowed_senders(self, round_idx: int) -> frozenset[int]:
        """The senders whose pushes for ``round_idx`` are accepted."""
        p = self._allowed_policy
        if callable(p):
            return frozenset(int(i) for i in p(round_idx))
        if p is not None:
            return frozenset(int(i) for i in p)
        if round_idx in self._allowed_by_round:
            return self._allowed_by_round[round_idx]
        if self._allowed_by_round:  # a neighbour ahead of us: assume the latest known neighbourhood
            return self._allowed_by_round[max(self._allowed_by_round)]
        return frozenset(k for k in self.peers if k != self.peer_id)

    # ------------------------------------------------------------------ server-side helpers
    def _admit(self, round_idx: int, sender: int, context, for_fetch: bool = False):
        """``(None, None)`` if the call may proceed, else ``(status, reason)``."""
        if self.require_cert_identity:
            names = [n.decode() for n in context.auth_context().get("x509_common_name", [])]
            if f"peer-{sender}" not in names:
                return grpc.StatusCode.PERMISSION_DENIED, f"sender id {sender} does not match the client certificate {names}"
        if for_fetch:  # joins and state fetches come from any authenticated peer (a new one too)
            return None, None
        allowed = self.allowed_senders(round_idx)
        if sender not in allowed:
            return grpc.StatusCode.PERMISSION_DENIED, f"unknown sender {sender} (accepted: {sorted(allowed)})"
        if self._schema is None:
            return grpc.StatusCode.UNAVAILABLE, "receiver not ready (no model schema yet); retry"
        if round_idx < self.current_round:
            return grpc.StatusCode.FAILED_PRECONDITION, f"stale round (receiver is at round {self.current_round})"
        if round_idx > self.current_round + self.max_rounds_ahead:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, f"too far ahead (receiver is at round {self.current_round}); retry"
        return None, None

    def _reject(self, context, code: grpc.StatusCode, msg: str) -> None:
        if code not in RETRYABLE:
            self.errors.append(msg)
            log.warning("%s", msg)
        context.abort(code, msg)

    def _seen(self, peer: int, round_idx: int, address: str | None) -> None:
        with self._members_lock:
            m = self.members.setdefault(peer, {"address": self.peers.get(peer, ""), "round": 0, "alive": True})
            m.update(round=round_idx, alive=True, last_seen=time.monotonic())
            if address:
                m["address"] = address
        if address:
            self.set_peers({peer: address})

    def _member_msgs(self) -> list:
        with self._members_lock:
            known = dict(self.members)
        out = [pb2.Member(id=self.peer_id, address=self.address, round=max(self.current_round, 0), alive=True)]
        for pid, addr in sorted(self.peers.items()):
            if pid == self.peer_id:
                continue
            m = known.get(pid, {})
            out.append(pb2.Member(id=pid, address=m.get("address") or addr, round=m.get("round", 0), alive=m.get("alive", True)))
        return out

    # ------------------------------------------------------------------ client side
    def _stub(self, peer: int):
        addr = self.peers.get(peer)
        if addr is None:
            raise TransportError(f"peer {self.peer_id}: no address for peer {peer}")
        with self._chan_lock:
            stub = self._stubs.get(addr)
            if stub is None:
                opts = channel_options(self.max_message_bytes, self.window_bytes)
                if self.tls is not None:
                    ch = grpc.secure_channel(addr, self.tls.channel_credentials(), options=opts + self.tls.channel_options())
                else:
                    ch = grpc.insecure_channel(addr, options=opts)
                self._channels[addr] = ch
                stub = self._stubs[addr] = pb2_grpc.PeerStub(ch)
            return stub

    def _push_call(self, peer: int):
        """PushWeights taking pre-serialized requests (see :func:`encode_data_chunk`)."""
        self._stub(peer)
        ch = self._channels[self.peers[peer]]
        return ch.stream_unary(f"/{SERVICE_NAME}/PushWeights", request_serializer=None,
                               response_deserializer=pb2.PushReply.FromString)

    def _call_with_retries(self, peer: int, what: str, fn: Callable[[float], object], deadline: float):
        """Run ``fn(remaining_seconds)`` until success, a non-retryable status, or the deadline."""
        end = time.monotonic() + deadline
        delay = self.backoff
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
                retry = code in RETRYABLE and attempt < self.retries and end - time.monotonic() > delay
                if not retry:
                    name = code.name if code is not None else "ERROR"
                    raise TransportError(f"peer {self.peer_id}: {what} to peer {peer} failed [{name}]: {details}") from None
                attempt += 1
                time.sleep(min(delay * (0.5 + random.random()), max(0.0, end - time.monotonic())))
                delay = min(delay * 2, self.backoff_max)

    def send(self, peer: int, round_idx: int, state: Mapping[str, torch.Tensor] | OutgoingPayload,
             deadline: float | None = None) -> None:
        """Push ``state`` to ``peer`` for ``round_idx``; raises TransportError with the receiver's reason."""
        payload = state if isinstance(state, OutgoingPayload) else OutgoingPayload(state, half=self.half, hash_algorithm=self.hash_algorithm)
        push = self._push_call(peer)
        md = token_metadata(self.token)
        n = max(1, min(self.num_streams, -(-payload.total_bytes // self.chunk_bytes) or 1))

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
                return [c.result() for c in calls]
            except grpc.RpcError:
                for c in calls:
                    c.cancel()
                raise

        self._call_with_retries(peer, f"push of round {round_idx}", attempt, deadline or self.deadline)

    def receive(self, round_idx: int, senders: Iterable[int], timeout: float | None = None) -> dict[int, StateDict]:
        """Wait until every sender's state for ``round_idx`` arrived or the timeout passed; pop what arrived."""
        want = set(int(s) for s in senders)
        end = time.monotonic() + (self.deadline if timeout is None else timeout)
        with self._inbox.cv:
            while True:
                have = {s for s in want if (round_idx, s) in self._inbox.states}
                # a peer that is down, or already in a later round, will not send this round any more
                waiting = {s for s in want - have if self.is_up(s) and self.known_round(s) <= round_idx}
                left = end - time.monotonic()
                if not waiting or left <= 0:
                    break
                self._inbox.cv.wait(min(left, 0.5))
            return {s: self._inbox.states.pop((round_idx, s)) for s in sorted(have)}

    def fetch_state(self, peer: int, deadline: float | None = None) -> tuple[int, StateDict]:
        """Pull ``peer``'s latest state (checked like a push); returns ``(round, state)``."""
        if self._schema is None:
            raise TransportError(f"peer {self.peer_id}: set_schema() before fetching state")
        stub = self._stub(peer)
        md = token_metadata(self.token)

        def attempt(remaining: float):
            it = stub.FetchState(pb2.FetchRequest(round=max(self.current_round, 0), sender=self.peer_id),
                                 timeout=remaining, metadata=md, wait_for_ready=True)
            first = next(it, None)
            if first is None or first.WhichOneof("body") != "header":
                raise TransportError(f"peer {self.peer_id}: fetch from peer {peer}: reply does not start with a header")
            h = first.header
            where = f"peer {self.peer_id}: state fetched from peer {peer}"
            inc = IncomingPayload(_entries(h), h.total_bytes, h.hash_algorithm, h.num_streams, self._schema,
                                  allow_half=self.accept_half, max_total_bytes=self.max_payload_bytes, label=where)
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

        return self._call_with_retries(peer, "state fetch", attempt, deadline or self.deadline)

    def heartbeat(self, peer: int, timeout: float = 2.0) -> int:
        """Ping ``peer``; returns its current round (raises TransportError if unreachable)."""
        stub = self._stub(peer)
        reply = self._call_with_retries(
            peer, "heartbeat",
            lambda rem: stub.Heartbeat(pb2.HeartbeatRequest(round=max(self.current_round, 0), sender=self.peer_id),
                                       timeout=rem, metadata=token_metadata(self.token)), timeout)
        return int(reply.round)

    def join(self, peer: int, timeout: float = 10.0) -> tuple[int, dict[int, str]]:
        """Announce this peer to ``peer``; returns its round and the members it knows ``{id: address}``."""
        stub = self._stub(peer)
        reply = self._call_with_retries(
            peer, "join",
            lambda rem: stub.Join(pb2.JoinRequest(round=max(self.current_round, 0), sender=self.peer_id, address=self.address),
                                  timeout=rem, metadata=token_metadata(self.token), wait_for_ready=True), timeout)
        return int(reply.round), {int(m.id): m.address for m in reply.members}

    def leave(self, peers: Iterable[int], timeout: float = 2.0) -> None:
        """Tell ``peers`` this peer is leaving (best effort)."""
        for p in peers:
            try:
                self._stub(p).Leave(pb2.LeaveRequest(round=max(self.current_round, 0), sender=self.peer_id),
                                    timeout=timeout, metadata=token_metadata(self.token))
            except (grpc.RpcError, TransportError) as exc:
                log.info("peer %s: leave to peer %s failed: %s", self.peer_id, p, exc)

    # ------------------------------------------------------------------ liveness
    def start_heartbeats(self, interval: float | None = None) -> None:
        """Ping every other known peer every ``interval`` seconds on a background thread."""
        if interval is not None:
            self.heartbeat_interval = interval
        if not self.heartbeat_interval or self._hb_thread is not None:
            return
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name=f"dimat-hb-{self.peer_id}", daemon=True)
        self._hb_thread.start()

    def _heartbeat_loop(self) -> None:
        interval = float(self.heartbeat_interval or 1.0)
        while not self._hb_stop.wait(interval):
            for pid in [p for p in list(self.peers) if p != self.peer_id]:
                if self._hb_stop.is_set():
                    return
                try:
                    stub = self._stub(pid)
                    rep = stub.Heartbeat(pb2.HeartbeatRequest(round=max(self.current_round, 0), sender=self.peer_id),
                                         timeout=max(2 * interval, 1.0), metadata=token_metadata(self.token))
                except (grpc.RpcError, TransportError, ValueError):
                    was_up = self.is_up(pid)
                    self._missed[pid] = self._missed.get(pid, 0) + 1
                    if was_up and not self.is_up(pid):
                        log.warning("peer %s: peer %s is down (%d missed heartbeats)", self.peer_id, pid, self._missed[pid])
                        with self._inbox.cv:
                            self._inbox.cv.notify_all()  # a receive waiting for it can stop waiting
                    continue
                if not self.is_up(pid):
                    log.warning("peer %s: peer %s is back (round %s)", self.peer_id, pid, rep.round)
                self._missed[pid] = 0
                with self._members_lock:
                    m = self.members.setdefault(pid, {"address": self.peers.get(pid, "")})
                    m.update(round=int(rep.round), alive=True, last_seen=time.monotonic())

    def is_up(self, peer: int) -> bool:
        """False once ``peer`` missed ``max_missed_heartbeats`` heartbeats in a row (always True without heartbeats)."""
        return self._missed.get(peer, 0) < self.max_missed_heartbeats

    def known_round(self, peer: int) -> int:
        """The latest round ``peer`` reported (heartbeats, joins); -1 if unknown."""
        with self._members_lock:
            return int(self.members.get(peer, {}).get("round", -1))

    def down_peers(self) -> list[int]:
        return sorted(p for p in self.peers if p != self.peer_id and not self.is_up(p))

    # ------------------------------------------------------------------ Transport protocol
    def begin_round(self, round_idx: int, in_neighbours: Iterable[int]) -> None:
        """Enter ``round_idx``: fix the accepted senders for it and drop buffers of older rounds."""
        self._allowed_by_round[round_idx] = frozenset(int(i) for i in in_neighbours)
        for r in [r for r in self._allowed_by_round if r < round_idx - 1]:
            del self._allowed_by_round[r]
        with self._inbox.cv:
            self.current_round = max(self.current_round, round_idx)
            for key in [k for k in self._inbox.states if k[0] < round_idx]:
                del self._inbox.states[key]
            for key in [k for k in self._inbox.pending if k[0] < round_idx]:
                self._inbox.pending.pop(key)[1].abort()

    def exchange(
        self,
        round_idx: int,
        states: Mapping[int, StateDict],
        in_neighbours: Mapping[int, Sequence[int]],
        out_neighbours: Mapping[int, Sequence[int]],
        timeout: float | None = None,
    ) -> dict[int, dict[int, StateDict]]:
        """Push the local state to its out-neighbours and collect its in-neighbours' states for the round."""
        if set(states) != {self.peer_id}:
            raise ValueError(f"GrpcTransport hosts peer {self.peer_id} only; got states for {sorted(states)}")
        if self.delay > 0:
            time.sleep(self.delay)
        t0 = time.monotonic()
        deadline = self.deadline if timeout is None else timeout
        state = states[self.peer_id]
        schema = Schema.from_state(state)
        if self._schema is None or self._schema != schema:
            self.set_schema(schema)
        ins = [int(i) for i in in_neighbours.get(self.peer_id, ())]
        outs = [int(i) for i in out_neighbours.get(self.peer_id, ())]
        self.begin_round(round_idx, ins)
        payload = OutgoingPayload(state, half=self.half, hash_algorithm=self.hash_algorithm)
        self._latest = (round_idx, payload)
        failed: dict[int, str] = {}
        for j in outs:
            if not self.is_up(j):
                failed[j] = f"peer {j} is down ({self._missed.get(j, 0)} missed heartbeats); not sent"
        sends = {j: self._pool.submit(self.send, j, round_idx, payload, deadline) for j in outs if j not in failed}
        received = self.receive(round_idx, ins, deadline)
        for j, f in sends.items():
            try:
                f.result(timeout=max(0.0, t0 + deadline + 1.0 - time.monotonic()))
            except (TransportError, futures.TimeoutError) as exc:
                failed[j] = str(exc) or "timed out"
                log.warning("%s", failed[j])
        missing = [i for i in ins if i not in received]
        self.last_report = ExchangeReport(round_idx, sorted(received), missing, failed, time.monotonic() - t0)
        if self.report_path:
            import dataclasses
            import json

            with open(self.report_path, "a") as fh:
                fh.write(json.dumps({"peer": self.peer_id, **dataclasses.asdict(self.last_report)}) + "\n")
        return {self.peer_id: received}

    def close(self, grace: float | None = 0.5) -> None:
        if self._closed:
            return
        self._closed = True
        self._hb_stop.set()
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        with self._chan_lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
            self._stubs.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "GrpcTransport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
