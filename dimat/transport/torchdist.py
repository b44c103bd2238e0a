"""Weight exchange over ``torch.distributed`` (gloo on CPU, NCCL on CUDA) under ``torchrun``.

Peers and ranks
    ``n_peers`` peers are spread over ``world_size`` ranks in contiguous blocks, the first
    ``n_peers % world_size`` ranks taking one extra peer (``numpy.array_split`` order): 64 peers on
    4 ranks gives ranks 0..3 the peers 0-15, 16-31, 32-47, 48-63; 10 peers on 4 ranks gives
    0-2, 3-5, 6-7, 8-9. With ``n_peers == world_size`` the rank *is* the peer id. Every rank
    computes the same assignment, so nobody has to be told where a peer lives.

One exchange, seen from one rank
    1. *Preamble* (one tiny ``all_gather``): every rank contributes the round, a hash of the
       model schema (names, dtypes, shapes), its length, and order-independent hashes of the edges
       it will send and receive. All ranks see all rows, so all of them take the *same* decision:
       either every rank proceeds, or every rank raises :class:`TransportError` (schema or round
       mismatch, in/out neighbour maps that disagree across ranks, bad arguments). No rank is ever
       left blocked in a send its partner refused, and the process group stays usable.
    2. *Payload* (one ``batch_isend_irecv``): per cross-rank edge (local peer -> remote peer) a
       small int64 header (magic, round, sender, receiver, schema hash, length) followed by one
       flat buffer per dtype. Receivers preallocate from their own schema (the model is the same
       on every peer). Messages are posted in ``(sender, receiver)`` order on both sides, so the
       per-rank-pair sequences match (NCCL matches point-to-point ops by order, gloo by order
       within a tag). A header that does not match what was expected raises
       :class:`TransportError` and the received bytes are discarded.
    Edges between peers of the same rank are delivered in memory (copies).

Failure
    A rank that dies or stalls makes the collectives of the others time out (``pg_timeout`` or
    the per-exchange ``timeout``); the exchange then raises :class:`TransportError`. Unlike gRPC,
    a synchronous process group cannot drop a late neighbour and carry on: recovery is torchrun's
    restart of all workers, which resume from their checkpoints (see ``docs/torchdist.md``).
"""
from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.distributed as dist

from dimat.transport.base import ExchangeResult, StateDict, TransportError
from dimat.transport.checks import Receipts
from dimat.transport.schema import Schema, schema_hash, state_schema

__all__ = [
    "TorchDistTransport",
    "peers_for_rank",
    "rank_of_peer",
    "state_schema",
    "schema_hash",
]

_MAGIC = 0x44494D4154  # "DIMAT"
_EDGE_MOD = 1 << 62
# Preamble layout (int64): magic, round, schema hash, schema bytes, send-edge sum, recv-edge sum,
# error code, number of edges sent. Error codes: 0 ok, 1 bad arguments, 2 local schema conflict.
_PRE_LEN = 8
_HDR_LEN = 6


# ----------------------------------------------------------------------------- peer placement


def _check_sizes(world_size: int, n_peers: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if n_peers < 1:
        raise ValueError(f"n_peers must be >= 1, got {n_peers}")


def peers_for_rank(rank: int, world_size: int, n_peers: int) -> range:
    """The contiguous block of peer ids hosted by ``rank`` (may be empty when n_peers < world_size)."""
    _check_sizes(world_size, n_peers)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    base, extra = divmod(n_peers, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def rank_of_peer(peer: int, world_size: int, n_peers: int) -> int:
    """The rank hosting ``peer`` under the contiguous-block assignment of :func:`peers_for_rank`."""
    _check_sizes(world_size, n_peers)
    if not 0 <= peer < n_peers:
        raise ValueError(f"peer {peer} out of range for n_peers {n_peers}")
    base, extra = divmod(n_peers, world_size)
    big = extra * (base + 1)  # peers held by the ranks with one extra peer
    if peer < big:
        return peer // (base + 1)
    return extra + (peer - big) // base


# ----------------------------------------------------------------------------- schema


# One Schema type for every transport (dimat.transport.schema); the layout follows its canonical
# (name-sorted) order and the preamble compares its digest.


def _wire_dtype(dtype: torch.dtype) -> torch.dtype:
    # Backends reduce nothing here, they only move bytes; bool travels as uint8 for NCCL's sake.
    return torch.uint8 if dtype == torch.bool else dtype


@dataclass(frozen=True)
class _Layout:
    """Where each entry lives in the per-dtype flat buffers of one message."""

    schema: Schema
    hash: int
    nbytes: int
    # per buffer: (wire dtype, numel, entries as (name, dtype, shape, offset, numel))
    buffers: tuple[tuple[torch.dtype, int, tuple[tuple[str, torch.dtype, tuple[int, ...], int, int], ...]], ...]

    @classmethod
    def of(cls, schema: Schema) -> "_Layout":
        groups: dict[torch.dtype, list[tuple[str, torch.dtype, tuple[int, ...]]]] = {}
        for e in schema.canonical:
            groups.setdefault(_wire_dtype(e.dtype), []).append((e.name, e.dtype, e.shape))
        buffers = []
        nbytes = 0
        for wdt in sorted(groups, key=str):
            entries, off = [], 0
            for name, dtype, shape in groups[wdt]:
                numel = 1
                for s in shape:
                    numel *= s
                entries.append((name, dtype, shape, off, numel))
                off += numel
            buffers.append((wdt, off, tuple(entries)))
            nbytes += off * torch.empty((), dtype=wdt).element_size()
        return cls(schema, schema.digest, nbytes, tuple(buffers))

    def pack(
        self, state: Mapping[str, torch.Tensor], device: torch.device, out: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Flat per-dtype buffers of ``state``; written into ``out`` (reused send buffers) when given.

        A dtype group holding one contiguous tensor already on ``device`` is sent as a view,
        without a copy (the caller does not touch its states while the exchange runs).
        """
        bufs = []
        for i, (wdt, numel, entries) in enumerate(self.buffers):
            if len(entries) == 1:
                t = state[entries[0][0]].detach()
                if t.device == device and t.is_contiguous():
                    t = t.reshape(-1)
                    bufs.append(t.view(torch.uint8) if t.dtype == torch.bool else t)
                    continue
            buf = out[i] if out is not None else torch.empty(numel, dtype=wdt, device=device)
            for name, dtype, _shape, off, n in entries:
                t = state[name].detach().reshape(-1)
                buf[off : off + n].copy_(t.view(torch.uint8) if dtype == torch.bool else t)
            bufs.append(buf)
        return bufs

    def empty(self, device: torch.device) -> list[torch.Tensor]:
        return [torch.empty(numel, dtype=wdt, device=device) for wdt, numel, _ in self.buffers]

    def wire_mask(self) -> list[bool]:
        """Which buffers travel: empty ones (only zero-size entries of that dtype) are skipped on both sides."""
        return [numel > 0 for _wdt, numel, _ in self.buffers]

    def unpack(self, buffers: Sequence[torch.Tensor], order: Sequence[str]) -> StateDict:
        flat: StateDict = {}
        for (wdt, _numel, entries), buf in zip(self.buffers, buffers):
            buf = buf.cpu()
            for name, dtype, shape, off, n in entries:
                t = buf[off : off + n]
                flat[name] = (t.view(torch.bool) if dtype == torch.bool else t).view(shape)
        return {name: flat[name] for name in order}


@dataclass
class _Plan:
    """One rank's view of an exchange before the preamble: its edges, its layout, or its local error."""

    sends: list[tuple[int, int]] = field(default_factory=list)  # (sender, receiver), sender hosted here
    recvs: list[tuple[int, int]] = field(default_factory=list)  # (sender, receiver), receiver hosted here
    layout: _Layout | None = None
    error: BaseException | None = None  # raised after the preamble, so every rank takes the same decision
    code: int = 0  # 0 ok, 1 bad arguments, 2 local schema conflict


def _edge_hash(sender: int, receiver: int) -> int:
    d = hashlib.blake2b(f"{sender}>{receiver}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") % _EDGE_MOD


# ----------------------------------------------------------------------------- transport


def _elastic_store(timeout: datetime.timedelta) -> dist.Store | None:
    """torchrun's store, namespaced by restart attempt; None outside torchrun.

    After torchrun restarts the workers they rendezvous again on the *same* store, where the
    previous attempt's keys (e.g. gloo's listening addresses of dead processes) are still present:
    plain ``env://`` init then connects to a stale address and fails ("Connection refused",
    pytorch/pytorch#167288). A per-attempt key prefix gives every attempt a clean namespace.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=(not agent_store and rank == 0),  # the agent hosts the server when it shares its store
        timeout=timeout,
        multi_tenant=not agent_store,
    )
    return dist.PrefixStore(f"dimat/attempt_{attempt}/", store)




class TorchDistTransport:
    """:class:`~dimat.transport.base.Transport` over a torch.distributed process group.

    Create it in every rank (same ``n_peers``). If no default process group exists it is
    initialised from torchrun's environment (``env://``) and :meth:`close` destroys it; an
    existing group is used as is and left alone. ``backend=None`` picks NCCL when CUDA is
    available (tensors go to ``cuda:LOCAL_RANK``) and gloo otherwise. Returned states are CPU.
    """

    def __init__(
        self,
        n_peers: int,
        backend: str | None = None,
        pg_timeout: float = 600.0,
        device: torch.device | str | None = None,
    ) -> None:
        if n_peers < 1:
            raise ValueError(f"n_peers must be >= 1, got {n_peers}")
        self.n_peers = int(n_peers)
        self._owns_group = False
        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this torch build")
        if not dist.is_initialized():
            missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise RuntimeError(
                    f"TorchDistTransport needs torchrun's environment (missing {', '.join(missing)}); "
                    "start with `torchrun --nproc_per_node=N ...` or initialise a process group first"
                )
            if backend is None:
                backend = "nccl" if torch.cuda.is_available() else "gloo"
            kwargs: dict = {}
            if backend == "nccl":
                local = int(os.environ.get("LOCAL_RANK", "0"))
                dev = torch.device("cuda", local % torch.cuda.device_count())
                torch.cuda.set_device(dev)
                kwargs["device_id"] = dev
            pg_td = datetime.timedelta(seconds=pg_timeout)
            store = _elastic_store(pg_td)
            if store is not None:
                kwargs.update(store=store, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
            else:
                kwargs["init_method"] = "env://"
            dist.init_process_group(backend=backend, timeout=pg_td, **kwargs)
            self._owns_group = True
        self.backend = dist.get_backend()
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if device is not None:
            self.device = torch.device(device)
        elif self.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.local_peers: range = peers_for_rank(self.rank, self.world_size, self.n_peers)
        self._layout: _Layout | None = None
        # Send buffers kept across rounds (keyed by peer and schema), so packing reuses warm memory;
        # received buffers are always fresh because the caller keeps the returned tensors.
        self._send_bufs: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._closed = False
        #: bytes this rank put on the wire in the last exchange (payload + headers), for benchmarks
        self.last_bytes_sent = 0

    # -- placement helpers -------------------------------------------------------------------
    def rank_of(self, peer: int) -> int:
        """The rank that hosts ``peer``."""
        return rank_of_peer(peer, self.world_size, self.n_peers)

    # -- exchange -----------------------------------------------------------------------------
    def _check_args(
        self,
        states: Mapping[int, StateDict],
        in_neighbours: Mapping[int, Sequence[int]],
        out_neighbours: Mapping[int, Sequence[int]],
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Validate the local view; return (edges sent, edges received) as (sender, receiver)."""
        local = set(self.local_peers)

        def check_ids(kind: str, owner: int, ids: Sequence[int]) -> list[int]:
            ids = [int(i) for i in ids]
            if len(set(ids)) != len(ids):
                raise ValueError(f"{kind}[{owner}] lists a peer twice: {ids}")
            for i in ids:
                if not 0 <= i < self.n_peers:
                    raise ValueError(f"{kind}[{owner}] names peer {i}, outside 0..{self.n_peers - 1}")
                if i == owner:
                    raise ValueError(f"{kind}[{owner}] names the peer itself")
            return ids

        for kind, keys in (("states", states), ("in_neighbours", in_neighbours), ("out_neighbours", out_neighbours)):
            foreign = sorted(set(map(int, keys)) - local)
            if foreign:
                raise ValueError(
                    f"{kind} has peers {foreign} that rank {self.rank} does not host "
                    f"(it hosts {self.local_peers.start}..{self.local_peers.stop - 1} of {self.n_peers})"
                )
        sends, recvs = [], []
        for p, outs in out_neighbours.items():
            outs = check_ids("out_neighbours", int(p), outs)
            if outs and p not in states:
                raise ValueError(f"peer {p} has out-neighbours {outs} but no state to send")
            sends += [(int(p), q) for q in outs]
        for q, ins in in_neighbours.items():
            recvs += [(p, int(q)) for p in check_ids("in_neighbours", int(q), ins)]
        return sends, recvs

    def _local_layout(self, states: Mapping[int, StateDict]) -> _Layout | None:
        schemas = {p: Schema.from_state(s) for p, s in states.items()}
        distinct = set(schemas.values())
        if len(distinct) > 1:
            first = next(iter(schemas))
            odd = [p for p, s in schemas.items() if s != schemas[first]]
            raise TransportError(f"local peers disagree on the state schema: peers {odd} differ from peer {first}")
        if distinct:
            schema = distinct.pop()
            if self._layout is None or self._layout.schema != schema:
                self._layout = _Layout.of(schema)
        return self._layout

    def exchange(
        self,
        round_idx: int,
        states: Mapping[int, StateDict],
        in_neighbours: Mapping[int, Sequence[int]],
        out_neighbours: Mapping[int, Sequence[int]],
        timeout: float | None = None,
    ) -> ExchangeResult:
        """Send/receive states along the round's edges; collective: every rank must call it.

        Every delivered state passes :func:`~dimat.transport.checks.check_state` against the
        receiving peer's own state; a refused one (NaN/Inf, say) is dropped after it was received,
        so no rank waits or desyncs. ``bytes_sent`` counts the layout's payload (raw tensor bytes)
        once per edge a local sender delivered, same-rank edges included (:attr:`last_bytes_sent`
        holds what this rank put on the wire, headers included, for benchmarks).

        Raises :class:`TransportError` on every rank when any rank's view is inconsistent
        (schema, round, neighbour maps), and ``ValueError`` on the rank whose arguments were bad.
        """
        if self._closed:
            raise TransportError("transport is closed")
        plan = self._plan(round_idx, states, in_neighbours, out_neighbours)
        self._agree(round_idx, plan, self._preamble(round_idx, plan))
        receivers = sorted({int(q) for q in in_neighbours} | {int(q) for q in states})
        receipts = Receipts(round_idx, receivers)
        bytes_sent: dict[int, int] = {int(p): 0 for p in out_neighbours}
        # the receive checks use the receiving peer's own state (all local ones share the layout's)
        own = {q: (Schema.from_state(states[q]) if q in states else plan.layout.schema)
               for q in receivers if plan.layout is not None}
        self._deliver_local(plan, states, receipts, own, bytes_sent)
        self._exchange_remote(round_idx, plan, states, receipts, own, bytes_sent, timeout)
        return receipts.result(in_neighbours, bytes_sent)

    # the steps of one exchange, in order --------------------------------------------------------
    def _plan(self, round_idx: int, states: Mapping[int, StateDict], in_neighbours: Mapping[int, Sequence[int]],
              out_neighbours: Mapping[int, Sequence[int]]) -> "_Plan":
        """This rank's edges and layout, or the local error every rank must learn of (not raised yet)."""
        plan = _Plan()
        try:
            plan.sends, plan.recvs = self._check_args(states, in_neighbours, out_neighbours)
            plan.layout = self._local_layout(states)
            remote_recvs = [e for e in plan.recvs if self.rank_of(e[0]) != self.rank]
            if remote_recvs and plan.layout is None:
                raise ValueError(
                    f"rank {self.rank} must receive {remote_recvs[:3]}... but holds no state to learn the schema from"
                )
        except (ValueError, TypeError) as exc:
            plan.error, plan.code = exc, 1
        except TransportError as exc:
            plan.error, plan.code = exc, 2
        return plan

    def _preamble(self, round_idx: int, plan: "_Plan") -> list[list[int]]:
        """One tiny ``all_gather`` of every rank's round, schema digest, edge hashes and error code."""
        layout = plan.layout
        mine = torch.tensor(
            [
                _MAGIC,
                int(round_idx),
                layout.hash if layout is not None else 0,
                layout.nbytes if layout is not None else 0,
                sum(_edge_hash(*e) for e in plan.sends) % _EDGE_MOD,
                sum(_edge_hash(*e) for e in plan.recvs) % _EDGE_MOD,
                plan.code,
                len(plan.sends),
            ],
            dtype=torch.int64,
            device=self.device,
        )
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        try:
            dist.all_gather(gathered, mine)
        except Exception as exc:  # a dead or stalled rank: the group is unusable from here
            raise TransportError(f"round {round_idx}: preamble all_gather failed on rank {self.rank}: {exc}") from exc
        return torch.stack(gathered).cpu().tolist()

    @staticmethod
    def _agree(round_idx: int, plan: "_Plan", table: list[list[int]]) -> None:
        """The same decision on every rank: raise here, everywhere, if any rank's view is inconsistent."""
        if plan.error is not None:
            raise plan.error
        bad = [r for r, row in enumerate(table) if row[6] != 0]
        if bad:
            raise TransportError(f"round {round_idx}: ranks {bad} rejected their exchange arguments (see their errors)")
        if any(row[0] != _MAGIC for row in table):
            raise TransportError(f"round {round_idx}: garbled preamble from ranks {[r for r, row in enumerate(table) if row[0] != _MAGIC]}")
        rounds = sorted({row[1] for row in table})
        if len(rounds) > 1:
            raise TransportError(f"ranks disagree on the round: {[row[1] for row in table]} (rank order)")
        hashes = {(row[2], row[3]) for row in table if row[2] != 0}
        if len(hashes) > 1:
            detail = ", ".join(f"rank {r}: hash {row[2] & ((1 << 64) - 1):016x} / {row[3]} bytes" for r, row in enumerate(table) if row[2] != 0)
            raise TransportError(f"round {round_idx}: state schema mismatch between ranks (names, dtypes or shapes differ): {detail}")
        total_send = sum(row[4] for row in table) % _EDGE_MOD
        total_recv = sum(row[5] for row in table) % _EDGE_MOD
        if total_send != total_recv:
            raise TransportError(
                f"round {round_idx}: in/out neighbour maps disagree across ranks (edges sent != edges expected; "
                f"sent per rank {[row[7] for row in table]}); every rank must use the same topology for the round"
            )

    def _deliver_local(self, plan: "_Plan", states: Mapping[int, StateDict], receipts: Receipts,
                       own: Mapping[int, Schema], bytes_sent: dict[int, int]) -> None:
        """Edges between peers of this rank: a CPU copy each, through the same receive checks."""
        nbytes = plan.layout.nbytes if plan.layout is not None else 0
        for p, q in plan.sends:
            if self.rank_of(q) == self.rank and q in receipts.received:
                bytes_sent[p] += nbytes
                receipts.deliver(q, p, {k: v.detach().to("cpu", copy=True) for k, v in states[p].items()}, own[q])

    def _exchange_remote(self, round_idx: int, plan: "_Plan", states: Mapping[int, StateDict], receipts: Receipts,
                         own: Mapping[int, Schema], bytes_sent: dict[int, int], timeout: float | None) -> None:
        """Cross-rank edges: post every send and receive in ``(sender, receiver)`` order, wait, unpack, check."""
        remote = sorted(
            [("s", p, q) for p, q in plan.sends if self.rank_of(q) != self.rank]
            + [("r", p, q) for p, q in plan.recvs if self.rank_of(p) != self.rank],
            key=lambda m: (m[1], m[2]),
        )
        self.last_bytes_sent = 0
        if not remote:
            return
        layout = plan.layout
        assert layout is not None  # _plan refused remote receives without one; sends need a state
        ops, posted = self._post(round_idx, layout, remote, states, bytes_sent)
        wait = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
        try:
            for w in dist.batch_isend_irecv(ops):
                w.wait(**wait)
        except Exception as exc:
            raise TransportError(f"round {round_idx}: point-to-point exchange failed on rank {self.rank}: {exc}") from exc
        self.last_bytes_sent = sum(layout.nbytes + _HDR_LEN * 8 for kind, _p, _q in remote if kind == "s")
        order = [name for name in next(iter(states.values()))] if states else layout.schema.names
        for p, q, header, bufs in posted:
            got = header.cpu().tolist()
            want = [_MAGIC, int(round_idx), p, q, layout.hash, layout.nbytes]
            if got != want:
                raise TransportError(
                    f"round {round_idx}: rank {self.rank} expected header {want} for {p}->{q}, got {got}; message discarded"
                )
            receipts.deliver(q, p, layout.unpack(bufs, order), own[q])

    def _post(self, round_idx: int, layout: _Layout, remote: Sequence[tuple[str, int, int]],
              states: Mapping[int, StateDict], bytes_sent: dict[int, int],
              ) -> tuple[list[dist.P2POp], list[tuple[int, int, torch.Tensor, list[torch.Tensor]]]]:
        """The point-to-point ops of ``remote`` (a header then the buffers per edge) and the receive buffers."""
        ops: list[dist.P2POp] = []
        posted: list[tuple[int, int, torch.Tensor, list[torch.Tensor]]] = []
        packed: dict[int, list[torch.Tensor]] = {}
        mask = layout.wire_mask()
        for kind, p, q in remote:
            if kind == "s":
                header = torch.tensor([_MAGIC, int(round_idx), p, q, layout.hash, layout.nbytes],
                                      dtype=torch.int64, device=self.device)
                if p not in packed:  # pack each sender once, however many neighbours it has
                    reuse = self._send_bufs.get((p, layout.hash))
                    if reuse is None:
                        reuse = self._send_bufs[(p, layout.hash)] = layout.empty(self.device)
                    packed[p] = layout.pack(states[p], self.device, out=reuse)
                ops += [dist.P2POp(dist.isend, t, self.rank_of(q)) for t in [header, *(b for b, m in zip(packed[p], mask) if m)]]
                bytes_sent[p] += layout.nbytes
            else:
                header = torch.empty(_HDR_LEN, dtype=torch.int64, device=self.device)
                bufs = layout.empty(self.device)
                ops += [dist.P2POp(dist.irecv, t, self.rank_of(p)) for t in [header, *(b for b, m in zip(bufs, mask) if m)]]
                posted.append((p, q, header, bufs))
        return ops, posted

    def close(self) -> None:
        """Destroy the process group if this transport created it (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._send_bufs.clear()
        if self._owns_group and dist.is_initialized():
            if self.backend == "gloo":
                # Leave together: a rank that tears gloo down while a peer still holds connections
                # to it (rank 0 writing the run's files, say) can abort that peer at exit
                # ("terminate called without an active exception"). Bounded, so a rank that
                # failed alone cannot hang the others here.
                try:
                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
                except RuntimeError:
                    pass
            dist.destroy_process_group()

    def __enter__(self) -> "TorchDistTransport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
