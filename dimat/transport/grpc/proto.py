"""The ``dimat.v1.Peer`` protocol: generated messages, service name, and the gRPC options both ends use."""
from __future__ import annotations

import grpc

from dimat.transport import protogen

pb2, pb2_grpc = protogen.load()

SERVICE_NAME = "dimat.v1.Peer"
#: statuses a client retries (with backoff): the receiver is busy, not ready, or the call raced a restart
#: trailing-metadata key on a push the receiver got whole enough to check and refused (a receive check)
REFUSED_METADATA = "dimat-refused"
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})

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

