"""Codecs: how one floating tensor becomes a few wire tensors, and back.

A codec never sees integer or boolean tensors (step counters, basis tags, masks): those travel
raw and exactly (:mod:`dimat.exchange.payload`). Every codec has a *fixed layout*: the names,
dtypes and shapes of its parts are a function of the tensor's shape and dtype and the settings
only, never of the values. That is what lets every transport check a compressed payload against
the receiver's own (torchdist even preallocates from it), so the layout is derived in one place,
:meth:`Codec.layout`, and :meth:`Codec.encode` must produce exactly that.

Codecs (``exchange.compress``):

* ``none`` — the tensor as is (lossless).
* ``fp16`` / ``bf16`` — a cast (values beyond float16's range saturate to +-65504).
* ``int8`` / ``int4`` — symmetric uniform quantisation with one absmax scale per block of
  ``exchange.block`` entries (``null``: one per tensor); round to nearest, or stochastic rounding
  (unbiased: ``E[decode(encode(x))] = x``). int4 packs two 4-bit codes per byte.
* ``sign`` — scaled sign (EF-SignSGD's compressor): one bit per entry and one float32 scale per
  block, the block's mean absolute value (the scale that minimises the squared error), 28x fewer
  bytes at 256 entries a block. Only meaningful on a change (``exchange.delta``): the reference
  carries what one message did not send into the next.
* ``topk`` / ``randk`` — the ``ceil(ratio * n)`` entries of largest magnitude, or a random
  subset of that size, as (int32 index, value) pairs. A sparse message only makes sense against a
  reference (``exchange.delta``): entries not sent keep the reference's value.

Speed: the dense codecs work through a tensor in cache-sized stretches (:data:`STRETCH` entries),
doing every pass of a stretch (scale, multiply, round, cast) while it is in cache, so a tensor is
read from memory once instead of once per pass (bench/compression.py measures GB/s against a
memcpy in the same run). top-k finds its threshold from a strided sample and partitions only the
entries above it (linear time, no sort of the whole tensor).

Decoding validates what it reads (index range, part shapes); a bad part raises
:class:`CodecError` whose text names the tensor, and the payload is refused like any other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from dimat.typing import work_dtype

#: ``exchange.compress`` values
CODECS = ("none", "fp16", "bf16", "int8", "int4", "sign", "topk", "randk")
#: entries a dense codec processes per stretch (4 float32 per entry: 1 MiB, within a core's L2 cache)
STRETCH = 1 << 18

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]  # part suffix -> (shape, dtype)
Parts = dict[str, torch.Tensor]


class CodecError(ValueError):
    """A compressed tensor that cannot be decoded (its text is the refusal reason)."""


@dataclass(frozen=True)
class CodecSettings:
    """What a codec needs from ``exchange``: its name and its knobs (unused ones are ignored)."""

    name: str
    block: int | None = None  # int8/int4: entries per scale (None: per tensor)
    stochastic: bool = False  # int8/int4: stochastic rounding
    ratio: float = 1.0  # topk/randk: fraction of entries sent
    raw_vectors: bool = False  # tensors of at most one dimension bypass the codec (dimat.exchange.payload.compressible)


def _work(x: torch.Tensor) -> torch.Tensor:
    return x.to(work_dtype(x.dtype))


class Codec:
    """One floating tensor <-> its parts. Subclasses set :attr:`name` and implement the three methods."""

    name = "?"
    #: its own message cannot carry a usable state, so a full state travels in :meth:`chunks`
    #: messages of the same layout (:meth:`chunk`, :meth:`assign`), and neighbours merge it once complete
    chunked = False

    def __init__(self, s: CodecSettings) -> None:
        self.s = s

    def layout(self, shape: tuple[int, ...], dtype: torch.dtype) -> Layout:
        raise NotImplementedError

    def encode(self, x: torch.Tensor, dtype: torch.dtype, gen: torch.Generator | None) -> Parts:
        """Parts for ``x`` (the value, or a difference, in any float dtype) of a model tensor of ``dtype``.

        ``gen`` drives stochastic rounding and randk (the sender's own stream: the receiver reads
        indices from the message, it never has to replay the randomness)."""
        raise NotImplementedError

    def decode(self, name: str, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The dense tensor ``parts`` stand for (sparse codecs: zeros where nothing was sent)."""
        raise NotImplementedError

    def chunks(self, n: int) -> int:
        """How many :meth:`chunk` messages cover a tensor of ``n`` entries (chunked codecs)."""
        return 1

    def chunk(self, x: torch.Tensor, c: int, dtype: torch.dtype) -> Parts:
        """Chunk ``c`` of a full state of ``x``, in this codec's layout (chunked codecs)."""
        raise NotImplementedError

    def assign(self, name: str, ref: torch.Tensor, parts: Mapping[str, torch.Tensor], c: int) -> None:
        """Write chunk ``c`` (``parts``) into the flat reference ``ref``; :class:`CodecError` for a bad one."""
        raise NotImplementedError

    def nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return sum(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in self.layout(shape, dtype).values())


class Identity(Codec):
    name = "none"

    def layout(self, shape, dtype):
        return {"": (tuple(shape), dtype)}

    def encode(self, x, dtype, gen):
        return {"": x.to(dtype).contiguous()}

    def decode(self, name, parts, shape, dtype):
        return parts[""].to(dtype)


class Cast(Codec):
    """fp16 / bf16: one cast each way."""

    def __init__(self, s: CodecSettings, wire: torch.dtype) -> None:
        super().__init__(s)
        self.wire = wire
        self.name = "fp16" if wire == torch.float16 else "bf16"

    def layout(self, shape, dtype):
        return {"": (tuple(shape), self.wire)}

    def encode(self, x, dtype, gen):
        if self.wire == torch.float16 and x.numel():  # saturate instead of turning large values into Inf (refused downstream)
            a = x.detach().reshape(-1).numpy() if x.dtype in (torch.float32, torch.float64) else None
            # two fast reductions decide whether a clamp (a pass and a copy) is needed at all
            if a is None or not (-65504.0 <= a.min() and a.max() <= 65504.0):
                x = x.clamp(-65504.0, 65504.0)
        return {"": x.to(self.wire)}

    def decode(self, name, parts, shape, dtype):
        return parts[""].to(dtype)


class Quantise(Codec):
    """int8 / int4 with absmax scales per block: ``code = round(x / scale * L)``, ``L`` = 127 or 7."""

    def __init__(self, s: CodecSettings, bits: int) -> None:
        super().__init__(s)
        self.bits, self.levels, self.name = bits, (127 if bits == 8 else 7), f"int{bits}"

    def _blocks(self, n: int) -> tuple[int, int]:
        b = n if not self.s.block else min(self.s.block, max(n, 1))
        b = max(b, 1)
        return b, -(-n // b)  # block size, number of blocks

    def layout(self, shape, dtype):
        n = math.prod(shape)
        _, nb = self._blocks(n)
        codes = (n,) if self.bits == 8 else ((n + 1) // 2,)
        return {"q": (codes, torch.int8 if self.bits == 8 else torch.uint8), "s": ((nb,), torch.float32)}

    def encode(self, x, dtype, gen):
        a = _work(x).detach().reshape(-1).contiguous().numpy()
        n = a.size
        b, nb = self._blocks(n)
        codes = np.empty(n, np.int8)
        scale = np.empty(nb, a.dtype)
        rows = max(1, STRETCH // b)  # whole blocks per stretch
        t = np.empty(rows * b, a.dtype)
        noise = None
        for r0 in range(0, nb, rows):  # every pass of a stretch while it is in cache
            lo, hi = r0 * b, min(n, (r0 + rows) * b)
            c, tc = _blocked(a[lo:hi], b), t[: (-(-(hi - lo) // b)) * b].reshape(-1, b)
            sc = np.maximum(c.max(axis=1), -c.min(axis=1))
            sc[sc == 0] = 1  # an all-zero block: any scale decodes to 0
            scale[r0 : r0 + len(sc)] = sc
            np.multiply(c, (self.levels / sc)[:, None], out=tc)
            if self.s.stochastic:  # floor(v + u), u ~ U[0, 1): unbiased
                noise = torch.rand(tc.size, generator=gen, dtype=torch.float64 if a.dtype == np.float64
                                   else torch.float32).numpy().reshape(tc.shape)
                np.add(tc, noise, out=tc)
                np.floor(tc, out=tc)
                np.clip(tc, -self.levels, self.levels, out=tc)
            else:
                np.rint(tc, out=tc)  # |t| <= levels already: no clamp needed
            codes[lo:hi] = tc.reshape(-1)[: hi - lo]
        if self.bits == 4:  # two's-complement nibbles, low nibble first
            if n % 2:
                codes = np.concatenate([codes, np.zeros(1, np.int8)])
            codes = ((codes[0::2] & 0x0F) | (codes[1::2] << 4)).view(np.uint8)
        return {"q": torch.from_numpy(codes), "s": torch.from_numpy(scale).float().contiguous()}

    def decode(self, name, parts, shape, dtype):
        n = math.prod(shape)
        b, nb = self._blocks(n)
        q = parts["q"].contiguous().numpy()
        if self.bits == 4:
            packed = q.view(np.int8)
            codes = np.empty(2 * packed.size, np.int8)
            low = codes[0::2]
            np.bitwise_and(packed, 0x0F, out=low)
            np.bitwise_xor(low, 8, out=low)
            np.subtract(low, 8, out=low)  # sign-extend the low nibble
            np.right_shift(packed, 4, out=codes[1::2])  # arithmetic shift keeps the sign
            codes = codes[:n]
        else:
            codes = q
        wd = np.float64 if dtype == torch.float64 else np.float32
        step = (parts["s"].numpy().astype(wd) / self.levels)
        out, lowest = _scaled(codes, step, b, wd)
        if lowest < -self.levels:  # -128 / -8: not a code this encoder writes
            raise CodecError(f"tensor {name!r}: {self.name} code below -{self.levels}")
        return torch.from_numpy(out).reshape(shape).to(dtype)


class Sign(Codec):
    """Scaled sign: bit ``x < 0`` per entry (packed 8 a byte, low bit first), one scale per block =
    the block's mean ``|x|``. ``decode = scale * (1 - 2 bit)``; every bit pattern decodes.

    A full state (no reference yet, or the sender's units were relabelled) cannot be a sign message:
    it travels as :data:`SIGN_CHUNKS` chunks, chunk ``c`` the ``c``-th quarter of the entries in
    int4 (two codes a byte fill the bit buffer exactly; its scales use the scale slots)."""

    name = "sign"
    chunked = True

    def _blocks(self, n: int) -> tuple[int, int]:
        b = max(1, n if not self.s.block else min(self.s.block, max(n, 1)))
        return b, -(-n // b)

    def layout(self, shape, dtype):
        n = math.prod(shape)
        return {"q": (((n + 7) // 8,), torch.uint8), "s": ((self._blocks(n)[1],), torch.float32)}

    def encode(self, x, dtype, gen):
        a = _work(x).detach().reshape(-1).contiguous().numpy()
        n = a.size
        b, nb = self._blocks(n)
        scale = np.empty(nb, np.float64)
        rows = max(1, STRETCH // b)
        t = np.empty(rows * b, a.dtype)
        for r0 in range(0, nb, rows):
            lo, hi = r0 * b, min(n, (r0 + rows) * b)
            c = _blocked(a[lo:hi], b)
            tc = t[: c.size].reshape(c.shape)
            np.abs(c, out=tc)
            scale[r0 : r0 + c.shape[0]] = tc.sum(axis=1, dtype=np.float64)
        counts = np.full(nb, float(b))
        if nb * b != n:
            counts[-1] = n - (nb - 1) * b  # the last block's padding is not an entry
        bits = np.packbits(np.signbit(a), bitorder="little")
        return {"q": torch.from_numpy(bits), "s": torch.from_numpy((scale / counts).astype(np.float32))}

    def decode(self, name, parts, shape, dtype):
        n = math.prod(shape)
        b, _ = self._blocks(n)
        wd = np.float64 if dtype == torch.float64 else np.float32
        signs = np.unpackbits(parts["q"].numpy(), count=n, bitorder="little").view(np.int8)
        signs = (1 - 2 * signs).astype(np.int8)  # +1 / -1
        return torch.from_numpy(_scaled(signs, parts["s"].numpy().astype(wd), b, wd)[0]).reshape(shape).to(dtype)


    # ------------------------------------------------------------------ full state in int4 chunks
    def chunks(self, n: int) -> int:
        return SIGN_CHUNKS

    def _span(self, n: int, c: int) -> tuple[int, int]:
        m = -(-n // SIGN_CHUNKS)
        lo = min(n, c * m)
        return lo, min(n, lo + m)

    def chunk(self, x, c, dtype):
        flat = x.detach().reshape(-1)
        n = flat.numel()
        lay = self.layout((n,), dtype)
        lo, hi = self._span(n, c)
        q = torch.zeros(lay["q"][0], dtype=torch.uint8)
        sc = torch.ones(lay["s"][0], dtype=torch.float32)
        if hi > lo:
            part = Quantise(self.s, 4).encode(flat[lo:hi], dtype, None)
            q[: part["q"].numel()] = part["q"]
            sc[: part["s"].numel()] = part["s"]
        return {"q": q, "s": sc}

    def assign(self, name, ref, parts, c):
        n = ref.numel()
        lo, hi = self._span(n, c)
        if hi > lo:
            four = Quantise(self.s, 4)
            lay = four.layout((hi - lo,), ref.dtype)
            sub = {"q": parts["q"][: lay["q"][0][0]], "s": parts["s"][: lay["s"][0][0]]}
            ref[lo:hi] = four.decode(name, sub, (hi - lo,), ref.dtype)


#: messages a sign codec's full state takes (int4 entries fill the 1-bit buffer in 4)
SIGN_CHUNKS = 4


def _blocked(a: "np.ndarray", b: int) -> "np.ndarray":
    """``a`` as rows of ``b`` entries; a partial last row is padded with zeros (a copy of that stretch only)."""
    if a.size % b == 0:
        return a.reshape(-1, b)
    out = np.zeros((-(-a.size // b)) * b, a.dtype)
    out[: a.size] = a
    return out.reshape(-1, b)


def _scaled(codes: "np.ndarray", step: "np.ndarray", b: int, wd: type) -> tuple["np.ndarray", int]:
    """``codes * step[block]`` in ``wd`` and the lowest code, stretch by stretch (one pass over memory)."""
    n = codes.size
    out = np.empty(n, wd)
    lowest = 0
    full = (n // b) * b
    rows = max(1, STRETCH // b)
    for r0 in range(0, full // b, rows):
        lo, hi = r0 * b, min(full, (r0 + rows) * b)
        c = codes[lo:hi]
        lowest = min(lowest, int(c.min()))  # while the stretch is in cache
        np.multiply(c.reshape(-1, b), step[r0 : r0 + (hi - lo) // b, None], out=out[lo:hi].reshape(-1, b))
    if full < n:
        lowest = min(lowest, int(codes[full:].min()))
        np.multiply(codes[full:], step[-1], out=out[full:])
    return out, lowest


class Sparse(Codec):
    """topk / randk: ``k = ceil(ratio * n)`` (index, value) pairs; values in float32 (float64 for float64)."""

    chunked = True

    def __init__(self, s: CodecSettings, random: bool) -> None:
        super().__init__(s)
        self.random, self.name = random, ("randk" if random else "topk")

    def k(self, n: int) -> int:
        return max(1, min(n, math.ceil(self.s.ratio * n))) if n else 0

    def layout(self, shape, dtype):
        k = self.k(math.prod(shape))
        return {"i": ((k,), torch.int32), "v": ((k,), work_dtype(dtype))}

    def encode(self, x, dtype, gen):
        flat = x.detach().reshape(-1)
        n = flat.numel()
        k = self.k(n)
        if self.random:  # one entry per stratum of n/k entries: k distinct, sorted, each entry equally likely
            stride = n / k
            u = torch.rand(k, generator=gen, dtype=torch.float64)
            idx = ((torch.arange(k, dtype=torch.float64) + u) * stride).long().clamp_(max=n - 1)
        else:
            idx = torch.from_numpy(_top_indices(_work(flat).numpy(), k))
        return {"i": idx.to(torch.int32), "v": flat[idx].to(work_dtype(dtype)).contiguous()}

    def chunk(self, x: torch.Tensor, c: int, dtype: torch.dtype) -> Parts:
        """Entries ``c*k .. c*k+k-1`` of ``x`` (indices clamped to the last entry: a short final chunk
        repeats it, which assignment makes harmless): a dense state sent in the sparse layout."""
        flat = x.reshape(-1)
        n = flat.numel()
        k = self.k(n)
        idx = torch.arange(c * k, c * k + k).clamp_(max=max(n - 1, 0))
        return {"i": idx.to(torch.int32), "v": flat[idx].to(work_dtype(dtype)).contiguous()}

    def chunks(self, n: int) -> int:
        """How many :meth:`chunk` messages cover a tensor of ``n`` entries."""
        return -(-n // self.k(n)) if n else 1

    def assign(self, name, ref, parts, c):
        ref[self.indices(name, parts, ref.numel())] = parts["v"].to(ref.dtype)

    def indices(self, name: str, parts: Mapping[str, torch.Tensor], n: int) -> torch.Tensor:
        idx = parts["i"].long()
        if idx.numel() and (idx.min() < 0 or idx.max() >= n):
            raise CodecError(f"tensor {name!r}: sparse index out of range [0, {n})")
        return idx

    def decode(self, name, parts, shape, dtype):
        n = math.prod(shape)
        out = torch.zeros(n, dtype=dtype)
        out[self.indices(name, parts, n)] = parts["v"].to(dtype)
        return out.reshape(shape)


def _top_indices(a: "np.ndarray", k: int) -> "np.ndarray":
    """Indices of the ``k`` entries of largest magnitude, ascending (ties at the threshold: the first ones).

    Threshold selection, not a sort: a strided sample of about 16k entries estimates a magnitude
    a little below the k-th largest, one comparison pass keeps the entries above it (a few times
    k), and ``np.partition`` over those alone finds the exact threshold. When the estimate keeps
    fewer than k entries (a sample that missed), it falls back to partitioning all of them.
    """
    n = a.size
    if k >= n:
        return np.arange(n)
    cand = None
    if n > 1 << 16:
        sample = np.abs(a[:: n >> 14])
        # rank in the sample a margin above k's (binomial spread ~ sqrt(expected count)), so the
        # kept set holds all of the top k with overwhelming probability
        want = k * sample.size / n
        rank = min(sample.size - 1, int(want + 4 * math.sqrt(want) + 8))
        lower = np.partition(sample, sample.size - 1 - rank)[sample.size - 1 - rank]
        found, mag = [], np.empty(min(n, STRETCH), a.dtype)
        for lo in range(0, n, STRETCH):  # |a| and the comparison while a stretch is in cache
            m = mag[: min(STRETCH, n - lo)]
            np.abs(a[lo : lo + m.size], out=m)
            found.append(np.flatnonzero(m >= lower) + lo)
        cand = np.concatenate(found)
        if cand.size < k:
            cand = None
    if cand is None:
        cand = np.arange(n)
    cm = np.abs(a[cand])
    thr = np.partition(cm, cm.size - k)[cm.size - k]
    keep = cm >= thr
    if int(keep.sum()) == k:  # no ties at the threshold: the top k, already ascending
        return cand[keep]
    above = cand[cm > thr]
    ties = cand[cm == thr][: k - above.size]
    return np.sort(np.concatenate([above, ties]))


_BUILDERS: dict[str, Callable[[CodecSettings], Codec]] = {
    "none": Identity,
    "fp16": lambda s: Cast(s, torch.float16),
    "bf16": lambda s: Cast(s, torch.bfloat16),
    "int8": lambda s: Quantise(s, 8),
    "int4": lambda s: Quantise(s, 4),
    "sign": Sign,
    "topk": lambda s: Sparse(s, random=False),
    "randk": lambda s: Sparse(s, random=True),
}
assert tuple(_BUILDERS) == CODECS
#: codecs whose message is a sparse update (meaningful only against a reference): the ``Sparse`` ones
SPARSE = tuple(n for n, build in _BUILDERS.items() if isinstance(build(CodecSettings(n)), Sparse))
#: codecs meaningful only on a change (``exchange.delta``): the sparse ones and sign (a state's
#: signs alone would set every weight of a block to one magnitude)
CHANGE_ONLY = SPARSE + ("sign",)
#: lossless codecs (``exchange.delta=auto`` sends a change for every other one)
LOSSLESS = ("none",)


def get_codec(s: CodecSettings) -> Codec:
    """The codec ``s.name`` names; ``ValueError`` for an unknown one."""
    if s.name not in _BUILDERS:
        raise ValueError(f"exchange.compress must be one of {', '.join(CODECS)} (got {s.name!r})")
    return _BUILDERS[s.name](s)


__all__ = ["CHANGE_ONLY", "CODECS", "LOSSLESS", "SPARSE", "Codec", "CodecError", "CodecSettings", "get_codec", "work_dtype"]
