"""The gRPC transport: one local peer that serves pushes and pushes to its neighbours in ``exchange``."""
from __future__ import annotations

import dataclasses
import json
import logging
import socket
import time
from collections import deque
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dimat.transport.base import ExchangeResult, StateDict, TransportError
from dimat.transport.checks import Receipts
from dimat.transport.grpc.client import PeerClient, PushRefused, RetryPolicy
from dimat.transport.grpc.membership import Member, Membership
from dimat.transport.grpc.proto import SERVICE_NAME, channel_options
from dimat.transport.grpc.server import Inbox, Servicer, service_handler
from dimat.transport.grpc.streams import StreamSlots
from dimat.transport.schema import Schema
from dimat.transport.security import TlsConfig, TokenAuthInterceptor, warn_if_exposed
from dimat.transport.settings import TransportSettings
from dimat.transport.wire import OutgoingPayload

log = logging.getLogger("dimat.transport.grpc")

AllowedSenders = Callable[[int], Iterable[int]] | Collection[int] | None


class BindError(OSError):
    """This peer cannot serve on its address (not on this host, port taken): one line naming it."""


def bind_address(advertised: str, bind: str | None) -> str:
    """Where a peer advertised at ``advertised`` listens: ``bind`` (``host`` takes the advertised port), else ``advertised``."""
    if not bind:
        return advertised
    return bind if bind.rpartition(":")[2].isdigit() else f"{bind}:{advertised.rpartition(':')[2]}"


def check_bindable(peer_id: int, bind: str) -> None:
    """Raise :class:`BindError` (one line, the OS's reason) if ``bind`` cannot be listened on here.

    A plain socket tries it first (SO_REUSEADDR, as gRPC sets it; no SO_REUSEPORT), so the user gets
    the reason in one line instead of gRPC's log lines; port 0 (any free port) is not checked.
    """
    host, _, port = bind.rpartition(":")
    if int(port) == 0:
        return
    host = host.strip("[]") or "0.0.0.0"
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise BindError(f"peer {peer_id}: cannot serve on {bind}: {exc.strerror or exc}") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise BindError(f"peer {peer_id}: cannot serve on {bind}: {why} (port {port}; see transport.bind)") from None


@dataclass
class ExchangeReport:
    """What happened in the last ``exchange``: who was missing and why (for metrics/logs)."""

    round: int
    received: list[int]
    missing: list[int]
    send_failed: dict[int, str]
    seconds: float
    refused: dict[int, str] = dataclasses.field(default_factory=dict)


class GrpcTransport:
    """One local peer served over gRPC. Implements :class:`dimat.transport.base.Transport`.

    Args:
        peer_id: id of the peer this process hosts.
        peers: ``{id: "host:port"}`` for every peer (the local one included; its port may be 0 to
            bind a free port, see :attr:`address`). The local entry is the *advertised* address.
        settings: the ``transport`` config (``configs/transport/grpc.yaml``, the one source of every
            default): ``timeout`` (per-neighbour deadline of an exchange; pushes retry within it),
            ``retries`` (of joins and fetches), wire options (``chunk_bytes``, ``num_streams``,
            ``hash``), ``max_rounds_ahead``, heartbeats (``heartbeat_interval``, None = none;
            ``max_missed_heartbeats`` in a row mark a peer *down*: no push to it, no wait for it),
            ``delay`` (a straggler for tests), ``require_cert_identity``, ``bind`` and the server
            bounds (``max_concurrent_rpcs``, ``max_concurrent_streams``, ``max_streams_per_sender``,
            ``stream_idle_timeout``; docs/grpc.md, "Threat model"). ``settings.tls`` and
            ``token_env`` are the factory's: it passes ``tls`` and ``token`` resolved.
        bind: overrides ``settings.bind``: where the server listens when it differs from the
            advertised address (behind NAT, ``0.0.0.0``): ``host`` (the advertised port) or
            ``host:port``. ``SO_REUSEPORT`` is off: a port another process serves raises :class:`BindError`.
        allowed_senders: who may push weights: a callable ``round -> ids``, a fixed collection, or
            ``None`` (default) for the in-neighbours ``exchange`` was given for that round (any known
            peer for a round not entered yet: a neighbour may run ahead, and time-varying topologies
            change the neighbourhood every round). Pushes from anyone else are rejected with
            PERMISSION_DENIED.
        schema: the expected state dict (or :class:`Schema`); defaults to the state passed to
            ``exchange``. Pushes arriving before any schema is known are told to retry (UNAVAILABLE).
        token: shared secret; every RPC but health must carry ``authorization: Bearer <token>``.
        tls: certificate files for TLS (``mutual=True`` for mTLS).
        report_path: append one JSON line per exchange (received, missing, failed sends) here.
        accept_half, max_payload_bytes, max_message_bytes, prefetch, window_bytes, max_workers,
            backoff, backoff_max: library knobs no config sets (benchmarks and tests): accept
            half-precision payloads for float tensors, cap a payload's size, gRPC message and
            window sizes, chunks read ahead per stream, server worker floor, retry backoff.
    """

    def __init__(
        self,
        peer_id: int,
        peers: Mapping[int, str],
        settings: TransportSettings,
        *,
        bind: str | None = None,
        allowed_senders: AllowedSenders = None,
        schema: Schema | Mapping[str, torch.Tensor] | None = None,
        token: str | None = None,
        tls: TlsConfig | None = None,
        report_path: str | None = None,
        accept_half: bool = True,
        max_payload_bytes: int | None = None,
        max_message_bytes: int | None = None,
        prefetch: int = 2,
        window_bytes: int | None = None,
        max_workers: int = 16,
        backoff: float = 0.05,
        backoff_max: float = 2.0,
    ):
        s = settings
        if s.name != "grpc":
            raise ValueError(f"GrpcTransport needs grpc transport settings (got transport.name={s.name!r})")
        if peer_id not in peers:
            raise ValueError(f"peer id {peer_id} is not in the peers map {sorted(peers)}")
        assert s.timeout is not None and s.chunk_bytes is not None and s.num_streams is not None  # from_mapping's doing
        assert s.max_concurrent_rpcs is not None and s.max_concurrent_streams is not None
        if s.require_cert_identity and not (tls and tls.mutual):
            raise ValueError("require_cert_identity needs mutual TLS")
        self.settings = s
        self.peer_id = int(peer_id)
        self.peers = {int(k): str(v) for k, v in peers.items()}
        self.token, self.tls = token, tls
        self.deadline = float(s.timeout)
        self.chunk_bytes, self.num_streams = int(s.chunk_bytes), int(s.num_streams)
        self.hash_algorithm, self.accept_half = str(s.hash), accept_half
        self.max_payload_bytes, self.max_rounds_ahead = max_payload_bytes, int(s.max_rounds_ahead or 0)
        self.require_cert_identity = bool(s.require_cert_identity)
        self.prefetch = prefetch
        self.report_path = report_path
        self.delay = float(s.delay or 0.0)
        self.slots = StreamSlots(s.max_concurrent_streams, int(s.max_streams_per_sender or 1))
        self.stream_idle_timeout = float(s.stream_idle_timeout or 0.0)
        # a chunk plus protobuf framing, or a large tensor table, must fit in one message
        self.max_message_bytes = max_message_bytes or max(self.chunk_bytes + (1 << 20), 16 << 20)
        self._allowed_policy = allowed_senders
        self._allowed_by_round: dict[int, frozenset[int]] = {}
        self.inbox = Inbox()
        self.schema: Schema | None = None
        if schema is not None:
            self.set_schema(schema)
        self.current_round = -1
        #: the latest state sent, served to peers that fetch it (rejoin)
        self.latest: tuple[int, OutgoingPayload] | None = None
        self.errors: deque[str] = deque(maxlen=100)  # recent rejections, newest last
        self.last_report: ExchangeReport | None = None
        self.membership = Membership(self, s.heartbeat_interval, int(s.max_missed_heartbeats or 1))
        self.client = PeerClient(self.peer_id, self.peers, tls=tls, token=token,
                                 retry=RetryPolicy(int(s.retries or 0), backoff, backoff_max),
                                 max_message_bytes=self.max_message_bytes, window_bytes=window_bytes,
                                 chunk_bytes=self.chunk_bytes, num_streams=self.num_streams)
        self._pool = futures.ThreadPoolExecutor(max_workers=max(4, 2 * self.num_streams),
                                                thread_name_prefix=f"dimat-send-{peer_id}")
        self._closed = False

        # SO_REUSEPORT off: a second process on a taken port must fail, not share (split) the traffic
        opts = channel_options(self.max_message_bytes, window_bytes) + [("grpc.so_reuseport", 0)]
        interceptors = [TokenAuthInterceptor(token)] if token else []
        # one worker per admitted RPC (gRPC refuses more), streams capped below that (self.slots)
        workers = max(max_workers, s.max_concurrent_rpcs)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"dimat-srv-{peer_id}"),
                                   options=opts, interceptors=interceptors, maximum_concurrent_rpcs=s.max_concurrent_rpcs)
        self._server.add_generic_rpc_handlers((service_handler(Servicer(self)),))
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        adv_host, _, adv_port = self.peers[self.peer_id].rpartition(":")
        bind = bind_address(self.peers[self.peer_id], bind or s.bind)
        check_bindable(self.peer_id, bind)
        try:
            if tls is not None:
                port = self._server.add_secure_port(bind, tls.server_credentials())
            else:
                port = self._server.add_insecure_port(bind)
        except RuntimeError:  # grpcio >= 1.5x raises where older versions returned 0
            port = 0
        if port == 0:
            self._server.stop(None)
            raise BindError(f"peer {peer_id}: cannot serve on {bind}: port {bind.rpartition(':')[2]} is taken "
                            "or the address is not on this host (see transport.bind)")
        self.port = port
        self.address = self.peers[self.peer_id] if adv_port not in ("", "0") else f"{adv_host}:{port}"
        self.peers[self.peer_id] = self.address
        warn_if_exposed(bind.rpartition(":")[0], token=token, tls=tls)  # where it listens, not what it advertises
        self._server.start()
        for svc in ("", SERVICE_NAME):
            self._health.set(svc, health_pb2.HealthCheckResponse.SERVING)

    @classmethod
    def from_config_file(cls, peer_id: int, peers: Mapping[int, str], config: str | Path,
                         **kw: Any) -> "GrpcTransport":
        """A transport whose settings come from the config file ``config`` (``configs/transport/grpc.yaml``).

        Args:
            peer_id, peers: as for the constructor.
            config: the transport config file (its defaults are the only ones).
            kw: transport config keys (``timeout=3``, ``heartbeat_interval=None``...) override the
                file's values; the other keywords go to the constructor (``token``, ``tls``...).
        """
        keys = {f.name for f in dataclasses.fields(TransportSettings)} - {"tls"}
        overrides = {k: kw.pop(k) for k in list(kw) if k in keys}
        if kw.get("tls") is not None:  # certificate files given as such: the settings say whether they are mutual
            overrides["tls"] = {"mutual": bool(kw["tls"].mutual)}
        return cls(peer_id, peers, TransportSettings.load(config, **overrides), **kw)

    # ------------------------------------------------------------------ configuration
    def set_schema(self, schema: Schema | Mapping[str, torch.Tensor]) -> None:
        """What pushes must look like: the names, shapes and dtypes of the local model."""
        with self.inbox.cv:  # the servicer reads it under cv together with the round
            self.schema = schema if isinstance(schema, Schema) else Schema.from_state(schema)

    def set_peers(self, peers: Mapping[int, str]) -> None:
        """Update neighbour addresses (a restarted peer may come back on another port)."""
        with self.client.lock:
            for k, v in peers.items():
                if int(k) != self.peer_id:
                    self.peers[int(k)] = str(v)

    def set_allowed_senders(self, policy: AllowedSenders) -> None:
        """Replace who may push: ``exchange -> ids`` (e.g. from the topology schedule), ids, or None."""
        self._allowed_policy = policy

    def allowed_senders(self, round_idx: int) -> frozenset[int]:
        """The senders whose pushes for ``round_idx`` are accepted."""
        p = self._allowed_policy
        if callable(p):
            return frozenset(int(i) for i in p(round_idx))
        if p is not None:
            return frozenset(int(i) for i in p)
        if round_idx in self._allowed_by_round:
            return self._allowed_by_round[round_idx]
        # a neighbour ahead of us, in a round whose neighbourhood we do not know yet (time-varying
        # topologies change it every round): any known peer; only that round's in-neighbours are
        # collected, the rest is dropped when the round is left
        return frozenset(k for k in self.peers if k != self.peer_id)

    # ------------------------------------------------------------------ client calls
    def send(self, peer: int, round_idx: int, state: Mapping[str, torch.Tensor] | OutgoingPayload,
             deadline: float | None = None) -> None:
        """Push ``state`` to ``peer`` for ``round_idx``; raises TransportError with the receiver's reason."""
        payload = state if isinstance(state, OutgoingPayload) else OutgoingPayload(state, hash_algorithm=self.hash_algorithm)
        self.client.push(peer, round_idx, payload, deadline or self.deadline)

    def fetch_state(self, peer: int, deadline: float | None = None) -> tuple[int, StateDict]:
        """Pull ``peer``'s latest state (checked like a push); returns ``(round, state)``."""
        if self.schema is None:
            raise TransportError(f"peer {self.peer_id}: set_schema() before fetching state")
        return self.client.fetch(peer, max(self.current_round, 0), self.schema, accept_half=self.accept_half,
                                 max_payload_bytes=self.max_payload_bytes, deadline=deadline or self.deadline)

    def heartbeat(self, peer: int, timeout: float = 2.0) -> int:
        """Ping ``peer``; returns its current round (raises TransportError if unreachable)."""
        return self.client.heartbeat(peer, max(self.current_round, 0), timeout)

    def join(self, peer: int, timeout: float = 10.0) -> tuple[int, dict[int, str]]:
        """Announce this peer to ``peer``; returns its round and the members it knows ``{id: address}``.

        The round it reports is remembered (as a heartbeat's is): a receive does not wait for a
        neighbour that is already past the round."""
        their_round, members = self.client.join(peer, max(self.current_round, 0), self.address, timeout)
        self.membership.seen(peer, their_round, None)
        return their_round, members

    def leave(self, peers: Iterable[int], timeout: float = 2.0) -> None:
        """Tell ``peers`` this peer is leaving (best effort)."""
        self.client.leave(peers, max(self.current_round, 0), timeout)

    def wait_for_peers(self, ids: Iterable[int], timeout: float) -> None:
        """Startup barrier: block until every peer in ``ids`` answers a health check, or raise TimeoutError.

        Uses this transport's channels (so its TLS settings); health checks need no token. A peer
        whose push already arrived counts as up: in a directed topology a peer that only sends here
        may have finished and left before this one started.
        """
        end = time.monotonic() + timeout

        def pushed(pid: int) -> bool:
            with self.inbox.cv:
                return any(k[1] == pid for k in (*self.inbox.states, *self.inbox.refused))

        for pid in ids:
            if pid == self.peer_id:
                continue
            while not (pushed(pid) or self.client.serving(pid, max(0.1, min(2.0, end - time.monotonic())))):
                if time.monotonic() >= end:
                    raise TimeoutError(f"peer {self.peer_id}: peer {pid} at {self.peers.get(pid)} "
                                       f"did not come up within {timeout:.0f}s")
                time.sleep(0.2)

    # ------------------------------------------------------------------ liveness
    @property
    def members(self) -> dict[int, Member]:
        """The peers this one has heard from (joins, heartbeats), by id."""
        return self.membership.members

    def start_heartbeats(self, interval: float | None = None) -> None:
        """Ping every other known peer every ``interval`` seconds on a background thread."""
        self.membership.start(interval)

    def is_up(self, peer: int) -> bool:
        """False once ``peer`` missed ``max_missed_heartbeats`` heartbeats in a row (always True without heartbeats)."""
        return self.membership.is_up(peer)

    def known_round(self, peer: int) -> int:
        """The latest round ``peer`` reported (heartbeats, joins); -1 if unknown."""
        return self.membership.known_round(peer)

    def _down(self, peer: int) -> str:
        return f"peer {peer} is down ({self.membership.missed.get(peer, 0)} missed heartbeats)"

    def down_peers(self) -> list[int]:
        return sorted(p for p in self.peers if p != self.peer_id and not self.is_up(p))

    # ------------------------------------------------------------------ receiving
    def _collect(self, round_idx: int, senders: Iterable[int], timeout: float | None,
                 ) -> tuple[dict[int, StateDict], dict[int, str]]:
        """Wait until every sender's state for ``round_idx`` arrived (or was refused) or the timeout passed."""
        want = set(int(s) for s in senders)
        end = time.monotonic() + (self.deadline if timeout is None else timeout)
        inbox = self.inbox
        with inbox.cv:
            while True:
                have = {s for s in want if (round_idx, s) in inbox.states}
                refused = {s for s in want - have if (round_idx, s) in inbox.refused}
                # a peer that is down, or already in a later round, will not send this round any more
                waiting = {s for s in want - have - refused if self.is_up(s) and self.known_round(s) <= round_idx}
                left = end - time.monotonic()
                if not waiting or left <= 0:
                    break
                inbox.cv.wait(min(left, 0.5))
            got = {s: inbox.states.pop((round_idx, s)) for s in sorted(have)}
            why = {s: inbox.refused.pop((round_idx, s)) for s in sorted(refused)}
            return got, why

    def receive(self, round_idx: int, senders: Iterable[int], timeout: float | None = None) -> dict[int, StateDict]:
        """Wait until every sender's state for ``round_idx`` arrived or the timeout passed; pop what arrived."""
        return self._collect(round_idx, senders, timeout)[0]

    def begin_round(self, round_idx: int, in_neighbours: Iterable[int],
                    schema: Schema | Mapping[str, torch.Tensor] | None = None) -> None:
        """Enter ``round_idx``: fix the accepted senders for it, drop buffers of older rounds and,
        given ``schema``, make it what pushes must fit, in one step under the inbox lock (a push is
        never checked against one round's schema and another round's number)."""
        self._allowed_by_round[round_idx] = frozenset(int(i) for i in in_neighbours)
        for r in [r for r in self._allowed_by_round if r < round_idx - 1]:
            del self._allowed_by_round[r]
        with self.inbox.cv:
            if schema is not None:
                self.set_schema(schema)
            self.current_round = max(self.current_round, round_idx)
            self.inbox.drop_before(round_idx)

    # ------------------------------------------------------------------ Transport protocol
    def exchange(
        self,
        round_idx: int,
        states: Mapping[int, StateDict],
        in_neighbours: Mapping[int, Sequence[int]],
        out_neighbours: Mapping[int, Sequence[int]],
        timeout: float | None = None,
    ) -> ExchangeResult:
        """Push the local state to its out-neighbours and collect its in-neighbours' states for the round.

        ``bytes_sent`` counts the encoded payload (``OutgoingPayload.total_bytes``; compression is
        :mod:`dimat.exchange`'s, before the transport) once per out-neighbour whose push *completed*, accepted or refused by
        the receiver's checks (it was delivered, as InProc and torchdist count it); a push that
        failed otherwise (peer down, deadline, unreachable, data loss, admission denied) is not
        counted.
        """
        if set(states) != {self.peer_id}:
            raise ValueError(f"GrpcTransport hosts peer {self.peer_id} only; got states for {sorted(states)}")
        if self.delay > 0:
            time.sleep(self.delay)
        t0 = time.monotonic()
        deadline = self.deadline if timeout is None else timeout
        state = states[self.peer_id]
        schema = Schema.from_state(state)
        ins = [int(i) for i in in_neighbours.get(self.peer_id, ())]
        outs = [int(i) for i in out_neighbours.get(self.peer_id, ())]
        self.begin_round(round_idx, ins, schema)
        payload = OutgoingPayload(state, hash_algorithm=self.hash_algorithm)
        self.latest = (round_idx, payload)
        failed: dict[int, str] = {}
        for j in outs:
            if not self.is_up(j):
                failed[j] = f"{self._down(j)}; not sent"
        # a push to a peer that is marked down while it waits (wait_for_ready, retries) stops then,
        # instead of holding the round to its deadline
        sends = {j: self._pool.submit(self.client.push, j, round_idx, payload, deadline,
                                      give_up=lambda j=j: None if self.is_up(j) else self._down(j))
                 for j in outs if j not in failed}
        received, refused = self._collect(round_idx, ins, deadline)
        receipts = Receipts(round_idx, [self.peer_id])
        for j, st in received.items():
            if Schema.from_state(st) == schema:  # checked on arrival against this very schema
                receipts.keep(self.peer_id, j, st)
            else:  # it arrived before this exchange replaced the schema: check it against the one it must fit
                receipts.deliver(self.peer_id, j, st, schema)
        for j, reason in refused.items():
            receipts.refuse(self.peer_id, j, reason)
        delivered = 0
        for j, f in sends.items():
            try:
                f.result(timeout=max(0.0, t0 + deadline + 1.0 - time.monotonic()))
                delivered += 1
            except PushRefused as exc:  # it arrived and was checked: counted like InProc/torchdist count it
                delivered += 1
                failed[j] = str(exc)
                log.warning("%s", failed[j])
            except (TransportError, futures.TimeoutError) as exc:
                failed[j] = str(exc) or "timed out"
                log.warning("%s", failed[j])
        result = receipts.result({self.peer_id: ins}, {self.peer_id: payload.total_bytes * delivered})
        self.last_report = ExchangeReport(round_idx, sorted(result.received[self.peer_id]), result.missing[self.peer_id],
                                          failed, time.monotonic() - t0, result.refused[self.peer_id])
        if self.report_path:
            with open(self.report_path, "a") as fh:
                fh.write(json.dumps({"peer": self.peer_id, **dataclasses.asdict(self.last_report)}) + "\n")
        return result

    def close(self, grace: float | None = 0.5) -> None:
        if self._closed:
            return
        self._closed = True
        self.membership.stop()
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self.client.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "GrpcTransport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
