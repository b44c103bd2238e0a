"""The wire form of one compressed state: names, layout, encode and decode of a whole state dict.

A payload is an ordinary state dict of tensors, so every transport carries, hashes and checks it
unchanged. Its layout (:func:`wire_schema`) is a deterministic function of the model's schema and
the exchange settings; every peer of a run therefore expects the same payload schema, which is
what the transports' receive checks (and torchdist's preallocation) compare against.

* floating tensor ``w``: the codec's parts, ``w`` itself for a one-part codec (none, fp16, bf16),
  else ``w#q``, ``w#s`` (quantised codes, scales) or ``w#i``, ``w#v`` (sparse indices, values);
* any other tensor (BatchNorm step counters, the basis tag, masks): raw, under its own name;
* with ``exchange.delta``: :data:`META` (int64 ``[seq, base, kind, chunk]``) and :data:`ACKS`
  (int64, one entry per peer of the federation; :mod:`dimat.exchange.reference`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from dimat.exchange.codecs import Codec, CodecError
from dimat.transport.schema import Schema

META = "_dimat.x.meta"
ACKS = "_dimat.x.acks"
SEP = "#"

from dimat.typing import StateDict


def compressible(dtype: torch.dtype, shape: tuple[int, ...] = (2, 2), codec: Codec | None = None) -> bool:
    """Floating tensors go through the codec; everything else travels raw and exact.

    With ``exchange.raw_vectors`` (``codec.s.raw_vectors``) floating tensors of at most one
    dimension (biases, normalisation weights and running statistics) travel raw too: a few per
    cent of a model's entries, and running variances span decades that one absmax scale per block
    would flatten (a channel of small variance would be normalised by a much larger one).
    """
    if not dtype.is_floating_point:
        return False
    return not (codec is not None and codec.s.raw_vectors and len(shape) <= 1)


def _part(name: str, suffix: str) -> str:
    return f"{name}{SEP}{suffix}" if suffix else name


def wire_schema(model: Schema, codec: Codec, *, n_peers: int | None) -> Schema:
    """The schema of every payload for a model of schema ``model`` (``n_peers``: with delta metadata)."""
    entries: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, (shape, dtype) in model.entries.items():
        if compressible(dtype, shape, codec):
            for suffix, spec in codec.layout(shape, dtype).items():
                entries[_part(name, suffix)] = spec
        else:
            entries[name] = (shape, dtype)
    if n_peers is not None:
        entries[META] = ((4,), torch.int64)
        entries[ACKS] = ((n_peers,), torch.int64)
    return Schema(entries)


def pack(encoded: Mapping[str, Mapping[str, torch.Tensor]], raw: Mapping[str, torch.Tensor]) -> StateDict:
    """A payload from per-tensor codec parts and the raw (non-floating) entries."""
    out: StateDict = {}
    for name, parts in encoded.items():
        for suffix, t in parts.items():
            out[_part(name, suffix)] = t
    out.update(raw)
    return out


def unpack(payload: Mapping[str, torch.Tensor], model: Schema, codec: Codec) -> tuple[dict[str, dict[str, torch.Tensor]], StateDict]:
    """Per-tensor codec parts and raw entries of a payload whose schema already passed the checks."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    raw: StateDict = {}
    for name, (shape, dtype) in model.entries.items():
        if compressible(dtype, shape, codec):
            parts[name] = {suffix: payload[_part(name, suffix)] for suffix in codec.layout(shape, dtype)}
        else:
            raw[name] = payload[name]
    return parts, raw


@dataclass(frozen=True)
class Meta:
    """What a delta-mode payload says about itself (:mod:`dimat.exchange.reference` gives the meaning)."""

    seq: int  # the exchange this message was sent in
    base: int  # the reference it is relative to (its seq), 0 for none
    kind: int  # FULL, DELTA or CHUNK
    chunk: int  # CHUNK: which one

    def tensor(self) -> torch.Tensor:
        return torch.tensor([self.seq, self.base, self.kind, self.chunk], dtype=torch.int64)

    @classmethod
    def read(cls, t: torch.Tensor) -> "Meta":
        seq, base, kind, chunk = (int(v) for v in t.tolist())
        if seq < 1 or base < 0 or kind not in (0, 1, 2) or chunk < 0:
            raise CodecError(f"malformed exchange metadata {[seq, base, kind, chunk]}")
        return cls(seq, base, kind, chunk)


__all__ = ["ACKS", "META", "Meta", "compressible", "pack", "unpack", "wire_schema"]
