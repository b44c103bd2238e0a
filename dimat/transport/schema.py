"""What a state dict looks like: tensor names, dtypes and shapes (no values).

One type for every transport: the gRPC receiver checks an announced tensor table against it
before allocating, torchdist lays its flat buffers out in its canonical (name-sorted) order and
agrees on it across ranks by its :attr:`Schema.digest`, and InProc checks delivered states with it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

#: dtypes allowed on the gRPC wire (the whitelist), by the names the wire and error messages use
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in WIRE_DTYPES.items()}
HALF_DTYPES = ("float16", "bfloat16")


def dtype_label(dtype: torch.dtype) -> str:
    """The name a dtype has in messages: its wire name, else torch's own (``torch.complex64``)."""
    return DTYPE_NAMES.get(dtype, str(dtype))


@dataclass(frozen=True)
class SchemaEntry:
    """One tensor of a state dict, without its values."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


class Schema:
    """Names, dtypes and shapes of a state dict; equality and hash ignore the key order.

    ``entries`` maps name -> ``(shape, dtype)`` in the state's own order (the order received
    states are returned in); :attr:`canonical` is the name-sorted tuple wire layouts follow.
    """

    __slots__ = ("entries", "canonical", "_digest")

    def __init__(self, entries: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        self.entries: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            str(k): (tuple(int(d) for d in shape), dtype) for k, (shape, dtype) in entries.items()
        }
        self.canonical: tuple[SchemaEntry, ...] = tuple(
            SchemaEntry(k, self.entries[k][1], self.entries[k][0]) for k in sorted(self.entries)
        )
        self._digest: int | None = None

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> "Schema":
        """The schema of ``state``; raises TypeError for an entry that is not a tensor."""
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"state entry {name!r} is {type(t).__name__}, not a tensor")
        return cls({k: (tuple(v.shape), v.dtype) for k, v in state.items()})

    @property
    def names(self) -> list[str]:
        """Tensor names in the state's own order."""
        return list(self.entries)

    @property
    def digest(self) -> int:
        """A non-zero signed 64-bit hash of the canonical entries (0 means "no schema here")."""
        if self._digest is None:
            h = hashlib.blake2b(digest_size=8)
            for e in self.canonical:
                h.update(f"{e.name}\t{e.dtype}\t{','.join(map(str, e.shape))}\n".encode())
            self._digest = int.from_bytes(h.digest(), "little", signed=True) | 1
        return self._digest

    def __iter__(self) -> Iterator[SchemaEntry]:
        return iter(self.canonical)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schema) and self.canonical == other.canonical

    def __hash__(self) -> int:
        return hash(self.canonical)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"Schema({len(self)} tensors, digest {self.digest & ((1 << 64) - 1):016x})"


def state_schema(state: Mapping[str, torch.Tensor]) -> Schema:
    """The :class:`Schema` of ``state`` (same as :meth:`Schema.from_state`)."""
    return Schema.from_state(state)


def schema_hash(schema: Schema) -> int:
    """``schema.digest``: what torchdist's preamble compares across ranks."""
    return schema.digest
