#!/usr/bin/env python
"""Start N gRPC peers on 127.0.0.1 (free ports), wait for all of them, report how each ended.

    python launch/grpc_local.py --num-peers 4 [--run-dir DIR] [--certs DIR] [hydra overrides...]

Writes ``<run_dir>/peers.yaml``, starts ``python -m dimat peer --id K --peers <run_dir>/peers.yaml``
for every K with the same overrides (``num_peers`` and ``run_dir`` are set for you), logs each peer to
``<run_dir>/peer_K.log`` and exits non-zero if any peer failed. With ``--certs DIR`` (made by
``launch/make_certs.sh DIR N``) peers use mutual TLS with per-peer certificates. A shared token for
the run is generated and handed to the peers through the ``DIMAT_TOKEN`` environment variable.
Ctrl-C stops every peer.
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports the OS reports free right now (all held open until every one is picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_peers_file(path: Path, ports: list[int], host: str = "127.0.0.1") -> dict[int, str]:
    peers = {k: f"{host}:{p}" for k, p in enumerate(ports)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("peers:\n" + "".join(f"  {k}: {a}\n" for k, a in peers.items()))
    os.replace(tmp, path)
    return peers


def peer_command(k: int, peers_file: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "dimat", "peer", "--id", str(k), "--peers", str(peers_file), *overrides]


class LocalFederation:
    """N ``dimat peer`` processes on free loopback ports sharing one run folder, each startable,
    killable and restartable on its own (fault tests and the soak benchmark use it)."""

    def __init__(self, run_dir: Path, n: int, overrides: list[str], env: dict[str, str] | None = None):
        self.run_dir, self.n = Path(run_dir), n
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.peers_file = self.run_dir / "peers.yaml"
        write_peers_file(self.peers_file, free_ports(n))
        self.overrides = [*overrides, f"num_peers={n}", f"run_dir={self.run_dir}"]
        self.env = dict(os.environ if env is None else env)
        self.env["PYTHONPATH"] = str(ROOT) + (os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")
        self.env.setdefault("DIMAT_TOKEN", secrets.token_hex(16))
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, Path] = {}

    def start(self, k: int, extra: tuple[str, ...] = (), resume: bool = False) -> None:
        cmd = peer_command(k, self.peers_file, [*self.overrides, *extra])
        if resume:
            cmd.insert(cmd.index("--peers"), "--resume")
        self.logs[k] = self.run_dir / f"peer_{k}.log"
        with open(self.logs[k], "a") as fh:
            self.procs[k] = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)

    def kill(self, k: int) -> None:
        self.procs[k].send_signal(signal.SIGKILL)
        self.procs[k].wait()

    def wait_log(self, k: int, pattern: str, timeout: float) -> None:
        import re

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.logs[k].exists() and re.search(pattern, self.logs[k].read_text()):
                return
            if self.procs[k].poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"peer {k}: {pattern!r} not seen in {timeout}s\n" + self.logs[k].read_text()[-3000:])

    def wait_all(self, timeout: float) -> dict[int, int | None]:
        end = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(timeout=max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return {k: p.poll() for k, p in self.procs.items()}

    def logs_text(self) -> str:
        return "\n".join(f"--- peer {k}\n" + p.read_text()[-2500:] for k, p in self.logs.items() if p.exists())

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    def _jsonl(self, k: int, name: str) -> list[dict]:
        import json

        path = self.run_dir / f"peer_{k}" / name
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def metrics(self, k: int) -> list[dict]:
        return self._jsonl(k, "metrics.jsonl")

    def transport_log(self, k: int) -> list[dict]:
        return self._jsonl(k, "transport.jsonl")

    def rejoins(self, k: int) -> list[dict]:
        return self._jsonl(k, "rejoins.jsonl")


def launch(num_peers: int, run_dir: Path, overrides: list[str], *, certs: Path | None = None,
           timeout: float | None = None, echo=print) -> dict[int, int]:
    """Run the federation; returns ``{peer: exit code}``."""
    run_dir = run_dir.resolve()
    ports = free_ports(num_peers)
    peers_file = run_dir / "peers.yaml"
    write_peers_file(peers_file, ports)
    ovs = [o for o in overrides if not o.startswith(("num_peers=", "run_dir="))]
    ovs += [f"num_peers={num_peers}", f"run_dir={run_dir}"]
    if certs is not None:
        ovs += [f"transport.tls.dir={certs.resolve()}", "transport.tls.mutual=true", "transport.require_cert_identity=true"]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("DIMAT_TOKEN", secrets.token_hex(16))
    procs: dict[int, subprocess.Popen] = {}
    logs = {}
    try:
        for k in range(num_peers):
            logs[k] = open(run_dir / f"peer_{k}.log", "w")
            procs[k] = subprocess.Popen(peer_command(k, peers_file, ovs), stdout=logs[k], stderr=subprocess.STDOUT,
                                        env=env, cwd=ROOT)
        echo(f"[launch] {num_peers} peers on {', '.join(f'127.0.0.1:{p}' for p in ports)}; logs in {run_dir}/peer_K.log")
        end = None if timeout is None else time.monotonic() + timeout
        codes: dict[int, int] = {}
        while len(codes) < num_peers:
            for k, p in procs.items():
                if k not in codes and p.poll() is not None:
                    codes[k] = p.returncode
                    echo(f"[launch] peer {k} exited with {p.returncode}")
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"peers {sorted(set(procs) - set(codes))} still running after {timeout:.0f}s")
            time.sleep(0.1)
        return codes
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for fh in logs.values():
            fh.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-peers", "-n", type=int, required=True)
    ap.add_argument("--run-dir", default=None, help="shared output folder (default outputs/grpc_<time>)")
    ap.add_argument("--certs", default=None, help="folder from launch/make_certs.sh: run with mutual TLS")
    ap.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    ns, overrides = ap.parse_known_args(argv)
    if ns.num_peers < 1:
        ap.error("--num-peers must be at least 1")
    run_dir = Path(ns.run_dir or f"outputs/grpc_{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    try:
        codes = launch(ns.num_peers, run_dir, overrides, certs=Path(ns.certs) if ns.certs else None, timeout=ns.timeout)
    except KeyboardInterrupt:
        print("[launch] interrupted; peers stopped", file=sys.stderr)
        return 130
    except TimeoutError as exc:
        print(f"[launch] {exc}", file=sys.stderr)
        return 1
    failed = {k: c for k, c in codes.items() if c != 0}
    if failed:
        print(f"[launch] failed peers: {failed} (see {run_dir}/peer_K.log)", file=sys.stderr)
        return 1
    print(f"[launch] all {ns.num_peers} peers finished; outputs in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
