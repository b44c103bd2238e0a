"""Soak test (not in CI): N gRPC peer processes x R rounds with random SIGKILLs, restarts and hostile clients.

    PYTHONPATH=. python bench/soak.py [--peers 8] [--rounds 200] [--mean-kill-s 15] [--hostile] [overrides...]

``--hostile`` adds an attacker beside the random kills (raw clients from the generated ``dimat.v1``
stubs; the peers run without token or TLS, the default, so it reaches every handler): it holds
``--stalled`` PushWeights streams that send nothing against every peer, sends heartbeats from
made-up ids and a shape bomb (a header with 32k dimensions of 2**62, for round R+1, which a
receiver admits once it is within ``max_rounds_ahead`` of the end) every few seconds, and probes
each peer's health. Printed besides: the attacker's counts, the slowest health answer and each
peer's peak resident memory (sampled from /proc every 0.2 s).

A chaos loop kills a random running peer (SIGKILL, no goodbye; only one that has been up for
``--min-uptime-s``) every ``--mean-kill-s`` seconds on average, restarts it with ``--resume`` after a random 1-5 s downtime, and waits until every peer has
finished all rounds. Printed at the end: rounds completed per peer, kills, rejoins (restarts that
fetched a neighbour's state), and **data lost**, which must be 0: a peer that did not reach the last
round, a checkpoint that does not load, a metrics file with a duplicated or out-of-order round, or a
progress file that disagrees with the metrics.
"""
from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dimat.grpc_peer import load_peers_file
from dimat.transport.grpc import pb2, pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("grpc_local", ROOT / "launch" / "grpc_local.py")
grpc_local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grpc_local)

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
MAX_ITERATIONS = 100_000  # per attacker loop, besides the time bound

DEFAULTS = ["experiment=mnist1d_fast", "progress=false", "local_epochs=0.5", "transport.timeout=20",
            "transport.heartbeat_interval=0.5", "transport.max_missed_heartbeats=3", "checkpoint.keep_last=2"]


def audit(fed, rounds: int) -> tuple[dict[int, int], list[str]]:
    """Rounds completed per peer and a list of data-loss findings (empty = nothing lost)."""
    done, lost = {}, []
    for k in range(fed.n):
        recs = fed.metrics(k)
        rs = [r["round"] for r in recs]
        done[k] = rs[-1] if rs else 0
        if rs != sorted(set(rs)):
            lost.append(f"peer {k}: metrics rounds duplicated or out of order")
        if done[k] != rounds:
            lost.append(f"peer {k}: finished at round {done[k]} of {rounds}")
        prog = fed.run_dir / "checkpoints" / f"progress_peer_{k}.json"
        if not prog.exists() or json.loads(prog.read_text())["last_round"] != done[k]:
            lost.append(f"peer {k}: progress file does not match its last logged round {done[k]}")
    for p in sorted((fed.run_dir / "checkpoints").rglob("round_*.pt")):
        try:
            torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unreadable checkpoint is lost data
            lost.append(f"{p}: {exc}")
    return done, lost


def rss_mb(pid: int) -> float:
    """Resident memory of a running process in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def loopback_only(addresses: dict[int, str]) -> None:
    """Refuse to attack anything but this machine: every address must be in 127.0.0.0/8."""
    for k, a in addresses.items():
        host = a.rpartition(":")[0].strip("[]")
        try:
            ok = ipaddress.ip_address(host) in LOOPBACK
        except ValueError:
            ok = False
        if not ok:
            raise SystemExit(f"soak --hostile attacks loopback addresses only (127.0.0.0/8); peer {k} is at {a}")


class Attacker:
    """Hostile clients against every peer address, until :meth:`stop` (every loop bounded by ``seconds``
    and by an iteration count; only addresses in 127.0.0.0/8 are accepted)."""

    def __init__(self, addresses: dict[int, str], stalled: int, seconds: float, seed: int = 0, rounds: int = 0) -> None:
        loopback_only(addresses)
        self.grpc, self.pb2, self.pb2_grpc = grpc, pb2, pb2_grpc
        self.addresses, self.stalled, self.end = addresses, stalled, time.monotonic() + seconds
        self.rng = random.Random(seed)
        self.bomb_round = rounds + 1  # claims peer 0, for a round the run never reaches (admitted near the end)
        self.halt = threading.Event()
        self.counts: dict[str, int] = {}
        self.worst_health_ms = 0.0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._stall, args=(a, i), daemon=True)
                        for a in addresses.values() for i in range(stalled)]
        self.threads += [threading.Thread(target=self._noise, daemon=True), threading.Thread(target=self._health, daemon=True)]

    def _count(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def _alive(self) -> bool:
        return not self.halt.is_set() and time.monotonic() < self.end

    def _loop(self) -> range:
        """The iterations any one loop may run at most (besides its time bound)."""
        return range(MAX_ITERATIONS)

    def _stall(self, address: str, i: int) -> None:
        grpc = self.grpc
        ch = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)] if i % 16 == 0 else [])

        def nothing():
            self.halt.wait(max(0.0, self.end - time.monotonic()))
            return
            yield

        for _ in self._loop():
            if not self._alive():
                break
            try:
                self.pb2_grpc.PeerStub(ch).PushWeights(nothing(), timeout=60)
            except grpc.RpcError as exc:
                self._count(f"stalled stream ended {exc.code().name}")
            self.halt.wait(0.2)
        ch.close()

    def _noise(self) -> None:
        grpc, pb2 = self.grpc, self.pb2
        bomb = pb2.WeightChunk(round=self.bomb_round, sender=0, header=pb2.PayloadHeader(
            tensors=[pb2.TensorSpec(name="x", dtype="float32", shape=[2 ** 62] * 32768, offset=0, nbytes=4)], total_bytes=4))
        for _ in self._loop():
            if not self._alive():
                break
            for address in self.addresses.values():
                ch = grpc.insecure_channel(address)
                stub = self.pb2_grpc.PeerStub(ch)
                fs = [stub.Heartbeat.future(pb2.HeartbeatRequest(round=10 ** 9, sender=self.rng.randrange(10 ** 6, 10 ** 9)),
                                            timeout=5) for _ in range(50)]
                for f in fs:
                    try:
                        f.result()
                        self._count("made-up heartbeat accepted")
                    except grpc.RpcError as exc:
                        self._count(f"made-up heartbeat {exc.code().name}")
                try:
                    stub.PushWeights(iter([bomb]), timeout=5)
                except grpc.RpcError as exc:
                    self._count(f"shape bomb {exc.code().name}")
                ch.close()
            self.halt.wait(2.0)

    def _health(self) -> None:
        chans = {k: grpc.insecure_channel(a) for k, a in self.addresses.items()}
        for _ in self._loop():
            if not self._alive():
                break
            for k, ch in chans.items():
                t0 = time.monotonic()
                try:
                    health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="dimat.v1.Peer"), timeout=2)
                    with self.lock:
                        self.worst_health_ms = max(self.worst_health_ms, (time.monotonic() - t0) * 1000)
                except grpc.RpcError:
                    self._count("health check failed (peer down or restarting)")
            self.halt.wait(0.5)

    def start(self) -> None:
        for th in self.threads:
            th.start()

    def stop(self) -> None:
        self.halt.set()
        for th in self.threads:
            th.join(timeout=5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--mean-kill-s", type=float, default=15.0)
    ap.add_argument("--min-uptime-s", type=float, default=20.0,
                    help="a peer is only killed after running this long (startup included)")
    ap.add_argument("--max-kills", type=int, default=None, help="stop killing after this many kills")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--timeout", type=float, default=4 * 3600)
    ap.add_argument("--hostile", action="store_true", help="add hostile clients (stalled streams, made-up heartbeats, shape bombs)")
    ap.add_argument("--stalled", type=int, default=64, help="stalled streams held against each peer with --hostile")
    ns, overrides = ap.parse_known_args()
    rng = random.Random(ns.seed)
    run_dir = Path(ns.run_dir or f"outputs/soak_{time.strftime('%Y-%m-%d_%H-%M-%S')}").resolve()
    env = dict(os.environ, DIMAT_TOKEN="") if ns.hostile else None  # no token: the attacker reaches every handler
    fed = grpc_local.LocalFederation(run_dir, ns.peers, [*DEFAULTS, f"rounds={ns.rounds}", *overrides], env=env)
    kills = restarts = 0
    peak_rss: dict[int, float] = {k: 0.0 for k in range(ns.peers)}
    attacker = None
    t0 = time.monotonic()
    try:
        if ns.hostile:
            attacker = Attacker(load_peers_file(fed.peers_file), ns.stalled, ns.timeout, seed=ns.seed, rounds=ns.rounds)
            attacker.start()
        started: dict[int, float] = {}
        for k in range(ns.peers):
            fed.start(k)
            started[k] = time.monotonic()
        next_kill = time.monotonic() + rng.expovariate(1 / ns.mean_kill_s)
        pending: dict[int, float] = {}  # peer -> restart time
        while time.monotonic() - t0 < ns.timeout:
            now = time.monotonic()
            for k, at in list(pending.items()):
                if now >= at:
                    fed.start(k, resume=True)
                    started[k] = now
                    restarts += 1
                    del pending[k]
            running = [k for k, p in fed.procs.items() if p.poll() is None and k not in pending]
            if not running and not pending:
                break
            # chaos while a federation remains: never the last peer still running
            victims = [k for k in running if now - started[k] >= ns.min_uptime_s] if len(running) >= 2 else []
            if ns.max_kills is not None and kills >= ns.max_kills:
                victims = []
            if now >= next_kill and victims and not pending:
                k = rng.choice(victims)
                fed.kill(k)
                kills += 1
                pending[k] = now + rng.uniform(1, 5)
                print(f"[soak] {now - t0:7.1f}s kill peer {k} (kills {kills})", flush=True)
                next_kill = now + rng.expovariate(1 / ns.mean_kill_s)
            for k, p in fed.procs.items():
                if p.poll() is None:
                    peak_rss[k] = max(peak_rss[k], rss_mb(p.pid))
            time.sleep(0.2)
        codes = fed.wait_all(timeout=60)
    finally:
        if attacker is not None:
            attacker.stop()
        fed.stop()
    done, lost = audit(fed, ns.rounds)
    rejoins = sum(len(fed.rejoins(k)) for k in range(ns.peers))
    print(f"\n[soak] {ns.peers} peers x {ns.rounds} rounds in {time.monotonic() - t0:.0f}s; exit codes {codes}")
    print(f"[soak] rounds completed per peer: {done}")
    print(f"[soak] kills {kills}, restarts {restarts}, rejoins with state fetch {rejoins}")
    print(f"[soak] peak RSS per peer (MiB): {{{', '.join(f'{k}: {v:.0f}' for k, v in peak_rss.items())}}}")
    if attacker is not None:
        print(f"[soak] attacker: {ns.stalled} stalled streams per peer; {dict(sorted(attacker.counts.items()))}")
        print(f"[soak] slowest health answer under attack: {attacker.worst_health_ms:.0f} ms")
    print(f"[soak] data lost: {len(lost)}" + "".join(f"\n  - {x}" for x in lost))
    return 0 if not lost and all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
