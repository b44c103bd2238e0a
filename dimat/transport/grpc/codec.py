"""Weight messages: a state's header/data/trailer stream, and the copy-saving fast path for data chunks.

:func:`encode_data_chunk` serialises a data chunk straight from tensor memory and
:func:`decode_chunk` parses one into a zero-copy view (:class:`RawDataChunk`); everything else goes
through the generated protobuf code, so the wire format is protobuf's either way.
"""
from __future__ import annotations

from typing import Iterator, Sequence

from dimat.transport.grpc.proto import pb2
from dimat.transport.wire import DEFAULT_CHUNK_BYTES, OutgoingPayload, TensorEntry, segments


def header_entries(header) -> list[TensorEntry]:
    """The tensor table of a ``PayloadHeader``."""
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

