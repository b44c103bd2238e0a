"""The compression step between the peers and the transport, the same for every transport.

:meth:`Compressor.encode` turns the shared states of this process's peers into payloads after
``Peer.shared_state()`` (and after an attack has replaced them: an attacker compresses too);
the transport moves and checks the payloads and counts their bytes (so ``bytes_sent`` is the
compressed size); :meth:`Compressor.decode` turns what arrived back into model states before
alignment and merging. The decoded states pass the same receive checks as an uncompressed one
(:func:`dimat.transport.checks.check_state`, against the receiver's own model schema), so a payload
that decodes to a wrong shape or to NaN/Inf is refused with the same text, and the model is left
untouched. A payload that cannot be decoded at all is refused with the codec's reason.

State kept here (per process, in memory): error-feedback residuals per local sender, delta
references per local sender and per (local receiver, sender) edge (:mod:`dimat.exchange.reference`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from dimat.exchange.codecs import Codec, CodecError, CodecSettings, get_codec, work_dtype
from dimat.exchange.feedback import Residual
from dimat.exchange.payload import ACKS, META, Meta, compressible, pack, unpack, wire_schema
from dimat.exchange.reference import CHUNK, DELTA, FULL, Incoming, Outgoing
from dimat.transport.base import ExchangeResult, StateDict
from dimat.transport.checks import Receipts, StateRejected, check_state
from dimat.transport.schema import Schema
from dimat.seeds import COMPRESSION, derive_seed

#: the unit-basis tag of a state (dimat.merge.basis.BASIS_KEY; merge is this package's own layer, so
#: not importable here; tests/test_exchange.py checks the two agree)
BASIS_KEY = "_dimat.basis"
#: the smallest auto consensus step (a message that sent almost nothing of its change)
MIN_STEP = 0.05


class Compressor:
    """Encode outgoing states and decode incoming payloads for the peers hosted in this process.

    Args:
        settings: a :class:`dimat.config.ExchangeSettings`.
        n_peers: the federation's size (the length of the ack vector).
        seed: seeds each sender's stream for stochastic rounding and randk (``seed``, sender id).
        consensus: the method's merge is a plain mixing step within one basis
            (:attr:`dimat.methods.Method.choco`), so ``choco_step=auto`` applies there.

    Example:
        >>> from dimat.config import ExchangeSettings
        >>> s = ExchangeSettings("int8", 256, False, 0.1, False, True, "auto", True)
        >>> c = Compressor(s, n_peers=2, seed=0, consensus=True)
        >>> payloads = c.encode(1, {0: {"w": torch.ones(4)}}, {0: [1]})
        >>> sorted(payloads[0])
        ['_dimat.x.acks', '_dimat.x.meta', 'w#q', 'w#s']
    """

    def __init__(self, settings: Any, *, n_peers: int, seed: int, consensus: bool = False) -> None:
        self.settings = settings
        self.codec: Codec = get_codec(CodecSettings(settings.compress, block=settings.block,
                                                    stochastic=settings.stochastic, ratio=settings.ratio,
                                                    raw_vectors=settings.raw_vectors))
        self.delta: bool = settings.delta
        self.feedback: bool = settings.error_feedback and not settings.delta
        step = settings.choco_step
        # a number always applies (the config refused it for a method that does not mix); auto only
        # where the method's merge is a mixing step
        self.choco: float | str | None = step if (isinstance(step, float) or consensus) and self.delta else None
        self.n_peers, self.seed = int(n_peers), int(seed)
        self.outgoing: dict[int, Outgoing] = {}
        self.incoming: dict[tuple[int, int], Incoming] = {}
        self.residuals: dict[int, Residual] = {}
        self._gens: dict[int, torch.Generator] = {}
        self._schemas: dict[Schema, Schema] = {}

    @property
    def active(self) -> bool:
        """False when payloads would equal the states (``none``, no delta): the loop then skips this step."""
        return self.codec.name != "none" or self.delta

    # ----------------------------------------------------------------------------- layout

    def wire_schema(self, model: Schema) -> Schema:
        """The payload schema for a model of schema ``model`` (derived in one place: :func:`wire_schema`)."""
        if model not in self._schemas:
            self._schemas[model] = wire_schema(model, self.codec, n_peers=self.n_peers if self.delta else None)
        return self._schemas[model]

    def payload_schema(self, state: Mapping[str, torch.Tensor]) -> Schema:
        """What a payload for a peer whose shared state is ``state`` looks like (what receivers expect)."""
        return self.wire_schema(Schema.from_state(state))

    def standalone(self, payload: StateDict, own: StateDict) -> StateDict | None:
        """Decode a payload without any reference (a rejoining peer's fetched state), checked against
        ``own``'s schema; None for a message that only means something against a reference (a delta,
        a chunk). Raises :class:`StateRejected` / :class:`CodecError` for a bad one."""
        model = Schema.from_state(own)
        check_state(payload, self.wire_schema(model))
        if self.delta and (Meta.read(payload[META]).kind != FULL):
            return None
        parts, raw = unpack(payload, model, self.codec)
        dec = {k: self.codec.decode(k, parts[k], s, d) for k, (s, d) in model.entries.items() if compressible(d, s, self.codec)}
        return self._checked({**dec, **raw}, model)

    def chunks(self, model: Schema) -> int:
        """Messages a sparse full state takes (1 for a dense codec)."""
        if not self.codec.chunked:
            return 1
        return max([self.codec.chunks(max(1, _numel(s))) for s, d in model.entries.values()
                    if compressible(d, s, self.codec)] or [1])

    # ----------------------------------------------------------------------------- sending

    def _gen(self, sender: int) -> torch.Generator:
        if sender not in self._gens:
            self._gens[sender] = torch.Generator().manual_seed(derive_seed(self.seed, COMPRESSION, sender))
        return self._gens[sender]

    def encode(self, exchange_idx: int, states: Mapping[int, StateDict],
               out_neighbours: Mapping[int, Sequence[int]]) -> dict[int, StateDict]:
        """Every local sender's payload for exchange ``exchange_idx`` (one payload for all its out-neighbours)."""
        return {p: self._encode_one(p, int(exchange_idx), state, list(out_neighbours.get(p, ())))
                for p, state in states.items()}

    def _encode_one(self, p: int, e: int, state: StateDict, outs: list[int]) -> StateDict:
        model = Schema.from_state(state)
        raw = {k: v.detach().clone() for k, v in state.items() if not compressible(v.dtype, v.shape, self.codec)}
        floats = {k: v.detach() for k, v in state.items() if compressible(v.dtype, v.shape, self.codec)}
        gen = self._gen(p)
        if not self.delta:
            parts = {}
            res = self.residuals.setdefault(p, Residual())
            for k, x in floats.items():
                meant = res.meant(k, x.to(work_dtype(x.dtype))) if self.feedback else x
                parts[k] = self.codec.encode(meant, x.dtype, gen)
                if self.feedback:
                    res.keep(k, meant, self.codec.decode(k, parts[k], tuple(x.shape), work_dtype(x.dtype)))
            return pack(parts, raw)
        out = self.outgoing.setdefault(p, Outgoing())
        tag = state.get(BASIS_KEY)
        if self.codec.chunked and out.basis is not None and tag is not None and not torch.equal(out.basis, tag):
            # relabelled units: the change is as large as the state, which a chunked codec's message
            # would take many exchanges to carry (a one-message codec sends it like a full state)
            out.need_full = True
        out.basis = None if tag is None else tag.clone()
        kind, chunk, base = self._next_kind(out, model)
        parts = {}
        new_ref: dict[str, torch.Tensor] = {}
        meant_sq = err_sq = 0.0  # ||d||^2 and ||d - C(d)||^2 of this message: its measured contraction
        for k, x in floats.items():
            wd, shape = work_dtype(x.dtype), tuple(x.shape)
            if kind == FULL:
                d = x.to(wd)
                parts[k] = self.codec.encode(d, x.dtype, gen)
                new_ref[k] = self.codec.decode(k, parts[k], shape, wd)
                meant_sq += float(d.pow(2).sum())
                err_sq += float((d - new_ref[k]).pow(2).sum())
            elif kind == DELTA:
                assert out.ref is not None
                d = x.to(wd) - out.ref[k]
                parts[k] = self.codec.encode(d, x.dtype, gen)
                sent = self.codec.decode(k, parts[k], shape, wd)
                new_ref[k] = out.ref[k] + sent
                meant_sq += float(d.pow(2).sum())
                err_sq += float((d - sent).pow(2).sum())
            else:  # CHUNK: assignment of a stretch of entries, the reference starts from zeros at chunk 0
                parts[k] = self.codec.chunk(x, chunk, x.dtype)
                ref = torch.zeros(shape, dtype=wd) if chunk == 0 or out.ref is None else out.ref[k].clone()
                self.codec.assign(k, ref.view(-1), parts[k], chunk)
                new_ref[k] = ref
        complete = kind != CHUNK or chunk == self.chunks(model) - 1
        if kind != CHUNK:
            out.contraction = 1.0 - err_sq / meant_sq if meant_sq > 0 else 1.0
        out.ref, out.seq = new_ref, e
        out.chunk = None if complete else chunk + 1
        out.need_full = False
        out.expect, out.pending = out.pending, ({q: e for q in outs} if complete else {})
        payload = pack(parts, raw)
        payload[META] = Meta(e, base, kind, chunk).tensor()
        payload[ACKS] = self.acks(p)
        return payload

    def _next_kind(self, out: Outgoing, model: Schema) -> tuple[int, int, int]:
        """(kind, chunk, base) of a sender's next message."""
        if out.ref is None or out.need_full:
            return (CHUNK if self.codec.chunked else FULL), 0, 0
        if out.chunk is not None:
            return CHUNK, out.chunk, out.seq
        return DELTA, 0, out.seq

    def acks(self, q: int) -> torch.Tensor:
        """Local peer ``q``'s acks: the seq of the complete reference it holds for every peer (0: none)."""
        acks = torch.zeros(self.n_peers, dtype=torch.int64)
        for (r, p), inc in self.incoming.items():
            if r == q and 0 <= p < self.n_peers:
                acks[p] = inc.ack
        return acks

    # ----------------------------------------------------------------------------- receiving

    def decode(self, exchange_idx: int, result: ExchangeResult, states: Mapping[int, StateDict]) -> ExchangeResult:
        """``result`` with every received payload decoded into a model state (or refused, or missed).

        ``states`` are the local peers' own (uncompressed) shared states: a receiver checks what it
        decoded against its own model's schema, and CHOCO mixes with its own state.
        """
        receipts = Receipts(exchange_idx, result.received, result.refused)
        expected = {q: set(v) for q, v in result.missing.items()}
        for q, got in result.received.items():
            own = states[q]
            model = Schema.from_state(own)
            expected.setdefault(q, set()).update(got)
            for p, payload in sorted(got.items()):
                try:
                    check_state(payload, self.wire_schema(model))  # the transports did; a direct caller may not have
                    state = self._decode_one(q, p, payload, model, own)
                except (StateRejected, CodecError) as exc:
                    self.incoming.pop((q, p), None)
                    receipts.refuse(q, p, exc.reason if isinstance(exc, StateRejected) else str(exc))
                    continue
                if self.delta:
                    self._heard_acks(p, q, payload[ACKS])
                if state is not None:  # None: a delta this receiver cannot apply, or a chunked full state still arriving
                    receipts.keep(q, p, state)
        if self.choco is not None:
            receipts.received = {q: {p: self._choco(q, st, states[q]) for p, st in got.items()}
                                 for q, got in receipts.received.items()}
        return receipts.result(expected, result.bytes_sent)

    def _decode_one(self, q: int, p: int, payload: StateDict, model: Schema, own: StateDict) -> StateDict | None:
        parts, raw = unpack(payload, model, self.codec)
        shapes = {k: (s, d) for k, (s, d) in model.entries.items() if compressible(d, s, self.codec)}
        if not self.delta:
            dec = {k: self.codec.decode(k, parts[k], s, d) for k, (s, d) in shapes.items()}
            return self._checked({**dec, **raw}, model)
        meta = Meta.read(payload[META])
        inc = self.incoming.get((q, p))
        if meta.kind == CHUNK and meta.chunk >= self.chunks(model):
            raise CodecError(f"chunk {meta.chunk} of a {self.chunks(model)}-chunk state")
        if meta.kind == FULL and self.codec.chunked or meta.kind != FULL and meta.base == 0 and not (
                meta.kind == CHUNK and meta.chunk == 0):
            raise CodecError(f"malformed exchange metadata (kind {meta.kind}, base {meta.base}, chunk {meta.chunk})")
        starts = meta.kind == FULL or (meta.kind == CHUNK and meta.chunk == 0)
        if not starts and (inc is None or inc.seq != meta.base):
            self.incoming.pop((q, p), None)  # stale: the acks now tell the sender to start over
            return None
        new: dict[str, torch.Tensor] = {}
        for k, (s, d) in shapes.items():
            wd = work_dtype(d)
            if meta.kind == FULL:
                new[k] = self.codec.decode(k, parts[k], s, wd)
            elif meta.kind == DELTA:
                new[k] = inc.ref[k] + self.codec.decode(k, parts[k], s, wd)  # type: ignore[union-attr]
            else:
                ref = torch.zeros(s, dtype=wd) if starts else inc.ref[k].clone()  # type: ignore[union-attr]
                self.codec.assign(k, ref.view(-1), parts[k], meta.chunk)
                new[k] = ref
        complete = meta.kind != CHUNK or meta.chunk == self.chunks(model) - 1
        state = self._checked({**{k: new[k].to(shapes[k][1], copy=True) for k in new}, **raw}, model)  # never the reference itself
        self.incoming[(q, p)] = Incoming(new, meta.seq, complete)
        return state if complete else None

    @staticmethod
    def _checked(decoded: StateDict, model: Schema) -> StateDict:
        """The decoded state in the model's own key order, after the receive checks (raises StateRejected)."""
        state = {k: decoded[k] for k in model.entries}
        check_state(state, model)
        return state

    def _heard_acks(self, sender_heard: int, local: int, acks: torch.Tensor) -> None:
        """Local sender ``local`` heard ``sender_heard``'s acks: a stale one means start over with a full state."""
        out = self.outgoing.get(local)
        if out is None or sender_heard not in out.expect:
            return
        if not 0 <= local < acks.numel() or int(acks[local]) != out.expect[sender_heard]:
            out.need_full = True

    def consensus_step(self, q: int) -> float:
        """Local peer ``q``'s CHOCO step: the configured number, or (``auto``) the contraction
        ``delta = 1 - ||d - C(d)||^2 / ||d||^2`` its own last message measured, so a codec that
        sends more of a change takes a larger step (CHOCO-SGD's step scales with delta; int8: ~1)."""
        if isinstance(self.choco, float):
            return self.choco
        mine = self.outgoing.get(q)
        c = mine.contraction if mine is not None else None
        return 1.0 if c is None else min(1.0, max(c, MIN_STEP))

    def _choco(self, q: int, received: StateDict, own: StateDict) -> StateDict:
        """CHOCO's consensus step: ``x_q + gamma (x_hat_p - x_hat_q)`` in place of ``x_hat_p``.

        The merge averages these with the mixing weights (which sum to one), which gives CHOCO's
        update ``x_q + gamma sum_p w_qp (x_hat_p - x_hat_q)``: the public copies are mixed, the own
        model keeps what its neighbours have not received yet (with gamma = 1 the mean of the models
        is conserved exactly, where mixing ``x_hat_p`` with ``x_q`` would lose the senders' residuals).
        ``x_hat_q`` is ``q``'s own public copy (its reference); while that is incomplete, ``x_q``
        stands in for it. Only a state in ``q``'s own unit basis: across bases (a first merge, before
        alignment) public copies cannot be subtracted, and the state passes unchanged.
        """
        if not _same_basis(received, own):
            return dict(received)
        gamma = self.consensus_step(q)
        mine = self.outgoing.get(q)
        ref = mine.ref if mine is not None and mine.chunk is None else None
        out: StateDict = {}
        for k, v in received.items():
            x = own[k]
            if not v.dtype.is_floating_point:
                out[k] = v
                continue
            wd = work_dtype(x.dtype)
            # a raw floating entry (exchange.raw_vectors) is its own public copy
            x_hat = ref[k] if ref is not None and k in ref else x.to(wd)
            out[k] = (x.to(wd) + gamma * (v.to(wd) - x_hat)).to(x.dtype)
        return out


def _same_basis(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    ta, tb = a.get(BASIS_KEY), b.get(BASIS_KEY)
    if ta is None or tb is None:
        return ta is None and tb is None
    return bool(torch.equal(ta, tb))


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


__all__ = ["Compressor"]
