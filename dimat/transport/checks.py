"""The checks a received state must pass before a peer may use it, on every transport.

A state is accepted only if its names, dtypes and shapes equal the receiver's own schema (a half
precision payload is allowed for float32/float64 entries only where the encoding says so) and no
floating tensor holds NaN/Inf. This module is the only place that words those failures, so a bad
state is refused with the same text whether it came over gRPC, gloo/NCCL or in-process.

gRPC calls the per-entry functions as the tensor table and chunks stream in (nothing is allocated
for a table that fails, NaN is found chunk by chunk); InProc and TorchDist call
:func:`check_state` on every delivered state.

:class:`Receipts` is the one receive path: every transport and the compressor record each delivery
of an exchange through it (check the state, word a refusal, record it, derive ``missing``), so the
bookkeeping is written once.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from dimat.transport.base import ExchangeResult, StateDict, TransportError
from dimat.transport.schema import HALF_DTYPES, Schema, dtype_label


#: caps on an announced tensor, checked before any arithmetic on its (untrusted) dimensions
MAX_RANK = 32
MAX_ELEMENTS = 1 << 40


def bounded_numel(shape: Sequence[int], cap: int = MAX_ELEMENTS) -> int | None:
    """The product of ``shape``, or ``None`` once it exceeds ``cap`` (never builds a huge integer)."""
    n = 1
    for d in shape:
        n *= int(d)
        if n > cap:
            return None
    return n


class StateRejected(TransportError):
    """A received state failed a receive check; ``reason`` reads the same on every transport."""


def rejected(reason: str, label: str | None = None) -> StateRejected:
    """The error for ``reason``, prefixed with ``label`` (who/where) when given."""
    return StateRejected(f"{label}: {reason}" if label else reason, reason=reason)


def refusal_message(sender: int, round_idx: int, reason: str) -> str:
    """The line :attr:`ExchangeResult.refused` holds for a refused state."""
    return f"state from peer {sender} for round {round_idx}: {reason}"


def check_entry(name: str, dtype: torch.dtype, shape: Sequence[int], schema: Schema, *,
                allow_half: bool = False, label: str | None = None) -> None:
    """One announced/received tensor against the receiver's schema (name known, rank, shape, dtype).

    Linear in the announcement's size: the rank is capped before the shape is compared, and the
    shape is compared with the schema's before anything multiplies its dimensions.
    """
    if name not in schema.entries:
        shown = name if len(name) <= 200 else name[:200] + "..."
        raise rejected(f"unexpected tensor {shown!r} (not in the receiver's model)", label)
    want_shape, want_dtype = schema.entries[name]
    if len(shape) > MAX_RANK:
        raise rejected(f"tensor {name!r} has {len(shape)} dimensions (at most {MAX_RANK}), expected {list(want_shape)}", label)
    if tuple(shape) != tuple(want_shape):
        raise rejected(f"tensor {name!r} has shape {list(shape)}, expected {list(want_shape)}", label)
    if bounded_numel(want_shape) is None:
        raise rejected(f"tensor {name!r} has more than {MAX_ELEMENTS} elements", label)
    half_ok = allow_half and dtype_label(dtype) in HALF_DTYPES and want_dtype in (torch.float32, torch.float64)
    if dtype != want_dtype and not half_ok:
        raise rejected(f"tensor {name!r} has dtype {dtype_label(dtype)}, expected {dtype_label(want_dtype)}", label)


def check_complete(names: Iterable[str], schema: Schema, label: str | None = None) -> None:
    """Every tensor of the receiver's schema is among ``names``."""
    seen = set(names)
    missing = [k for k in schema.entries if k not in seen]
    if missing:
        raise rejected(f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)} of {len(schema)})", label)


_FINITE_BLOCK = 1 << 18  # elements; small blocks keep the temporary mask in cache (~10x faster than one pass)


def non_finite(t: torch.Tensor) -> str | None:
    """``"NaN"``/``"Inf"`` if a floating tensor holds one, else ``None`` (ints and bools are always fine)."""
    if not t.is_floating_point() or t.numel() == 0:
        return None
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        return "NaN" if torch.isnan(flat).any() else ("Inf" if torch.isinf(flat).any() else None)
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: all-ones exponent bits mean NaN/Inf
        bits, mask = flat.view(torch.int16).numpy().view(np.uint16), np.uint16(0x7F80)
        for i in range(0, bits.size, _FINITE_BLOCK):
            block = bits[i : i + _FINITE_BLOCK]
            hit = (block & mask) == mask
            if hit.any():
                return "NaN" if ((block[hit] & np.uint16(0x7F)) != 0).any() else "Inf"
        return None
    arr = flat.numpy()
    for i in range(0, arr.size, _FINITE_BLOCK):
        block = arr[i : i + _FINITE_BLOCK]
        if not np.isfinite(block).all():
            return "NaN" if np.isnan(block).any() else "Inf"
    return None


def finite_problem(name: str, t: torch.Tensor) -> str | None:
    """The refusal reason if ``t`` (all or part of tensor ``name``) holds NaN/Inf, else ``None``."""
    bad = non_finite(t)
    return None if bad is None else f"tensor {name!r} contains {bad}"


def check_finite(name: str, t: torch.Tensor, label: str | None = None) -> None:
    problem = finite_problem(name, t)
    if problem is not None:
        raise rejected(problem, label)


def check_state(state: Mapping[str, torch.Tensor], schema: Schema, *, allow_half: bool = False,
                label: str | None = None) -> None:
    """A whole received state against the receiving peer's own schema; raises :class:`StateRejected`."""
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise rejected(f"entry {name!r} is {type(t).__name__}, not a tensor", label)
        check_entry(name, t.dtype, tuple(t.shape), schema, allow_half=allow_half, label=label)
    check_complete(state, schema, label)
    for name, t in state.items():
        check_finite(name, t, label)


def verdict(state: Mapping[str, torch.Tensor], schema: Schema, *, allow_half: bool = False) -> str | None:
    """``None`` if ``state`` passes :func:`check_state` against ``schema``, else the refusal reason."""
    try:
        check_state(state, schema, allow_half=allow_half)
    except StateRejected as exc:
        return exc.reason
    return None


class Receipts:
    """The receive bookkeeping of one exchange for the peers hosted in this process.

    Every transport and the compressor record what reached a local receiver here: a state that
    passed the checks (:meth:`deliver`, :meth:`keep`) or the reason it was refused (:meth:`refuse`,
    worded by :func:`refusal_message`); :meth:`result` derives ``missing`` (expected senders whose
    state was not kept) and builds the :class:`~dimat.transport.base.ExchangeResult`. So a refusal
    reads, and is recorded, the same on every transport.

    Args:
        round_idx: the exchange number the refusal lines name.
        receivers: the local receivers (each gets an entry, possibly empty, in the result).
        refused: refusal lines already recorded upstream (``receiver -> sender -> line``), kept.
    """

    def __init__(self, round_idx: int, receivers: Iterable[int],
                 refused: Mapping[int, Mapping[int, str]] | None = None) -> None:
        self.round_idx = int(round_idx)
        self.received: dict[int, dict[int, StateDict]] = {int(q): {} for q in receivers}
        self.refused: dict[int, dict[int, str]] = {q: {} for q in self.received}
        for q, lines in (refused or {}).items():
            self.refused.setdefault(int(q), {}).update(lines)

    def keep(self, receiver: int, sender: int, state: StateDict) -> None:
        """Record ``state`` as received (it already passed the checks against ``receiver``'s schema)."""
        self.received.setdefault(receiver, {})[sender] = state
        self.refused.get(receiver, {}).pop(sender, None)

    def refuse(self, receiver: int, sender: int, reason: str) -> None:
        """Record that ``receiver`` refused ``sender``'s state for ``reason`` (the checks' wording)."""
        self.received.get(receiver, {}).pop(sender, None)
        self.refused.setdefault(receiver, {})[sender] = refusal_message(sender, self.round_idx, reason)

    def record(self, receiver: int, sender: int, state: StateDict, reason: str | None) -> bool:
        """Keep ``state`` when ``reason`` is None (a verdict computed once for several receivers), else refuse it."""
        if reason is None:
            self.keep(receiver, sender, state)
            return True
        self.refuse(receiver, sender, reason)
        return False

    def deliver(self, receiver: int, sender: int, state: StateDict, schema: Schema, *,
                allow_half: bool = False) -> bool:
        """Check ``state`` against ``receiver``'s ``schema``, then keep or refuse it; True if kept."""
        return self.record(receiver, sender, state, verdict(state, schema, allow_half=allow_half))

    def result(self, expected: Mapping[int, Iterable[int]], bytes_sent: Mapping[int, int]) -> ExchangeResult:
        """The exchange's result: ``missing[q]`` is every sender ``expected[q]`` lists whose state was not kept.

        Args:
            expected: local receiver -> the senders it listened for (its in-neighbours).
            bytes_sent: local sender -> payload bytes it sent (the transport's count).
        """
        missing = {q: sorted({int(i) for i in expected.get(q, ())} - set(got)) for q, got in self.received.items()}
        return ExchangeResult(self.received, missing, self.refused, dict(bytes_sent))


__all__ = [
    "MAX_ELEMENTS", "MAX_RANK", "bounded_numel", "StateRejected", "rejected", "refusal_message", "check_entry", "check_complete", "check_finite",
    "check_state", "finite_problem", "non_finite", "verdict", "Receipts",
]
