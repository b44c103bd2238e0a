"""Soak test (not in CI): N gRPC peer processes x R rounds with random SIGKILLs and restarts.

    PYTHONPATH=. python bench/soak.py [--peers 8] [--rounds 200] [--mean-kill-s 15] [overrides...]

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
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("grpc_local", ROOT / "launch" / "grpc_local.py")
grpc_local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grpc_local)

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--mean-kill-s", type=float, default=15.0)
    ap.add_argument("--min-uptime-s", type=float, default=20.0,
                    help="a peer is only killed after running this long (startup included)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--timeout", type=float, default=4 * 3600)
    ns, overrides = ap.parse_known_args()
    rng = random.Random(ns.seed)
    run_dir = Path(ns.run_dir or f"outputs/soak_{time.strftime('%Y-%m-%d_%H-%M-%S')}").resolve()
    fed = grpc_local.LocalFederation(run_dir, ns.peers, [*DEFAULTS, f"rounds={ns.rounds}", *overrides])
    kills = restarts = 0
    t0 = time.monotonic()
    try:
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
            if now >= next_kill and victims and not pending:
                k = rng.choice(victims)
                fed.kill(k)
                kills += 1
                pending[k] = now + rng.uniform(1, 5)
                print(f"[soak] {now - t0:7.1f}s kill peer {k} (kills {kills})", flush=True)
                next_kill = now + rng.expovariate(1 / ns.mean_kill_s)
            time.sleep(0.2)
        codes = fed.wait_all(timeout=60)
    finally:
        fed.stop()
    done, lost = audit(fed, ns.rounds)
    rejoins = sum(len(fed.rejoins(k)) for k in range(ns.peers))
    print(f"\n[soak] {ns.peers} peers x {ns.rounds} rounds in {time.monotonic() - t0:.0f}s; exit codes {codes}")
    print(f"[soak] rounds completed per peer: {done}")
    print(f"[soak] kills {kills}, restarts {restarts}, rejoins with state fetch {rejoins}")
    print(f"[soak] data lost: {len(lost)}" + "".join(f"\n  - {x}" for x in lost))
    return 0 if not lost and all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
