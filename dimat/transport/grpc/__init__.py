"""gRPC transport: every peer process serves the ``dimat.v1.Peer`` service and dials its neighbours.

Push model: in ``exchange(r, ...)`` the local peer streams its state to each out-neighbour
(``PushWeights``, client streaming, optionally split over parallel streams) while its own server
receives the in-neighbours' pushes. Received states are buffered per ``(round, sender)`` so a
neighbour that runs a round ahead is kept until the local round loop asks for it. A push is accepted
only from an allowed sender (the topology's in-neighbours), only with the shared token (if set),
only for a round inside the buffering window, and only if it passes the receive checks
(:mod:`dimat.transport.checks`: the receiver's own schema, finiteness) and the wire's hash and
completeness checks (:mod:`dimat.transport.wire`); otherwise the RPC is aborted with a status naming
the problem (``DATA_LOSS`` for lost/corrupt bytes, ``INVALID_ARGUMENT`` for bad content), nothing is
buffered, and the server keeps serving.

Modules: :mod:`.proto` (generated messages, channel options), :mod:`.codec` (message stream and the
zero-copy data-chunk fast path), :mod:`.server` (servicer, inbox), :mod:`.client` (stubs, retries,
push/fetch/heartbeat/join/leave), :mod:`.membership` (members, heartbeats), :mod:`.transport`
(:class:`GrpcTransport`). See docs/grpc.md for the protocol and tuning figures.
"""
from dimat.transport.grpc.client import PeerClient, PushRefused, RetryPolicy
from dimat.transport.grpc.codec import RawDataChunk, decode_chunk, encode_data_chunk, stream_messages
from dimat.transport.grpc.membership import Member
from dimat.transport.grpc.proto import MAX_FRAME_BYTES, RETRYABLE, SERVICE_NAME, channel_options, pb2, pb2_grpc
from dimat.transport.grpc.transport import AllowedSenders, ExchangeReport, GrpcTransport

__all__ = [
    "AllowedSenders", "ExchangeReport", "GrpcTransport", "MAX_FRAME_BYTES", "Member", "PeerClient", "PushRefused", "RETRYABLE",
    "RawDataChunk", "RetryPolicy", "SERVICE_NAME", "channel_options", "decode_chunk", "encode_data_chunk", "pb2",
    "pb2_grpc", "stream_messages",
]
