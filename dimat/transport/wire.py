"""State dict <-> chunk stream: raw little-endian tensor bytes, never pickle.

A state dict is laid out as one flat *payload*: its tensors back to back in dict order, each as its
raw bytes. A header carries the tensor table (name, dtype, shape, offset, nbytes); data chunks carry
``(offset, bytes)`` runs of the payload; a trailer carries the hash of the whole payload. A payload may
travel over several parallel streams, each carrying one contiguous segment.

The receiving side (:class:`IncomingPayload`) checks the table against the receiver's own model
(:class:`Schema`) *before* allocating anything, writes chunks straight into one preallocated tensor per
name (no intermediate copy of the model), hashes the payload as it arrives on a helper thread
(hashlib releases the GIL), and on completion verifies the hash, that every byte arrived, and that no
floating tensor holds NaN/Inf. The content checks (schema, finiteness) are
:mod:`dimat.transport.checks`' and raise :class:`~dimat.transport.checks.StateRejected`; lost or
corrupted bytes raise :class:`~dimat.transport.base.DataLossError`; a malformed table raises
:class:`~dimat.transport.base.TransportError`. The caller's model is never touched because nothing
is returned until all checks pass.

This module knows nothing about gRPC; :mod:`dimat.transport.grpc` maps messages to these calls.
"""
from __future__ import annotations

import bisect
import ctypes
import hashlib
import heapq
import math
import sys
import threading
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import xxhash

from dimat.transport import checks
from dimat.transport.base import DataLossError, StateDict, TransportError
from dimat.transport.checks import non_finite
from dimat.transport.schema import DTYPE_NAMES as _DTYPE_NAMES
from dimat.transport.schema import HALF_DTYPES, WIRE_DTYPES, Schema

if sys.byteorder != "little":  # the wire is little-endian raw bytes; no byte swapping implemented
    raise ImportError("dimat.transport.wire supports little-endian hosts only")

#: Payload hashes. The hash guards integrity (truncation, corruption, mis-assembly of parallel
#: streams); authenticity comes from TLS, the token and the neighbour check. A sender chooses the
#: hash, so a cryptographic one adds no protection against a malicious neighbour; xxh3 (~20 GB/s) is
#: the default because SHA-256 (~1.6 GB/s) cost more CPU than gRPC itself (docs/grpc.md).
HASH_ALGORITHMS = ("xxh3_128", "sha256", "blake2b")
DEFAULT_HASH = "xxh3_128"
DEFAULT_CHUNK_BYTES = 4 << 20
MAX_STREAMS = 64


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype; raises TransportError for dtypes outside the whitelist."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise TransportError(f"dtype {dtype} is not allowed on the wire (allowed: {sorted(WIRE_DTYPES)})") from None


def _new_hasher(algorithm: str):
    if algorithm not in HASH_ALGORITHMS:
        raise TransportError(f"unsupported hash algorithm {algorithm!r} (allowed: {HASH_ALGORITHMS})")
    if algorithm == "xxh3_128":
        return xxhash.xxh3_128()
    return hashlib.new(algorithm)


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_libc = None


def alloc_tensor(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty`` that asks Linux for transparent huge pages on large buffers (best effort).

    Received bytes land in freshly allocated memory; with 4 KiB pages the first-touch page faults
    cost more than the copy itself (about 3x slower fills measured on a VM). Elsewhere a no-op.
    """
    global _libc
    t = torch.empty(tuple(shape), dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes >= 2 * _HUGE_PAGE and sys.platform.startswith("linux"):
        try:
            if _libc is None:
                _libc = ctypes.CDLL(None, use_errno=True)
                _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            addr = t.data_ptr()
            lo = -(-addr // _HUGE_PAGE) * _HUGE_PAGE
            hi = (addr + nbytes) // _HUGE_PAGE * _HUGE_PAGE
            if hi > lo:
                _libc.madvise(lo, hi - lo, _MADV_HUGEPAGE)
        except (OSError, AttributeError):
            pass
    return t


def _byte_view(t: torch.Tensor) -> np.ndarray:
    """A flat uint8 numpy view sharing ``t``'s memory (works for bfloat16/bool too)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _views_between(entries: Sequence["TensorEntry"], starts: Sequence[int], views: Sequence[np.ndarray],
                   start: int, end: int) -> Iterator[memoryview]:
    """Memoryviews of the tensors laid back to back that cover payload bytes ``[start, end)``."""
    i = max(0, bisect.bisect_right(starts, start) - 1)
    pos = start
    while pos < end and i < len(entries):
        e = entries[i]
        lo, hi = max(pos, e.offset), min(end, e.offset + e.nbytes)
        if hi > lo:
            yield memoryview(views[i][lo - e.offset : hi - e.offset])
            pos = hi
        i += 1


@dataclass(frozen=True)
class TensorEntry:
    """One row of the tensor table."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def segments(total: int, num_streams: int, align: int = 64) -> list[tuple[int, int]]:
    """Split ``[0, total)`` into ``num_streams`` contiguous segments (boundaries aligned)."""
    num_streams = max(1, min(num_streams, MAX_STREAMS))
    step = -(-total // num_streams)
    step = -(-step // align) * align if step else 0
    out = []
    for k in range(num_streams):
        a, b = min(k * step, total), min((k + 1) * step, total)
        out.append((a, b))
    return out


# --------------------------------------------------------------------------------------------- send


class OutgoingPayload:
    """A state dict ready to stream: the tensor table plus byte views of the (wire-cast) tensors.

    ``half`` ("float16"/"bfloat16") sends floating tensors in half precision (values beyond the half
    range raise instead of silently becoming Inf). The digest is computed once on a helper thread that
    starts with the first stream, so hashing overlaps sending.
    """

    def __init__(self, state: Mapping[str, torch.Tensor], *, half: str | None = None, hash_algorithm: str = DEFAULT_HASH):
        if half is not None and half not in HALF_DTYPES:
            raise ValueError(f"half must be None or one of {HALF_DTYPES}, got {half!r}")
        _new_hasher(hash_algorithm)
        self.hash_algorithm = hash_algorithm
        self.entries: list[TensorEntry] = []
        self._views: list[np.ndarray] = []
        self._keep: list[torch.Tensor] = []  # keeps cast/contiguous copies alive while views exist
        offset = 0
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"state[{name!r}] is {type(t).__name__}, expected a tensor")
            t = t.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            if half is not None and t.dtype in (torch.float32, torch.float64):
                h = t.to(WIRE_DTYPES[half])
                if non_finite(h) and not non_finite(t):  # blocked scans: no full-size temporaries
                    raise TransportError(f"tensor {name!r} has values outside the {half} range; send it without half precision")
                t = h
            t = t.contiguous()
            dt = dtype_name(t.dtype)
            nbytes = t.numel() * t.element_size()
            self.entries.append(TensorEntry(name, dt, tuple(t.shape), offset, nbytes))
            self._keep.append(t)
            self._views.append(_byte_view(t) if nbytes else np.empty(0, np.uint8))
            offset += nbytes
        self.total_bytes = offset
        self._starts = [e.offset for e in self.entries]
        self._digest: bytes | None = None
        self._digest_error: BaseException | None = None
        self._digest_done = threading.Event()
        self._digest_started = False
        self._lock = threading.Lock()

    def pieces(self, start: int, end: int) -> Iterator[memoryview]:
        """Memoryviews covering ``payload[start:end]`` in order (no copy)."""
        return _views_between(self.entries, self._starts, self._views, start, end)

    def chunks(self, start: int, end: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
        """``(offset, bytes)`` runs of ``payload[start:end]``, each at most ``chunk_bytes`` long."""
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        for a in range(start, end, chunk_bytes):
            b = min(a + chunk_bytes, end)
            parts = list(self.pieces(a, b))
            yield a, (bytes(parts[0]) if len(parts) == 1 else b"".join(parts))

    def start_digest(self) -> None:
        with self._lock:
            if self._digest_started:
                return
            self._digest_started = True
        threading.Thread(target=self._compute_digest, name="dimat-hash-send", daemon=True).start()

    def _compute_digest(self) -> None:
        try:
            h = _new_hasher(self.hash_algorithm)
            for v in self._views:
                if v.size:
                    h.update(v)
            self._digest = h.digest()
        except BaseException as exc:  # surfaced by digest()
            self._digest_error = exc
        finally:
            self._digest_done.set()

    def digest(self) -> bytes:
        self.start_digest()
        self._digest_done.wait()
        if self._digest_error is not None:
            raise self._digest_error
        assert self._digest is not None
        return self._digest


# ------------------------------------------------------------------------------------------ receive

class _OrderedHasher:
    """Hashes payload regions strictly in offset order on a helper thread, whatever order they come in.

    Regions are views into the preallocated tensors, so parked out-of-order regions cost no memory.
    """

    def __init__(self, algorithm: str, payload: "IncomingPayload"):
        self._h = _new_hasher(algorithm)
        self._payload = payload
        self._next = 0
        self._heap: list[tuple[int, int]] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="dimat-hash-recv", daemon=True)
        self._thread.start()

    def add(self, start: int, end: int) -> None:
        with self._cv:
            heapq.heappush(self._heap, (start, end))
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not (self._heap and self._heap[0][0] == self._next):
                    self._cv.wait()
                if self._closed and not (self._heap and self._heap[0][0] == self._next):
                    return
                start, end = heapq.heappop(self._heap)
            payload = self._payload
            if payload is None:
                return
            for view in payload._pieces(start, end):  # outside the lock: hashlib drops the GIL
                self._h.update(view)
            del payload
            with self._cv:
                self._next = end
                self._cv.notify_all()

    def finish(self, total: int) -> bytes:
        """Wait until ``[0, total)`` is hashed (callers guarantee every region was added) and return the digest."""
        with self._cv:
            while self._next < total and self._thread.is_alive():
                self._cv.wait(0.1)
            done = self._next >= total
            self._closed = True
            self._cv.notify_all()
        self._thread.join()
        self._payload = None  # break the payload <-> hasher cycle so buffers free without the GC
        if not done:
            raise DataLossError(f"payload incomplete: only {self._next} of {total} bytes arrived in order")
        return self._h.digest()

    def abort(self) -> None:
        with self._cv:
            self._closed = True
            self._heap.clear()
            self._cv.notify_all()
        self._payload = None


class TransferAborted(TransportError):
    """A write to or :meth:`IncomingPayload.finalize` of a transfer after :meth:`IncomingPayload.abort`
    (superseded by a later transfer of the same sender and round, or dropped): not a verdict on the state."""


class IncomingPayload:
    """Assembles one transfer (possibly several streams) into preallocated tensors and verifies it.

    Create it from the first stream's header; every stream calls :meth:`open_stream`, then
    :meth:`write` per data chunk, then :meth:`close_stream` with the trailer digest (``None`` when the
    stream ended without one). :meth:`finalize` returns the verified state dict.
    """

    def __init__(
        self,
        tensors: Sequence[TensorEntry],
        total_bytes: int,
        hash_algorithm: str,
        num_streams: int,
        schema: Schema,
        *,
        allow_half: bool = True,
        max_total_bytes: int | None = None,
        label: str = "payload",
    ):
        self.label = label
        # proto3 defaults (peer.proto): an empty hash_algorithm is the default hash, 0 streams is one
        hash_algorithm = hash_algorithm or DEFAULT_HASH
        num_streams = num_streams or 1
        _new_hasher(hash_algorithm)
        if not 1 <= num_streams <= MAX_STREAMS:
            raise TransportError(f"{label}: num_streams={num_streams} outside [1, {MAX_STREAMS}]")
        if max_total_bytes is not None and total_bytes > max_total_bytes:
            raise TransportError(f"{label}: payload of {total_bytes} bytes exceeds the limit of {max_total_bytes}")
        self._validate_table(tensors, total_bytes, schema, allow_half)
        self.entries = list(tensors)
        self.total_bytes = total_bytes
        self.num_streams = num_streams
        self.schema = schema
        self._starts = [e.offset for e in self.entries]
        self._hash_algorithm = hash_algorithm
        self._streams: dict[int, list] = {}  # index -> [start, end, pos, digest, closed]
        self._lock = threading.Lock()
        # one buffer per tensor, allocated at the first byte of payload (not at the header: a stream
        # that sends a header and then nothing costs no memory and no hashing thread)
        self.tensors: dict[str, torch.Tensor] = {}
        self._views: list = []
        self._flat: list[torch.Tensor] = []
        self._hasher: _OrderedHasher | None = None
        self._allocated = False
        self.failed: str | None = None
        self.aborted = False  # a superseded or failed transfer: no write or finalize succeeds after it
        self.received_bytes = 0  # payload bytes written so far
        self._completed = False  # set once, by the close_stream that completed the payload
        # NaN/Inf are found chunk by chunk as bytes arrive (the chunk is still in cache, and the check
        # no longer delays the reply); elements split across two chunks are checked at finalize
        self._non_finite: str | None = None  # the refusal reason of the first NaN/Inf found
        self._straddlers: set[tuple[int, int]] = set()

    # -- validation before allocation --
    def _error(self, cls: type[TransportError], reason: str) -> TransportError:
        return cls(f"{self.label}: {reason}", reason=reason)

    def _validate_table(self, tensors: Sequence[TensorEntry], total: int, schema: Schema, allow_half: bool) -> None:
        """Structure of the table (here) and content against the receiver's schema (:mod:`checks`).

        Linear in the table's size and free of arithmetic on untrusted numbers: an entry is compared
        with the receiver's schema (rank capped first) before its size is computed, and the size is
        computed from the schema's shape.
        """
        seen: set[str] = set()
        pos = 0
        for e in tensors:
            if e.name in seen:
                raise self._error(TransportError, f"tensor {e.name!r} announced twice")
            seen.add(e.name)
            if e.dtype not in WIRE_DTYPES:
                raise self._error(TransportError, f"tensor {e.name!r} has dtype {e.dtype[:40]!r}, not in the wire whitelist {sorted(WIRE_DTYPES)}")
            if len(e.shape) <= checks.MAX_RANK and any(d < 0 for d in e.shape):
                raise self._error(TransportError, f"tensor {e.name!r} has a negative dimension in shape {list(e.shape)}")
            checks.check_entry(e.name, WIRE_DTYPES[e.dtype], e.shape, schema, allow_half=allow_half, label=self.label)
            want_bytes = math.prod(schema.entries[e.name][0]) * torch.empty((), dtype=WIRE_DTYPES[e.dtype]).element_size()
            if e.nbytes != want_bytes:
                raise self._error(TransportError, f"tensor {e.name!r} announces {e.nbytes} bytes but {e.dtype}{list(e.shape)} needs {want_bytes}")
            if e.offset != pos:
                raise self._error(TransportError, f"tensor {e.name!r} at offset {e.offset}, expected {pos} (tensors must be back to back)")
            pos += e.nbytes
        if pos != total:
            raise self._error(TransportError, f"tensor table covers {pos} bytes but total_bytes is {total}")
        checks.check_complete(seen, schema, self.label)

    def _allocate(self) -> None:
        """The buffers and the hasher, once (the table already passed every check)."""
        if self._allocated:
            return
        with self._lock:
            if self._allocated:
                return
            if self.aborted:  # no buffers (nor a hashing thread nobody would stop) after abort
                raise self._error(TransferAborted, "transfer aborted (superseded by another transfer, or dropped)")
            self.tensors = {e.name: alloc_tensor(e.shape, WIRE_DTYPES[e.dtype]) for e in self.entries}
            self._views = [_byte_view(self.tensors[e.name]) if e.nbytes else np.empty(0, np.uint8) for e in self.entries]
            self._flat = [self.tensors[e.name].reshape(-1) for e in self.entries]
            self._hasher = _OrderedHasher(self._hash_algorithm, self)
            self._allocated = True

    def same_table(self, tensors: Sequence[TensorEntry], total: int, num_streams: int) -> bool:
        return list(tensors) == self.entries and total == self.total_bytes and num_streams == self.num_streams

    # -- streaming --
    def _pieces(self, start: int, end: int) -> Iterator[memoryview]:
        return _views_between(self.entries, self._starts, self._views, start, end)

    def open_stream(self, index: int, start: int, end: int) -> None:
        with self._lock:
            if not 0 <= index < self.num_streams:
                raise self._error(TransportError, f"stream index {index} outside [0, {self.num_streams})")
            if index in self._streams:
                raise self._error(TransportError, f"stream {index} opened twice")
            if not 0 <= start <= end <= self.total_bytes:
                raise self._error(TransportError, f"segment [{start}, {end}) outside the payload of {self.total_bytes} bytes")
            for s, e, *_ in self._streams.values():
                if start < e and s < end:
                    raise self._error(TransportError, f"segment [{start}, {end}) of stream {index} overlaps [{s}, {e})")
            self._streams[index] = [start, end, start, None, False]

    def write(self, index: int, offset: int, data: bytes | memoryview) -> None:
        """Copy one chunk into the tensors; chunks of a stream must be contiguous and in order."""
        if self.aborted:
            raise self._error(TransferAborted, "transfer aborted (superseded by another transfer, or dropped)")
        st = self._streams.get(index)
        if st is None:
            raise self._error(TransportError, f"data for stream {index} before its header")
        start, end, pos, _, closed = st
        n = len(data)
        if closed:
            raise self._error(TransportError, f"data after the trailer on stream {index}")
        if offset != pos:
            raise self._error(TransportError, f"chunk at offset {offset} on stream {index}, expected {pos} (chunks out of order or lost)")
        if offset + n > end:
            raise self._error(TransportError, f"chunk [{offset}, {offset + n}) runs past the end of segment [{start}, {end})")
        self._allocate()
        src = np.frombuffer(data, dtype=np.uint8)
        done = 0
        for view in self._pieces(offset, offset + n):
            k = len(view)
            np.copyto(np.asarray(view), src[done : done + k])
            done += k
        self._scan(offset, offset + n)
        st[2] = offset + n
        self.received_bytes += n
        if n:
            self._hasher.add(offset, offset + n)  # type: ignore[union-attr]

    def _scan(self, start: int, end: int) -> None:
        """Check the floating elements that lie wholly in payload bytes ``[start, end)``."""
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        while i < len(self.entries) and self.entries[i].offset < end:
            e, flat = self.entries[i], self._flat[i]
            lo, hi = max(start, e.offset) - e.offset, min(end, e.offset + e.nbytes) - e.offset
            if hi > lo and flat.is_floating_point():
                size = flat.element_size()
                a, b = -(-lo // size), hi // size
                if lo % size:
                    self._straddlers.add((i, lo // size))
                if hi % size:
                    self._straddlers.add((i, hi // size))
                if b > a and self._non_finite is None:
                    self._non_finite = checks.finite_problem(e.name, flat[a:b])
            i += 1

    def close_stream(self, index: int, digest: bytes | None) -> bool:
        """End stream ``index`` with its trailer ``digest``; True for exactly one call: the one that
        completed the payload (so parallel streams finalize it once)."""
        st = self._streams.get(index)
        if st is None:
            raise self._error(TransportError, f"stream {index} ended before its header")
        start, end, pos, _, _ = st
        if pos != end:
            names = self._names_in(pos, end)
            raise self._error(DataLossError,
                f"truncated stream {index}: got {pos - start} of {end - start} bytes; "
                f"incomplete tensors {names[:5]}{'...' if len(names) > 5 else ''}"
            )
        if digest is None:
            raise self._error(DataLossError, f"stream {index} ended without its trailer (hash)")
        with self._lock:
            st[3], st[4] = bytes(digest), True
            done = not self._completed and len(self._streams) == self.num_streams and all(x[4] for x in self._streams.values())
            self._completed = self._completed or done
            return done

    def _names_in(self, start: int, end: int) -> list[str]:
        return [e.name for e in self.entries if e.offset < end and e.offset + e.nbytes > start] or (
            [self.entries[-1].name] if self.entries else []
        )

    @property
    def complete(self) -> bool:
        """True once every stream has closed with its trailer."""
        with self._lock:
            return len(self._streams) == self.num_streams and all(s[4] for s in self._streams.values())

    def abort(self) -> None:
        """Stop this transfer for good: later writes and :meth:`finalize` raise, whatever already arrived."""
        with self._lock:
            self.aborted = True
            hasher = self._hasher
        if hasher is not None:
            hasher.abort()

    def finalize(self) -> StateDict:
        """Verify coverage, hash and finiteness; return ``{name: tensor}`` in the schema's dtypes."""
        if self.aborted:
            raise self._error(TransferAborted, "transfer aborted (superseded by another transfer, or dropped)")
        if not self.complete:
            raise self._error(TransportError, f"finalize before all {self.num_streams} streams completed")
        covered = sum(s[1] - s[0] for s in self._streams.values())
        if covered != self.total_bytes:
            self.abort()
            raise self._error(DataLossError, f"streams cover {covered} of {self.total_bytes} bytes")
        digests = {s[3] for s in self._streams.values()}
        self._allocate()  # a payload of zero bytes had no write
        try:
            got = self._hasher.finish(self.total_bytes)  # type: ignore[union-attr]
        except DataLossError:
            if self.aborted:  # aborted while it was being finalized: not a loss in transit
                raise self._error(TransferAborted, "transfer aborted (superseded by another transfer, or dropped)") from None
            raise
        if len(digests) != 1 or got not in digests:
            raise self._error(DataLossError, f"hash mismatch (payload corrupted in transit or tampered)")
        for i, k in sorted(self._straddlers):
            if self._non_finite is None:
                self._non_finite = checks.finite_problem(self.entries[i].name, self._flat[i][k : k + 1])
        if self._non_finite is not None:
            raise checks.rejected(self._non_finite, self.label)
        out: StateDict = {}
        self._views, self._flat = [], []
        for e in self.entries:
            t = self.tensors.pop(e.name)  # drop each wire buffer as soon as it is converted
            want_dtype = self.schema.entries[e.name][1]
            out[e.name] = t if t.dtype == want_dtype else t.to(want_dtype)
            del t
        return out


def decode_local(state: Mapping[str, torch.Tensor], schema: Schema | None = None, *, num_streams: int = 1,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, half: str | None = None) -> StateDict:
    """Round-trip a state through the wire format in-process (tests and benchmarks)."""
    out = OutgoingPayload(state, half=half)
    inc = IncomingPayload(out.entries, out.total_bytes, out.hash_algorithm, num_streams,
                          schema or Schema.from_state(state))
    digest = out.digest()
    for k, (a, b) in enumerate(segments(out.total_bytes, num_streams)):
        inc.open_stream(k, a, b)
        for off, data in out.chunks(a, b, chunk_bytes):
            inc.write(k, off, data)
        inc.close_stream(k, digest)
    return inc.finalize()
