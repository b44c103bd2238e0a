"""``dimat peer --id K --peers peers.yaml [hydra overrides]``: one federation peer in its own process.

The peer builds exactly what ``dimat simulate`` builds for peer K (same config, same seed, same data
partition, same model init) and runs the *same* round loop (:func:`dimat.federation.run_rounds`) with
a :class:`~dimat.transport.grpc.GrpcTransport` instead of the in-process one, so per-round metrics
match the simulation within float tolerance. Outputs go to ``<run_dir>/peer_K/`` (metrics, summary,
checkpoints tagged ``peer_K``); all peers of a run share one ``run_dir``.

``peers.yaml`` maps peer ids to ``host:port``, either at the top level or under ``peers:``::

    peers:
      0: 127.0.0.1:50051
      1: 127.0.0.1:50052

Transport options come from the ``transport=grpc`` config group (``configs/transport/grpc.yaml``):
deadline, wire options, TLS files (``{id}`` in a path becomes the peer id; such overrides are quoted
for Hydra here), ``bind`` (where to listen when it is not the advertised address) and the name of the
environment variable holding the shared token (secrets never go on command lines or in configs).
A taken port or an address not on this host fails at once, in one line. Pushes are checked against
the topology of their own round (:func:`allowed_senders_of`).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:  # the grpc package generates protobuf code at import: only when a peer runs
    from dimat.transport.grpc import GrpcTransport

log = logging.getLogger(__name__)


def load_peers_file(path: str | Path) -> dict[int, str]:
    """Read ``{id: "host:port"}`` from a peers YAML file, validated as it is read.

    Ids are unique non-negative integers (``1`` and ``'01'`` are the same id, so both is an error,
    as is a key given twice), ports are 1-65535, hosts are IP addresses (IPv6 in brackets) or host
    names, and no two ids share an address. Every problem is a :class:`~dimat.files.BadFileError`
    ``<file>: <problem>``.
    """
    import yaml

    from dimat.files import BadFileError, describe

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"peers file {p} not found")
    try:
        data = yaml.load(p.read_text(), Loader=_unique_key_loader()) or {}
    except _DuplicateKey as exc:
        raise BadFileError(p, str(exc)) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BadFileError(p, f"not readable YAML ({describe(exc)})") from None
    if isinstance(data, dict) and "peers" in data:
        data = data["peers"]
    if not isinstance(data, dict) or not data:
        raise BadFileError(p, "expected a mapping of peer id to host:port")
    out: dict[int, str] = {}
    spelled: dict[int, object] = {}
    where: dict[tuple[str, int], int] = {}
    for k, v in data.items():
        pid = _peer_id(k)
        if pid is None:
            raise BadFileError(p, f"peer id {k!r} is not a non-negative integer")
        if pid in spelled:
            raise BadFileError(p, f"peer ids {spelled[pid]!r} and {k!r} both name peer {pid}")
        spelled[pid] = k
        problem = _address_problem(v)
        if problem:
            raise BadFileError(p, f"address {v!r} of peer {pid}: {problem}")
        host, _, port = str(v).rpartition(":")
        key = (host.strip("[]").lower(), int(port))
        if key in where:
            raise BadFileError(p, f"peers {where[key]} and {pid} share the address {v} (each peer needs its own)")
        where[key] = pid
        out[pid] = str(v)
    return out


class _DuplicateKey(Exception):
    pass


def _unique_key_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that refuses a mapping key given twice (plain YAML keeps the last)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                except TypeError:  # an unhashable key: the normal constructor reports it
                    break
                if dup:
                    raise _DuplicateKey(f"key {key!r} appears twice (line {key_node.start_mark.line + 1})")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return Loader


def _peer_id(k: object) -> int | None:
    if isinstance(k, bool):
        return None
    if isinstance(k, int):
        return k if k >= 0 else None
    if isinstance(k, str) and k.strip().isdigit() and k.strip().isascii():
        return int(k.strip())
    return None


def _address_problem(v: object) -> str | None:
    """Why ``v`` is not a usable ``host:port``, or None."""
    import ipaddress
    import re

    if not isinstance(v, str):
        return "not a host:port string"
    host, sep, port = v.rpartition(":")
    if not sep or not host:
        return "not host:port"
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        return f"port {port!r} is not in 1-65535"
    if host.startswith("["):
        if not host.endswith("]"):
            return f"host {host!r} has an unclosed bracket"
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"host {host!r} is not an IPv6 address"
        return None
    if ":" in host:
        return f"host {host!r}: an IPv6 address must be in brackets ([::1]:port)"
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"host {host!r} is not an IPv4 address"
        return None
    label = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
    if len(host) > 253 or not re.fullmatch(rf"{label}(\.{label})*\.?", host):
        return f"host {host!r} is not a host name or IP address"
    return None


def quote_placeholders(overrides: Sequence[str]) -> list[str]:
    """Quote override values holding a ``{id}`` placeholder, which Hydra's grammar reads as a dict.

    ``transport.tls.cert=certs/peer-{id}.pem`` (as docs/grpc.md writes it) becomes
    ``transport.tls.cert='certs/peer-{id}.pem'``; quoted values and ``${...}`` interpolations are kept.
    """
    out = []
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and "{id}" in value and "${" not in value and value[:1] not in ("'", '"'):
            quote = "'" if "'" not in value else '"'
            o = f"{key}={quote}{value}{quote}" if quote not in value else o
        out.append(o)
    return out


def allowed_senders_of(fed: Any, peer_id: int) -> Any:
    """``exchange -> in-neighbours of peer_id`` in that exchange's round: what a push is checked against.

    Every peer computes the schedule from the config, so a push for a round the receiver has not
    entered yet is admitted by that round's topology (time-varying ones change it every round).
    """
    from functools import lru_cache

    from dimat.federation.rounds import exchanges_per_round

    per_round = exchanges_per_round(fed)
    rounds = fed.config.rounds

    @lru_cache(maxsize=64)
    def senders(exchange: int) -> frozenset[int]:
        r = -(-int(exchange) // per_round)
        if fed.schedule is None or not 1 <= r <= rounds:
            return frozenset()
        return frozenset(int(i) for i in fed.topology_at(r).in_neighbours(peer_id))

    return senders


def run_peer(cfg: Any, peer_id: int, peers: Mapping[int, str], run_dir: str | Path, *,
             resume: bool = False, echo=print) -> dict[str, Any]:
    """Build peer ``peer_id`` from ``cfg`` and run the federation's round loop over gRPC."""
    from dimat.config import ConfigError, RunConfig
    from dimat.entry import set_threads
    from dimat.federation import build_federation, run_rounds
    from dimat.federation.rounds import exchanges_per_round
    from dimat.transport import build_transport
    from dimat.transport.grpc.transport import bind_address, check_bindable

    run = RunConfig.from_config(cfg)
    if set(peers) != set(range(run.num_peers)):
        raise ConfigError(f"peers file lists ids {sorted(peers)}, but num_peers={run.num_peers} "
                          f"needs 0..{run.num_peers - 1}")
    set_threads(run.threads)
    # a port that is taken (or an address not on this host) fails at once, before the data is loaded
    check_bindable(peer_id, bind_address(peers[peer_id], run.transport.bind))
    fed = build_federation(run, local_ids=[peer_id])
    tag = f"peer_{peer_id}"
    (Path(run_dir) / tag).mkdir(parents=True, exist_ok=True)
    transport = build_transport(run.transport, peer_id=peer_id, peers=peers, n_peers=run.num_peers,
                                report_path=str(Path(run_dir) / tag / "transport.jsonl"))
    try:
        transport.set_allowed_senders(allowed_senders_of(fed, peer_id))
        # the window is in rounds; the transport counts exchanges (gossip: several per round)
        transport.max_rounds_ahead = int(run.transport.max_rounds_ahead) * exchanges_per_round(fed)
        neighbours: set[int] = set()
        if fed.schedule is not None:
            for r in range(1, run.rounds + 1):
                topo = fed.topology_at(r)
                neighbours |= set(topo.in_neighbours(peer_id)) | set(topo.out_neighbours(peer_id))
        own = fed.method.payload(fed.peers[peer_id])  # pushes are checked against what this peer itself sends
        transport.set_schema(own if fed.compressor is None else fed.compressor.payload_schema(own))
        if resume:
            resume = rejoin(fed, transport, sorted(neighbours), run_dir, tag, echo=echo)
        else:
            transport.wait_for_peers(sorted(neighbours), float(run.transport.startup_timeout))
        transport.start_heartbeats()
        return run_rounds(fed, transport, run_dir, resume=resume, process_tag=tag,
                          progress=False, echo=lambda s: echo(f"[peer {peer_id}] {s}"))
    finally:
        transport.close()


def rejoin(fed: Any, transport: "GrpcTransport", neighbours: Sequence[int], run_dir: str | Path, tag: str, *,
           echo: Any = print) -> bool:
    """A restarted peer catches up; returns whether ``run_rounds`` should resume from a checkpoint.

    It announces itself (``Join``) to its neighbours and learns their round R. If its own last
    finished round L (from its checkpoints) is behind (L < R), it pulls the newest state of the most
    advanced neighbour (``FetchState``, checked like any push), loads it, and records it as its
    checkpoint of round R, so the round loop continues at R + 1 together with the others (rounds
    L+1..R are lost for this peer only, and logged as a rejoin). Otherwise it resumes from its own
    checkpoint. With no checkpoint and a federation still at its start it starts afresh.
    """
    from concurrent.futures import ThreadPoolExecutor

    from dimat.federation import Checkpointer
    from dimat.federation.rounds import exchanges_per_round

    pid = transport.peer_id
    ck = Checkpointer(Path(run_dir), keep_last=fed.config.checkpoint.keep_last, tag=tag)
    per_round = exchanges_per_round(fed)  # neighbours report exchange numbers, not rounds (gossip)
    last = ck.last_round()
    if last is not None and last >= fed.config.rounds:
        return True  # this peer had already finished; nothing to catch up
    rounds: dict[int, int] = {}

    def ask(j: int):
        try:
            return j, -(-transport.join(j, timeout=3.0)[0] // per_round)
        except Exception as exc:  # a neighbour that is down too
            echo(f"[peer {pid}] rejoin: neighbour {j} unreachable ({exc})")
            return j, None

    with ThreadPoolExecutor(max_workers=max(1, len(neighbours))) as pool:
        for j, r in pool.map(ask, neighbours):
            if r is not None:
                rounds[j] = r
    if not rounds:
        echo(f"[peer {pid}] rejoin: no neighbour reachable; resuming from own checkpoint (round {last})")
        return last is not None
    src = max(rounds, key=lambda j: rounds[j])
    R = rounds[src]
    if last is not None and last >= R:
        echo(f"[peer {pid}] rejoin: own checkpoint round {last} is current (neighbours at {R})")
        return True
    if last is None and R == 0:
        return False
    total = fed.config.rounds
    if R >= total:
        # the neighbours are in (or past) the last round: a jump to their state would leave this
        # peer's rounds last+1..total without a record, and nobody is left to exchange with, so it
        # completes those rounds itself from its own checkpoint (its exchanges find them gone)
        first = 1 if last is None else last + 1
        echo(f"[peer {pid}] rejoin: neighbours finished the run (round {R} of {total}); completing rounds "
             f"{first}..{total} without them from " + ("the start" if last is None else f"own checkpoint (round {last})"))
        _log_rejoin(run_dir, tag, {"peer": pid, "own_round": last, "neighbour_round": R, "fetched_from": None,
                                   "fetched_round": None, "completed_alone_from": first - 1})
        return last is not None
    if last is not None:
        ck.restore(last, fed.peers, fed.method)  # optimizer, data order and RNG continue from our own state
    exchange, state = transport.fetch_state(src)
    rnd = -(-exchange // per_round)
    peer = fed.peers[pid]
    if fed.compressor is not None:  # what a neighbour serves is its last payload, compressed
        decoded = fed.compressor.standalone(state, fed.method.payload(peer))
        if decoded is None:
            echo(f"[peer {pid}] rejoin: peer {src} serves a delta-coded state (exchange.delta), which needs a "
                 f"reference this peer lost; resuming from own checkpoint (round {last})")
            return last is not None
        state = decoded
    fed.method.adopt(peer, state)
    ck.save(rnd, fed.peers, fed.method)
    echo(f"[peer {pid}] rejoin: behind (own round {last}, neighbours at {R}); "
         f"fetched round {rnd} state from peer {src}, continuing at round {rnd + 1}")
    _log_rejoin(run_dir, tag, {"peer": pid, "own_round": last, "neighbour_round": R, "fetched_from": src,
                               "fetched_round": rnd})
    return True


def _log_rejoin(run_dir: str | Path, tag: str, record: dict[str, Any]) -> None:
    """Append one rejoin to ``RUN/<tag>/rejoins.jsonl`` (with the time)."""
    with open(Path(run_dir) / tag / "rejoins.jsonl", "a") as fh:
        fh.write(json.dumps({**record, "time": time.time()}) + "\n")


def peer_main(args: Sequence[str]) -> int:
    """CLI entry: ``dimat peer --id K --peers peers.yaml [--resume] [overrides]``."""
    from omegaconf import OmegaConf

    from dimat.config import ConfigError
    from dimat.entry import compose, user_errors
    from dimat.metrics import write_text_atomic
    from dimat.transport.grpc.transport import BindError

    ap = argparse.ArgumentParser(prog="dimat peer", description="run one federation peer over gRPC")
    ap.add_argument("--id", type=int, required=True, help="this peer's id (a key of the peers file)")
    ap.add_argument("--peers", required=True, help="YAML file mapping peer ids to host:port")
    ap.add_argument("--resume", action="store_true", help="continue from this peer's last checkpoint in run_dir")
    ns, overrides = ap.parse_known_args(list(args))
    with user_errors():
        bad = [o for o in overrides if o.startswith("-")]
        if bad:
            raise ConfigError(f"unknown option(s) {' '.join(bad)} (hydra overrides are key=value)")
        try:
            peers = load_peers_file(ns.peers)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if ns.id not in peers:
            raise ConfigError(f"peer id {ns.id} is not in {ns.peers} (ids: {sorted(peers)})")
        if not any(o.startswith("run_dir=") for o in overrides):
            raise ConfigError("dimat peer needs run_dir=<folder> (shared by all peers of the run)")
        cfg = compose(quote_placeholders(overrides), transport="grpc")
        if str(cfg.transport.get("name")) != "grpc":
            raise ConfigError(f"dimat peer runs the grpc transport (got transport={cfg.transport.get('name')})")
        run_dir = Path(str(cfg.run_dir))
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / f"config_peer_{ns.id}.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        logging.basicConfig(level=logging.WARNING, format=f"[peer {ns.id}] %(levelname)s %(message)s")
        print(f"[peer {ns.id}] serving on {peers[ns.id]}; {cfg.num_peers} peers, {cfg.rounds} rounds -> {run_dir}",
              flush=True)
        try:
            summary = run_peer(cfg, ns.id, peers, run_dir, resume=ns.resume, echo=lambda s: print(s, flush=True))
        except BindError as exc:
            raise ConfigError(str(exc)) from None
    acc = summary.get("final_mean_acc")
    print(f"[peer {ns.id}] done: {summary.get('rounds_done')} rounds, final test accuracy "
          f"{acc if acc is None else f'{acc:.4f}'}", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(peer_main(sys.argv[1:]))
