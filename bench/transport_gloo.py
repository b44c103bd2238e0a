"""Throughput of the torch.distributed (gloo) transport beside a raw TCP socket, on loopback.

    python bench/transport_gloo.py [--mib 1 8 32] [--reps 5]

Starts itself under ``torchrun --standalone --nproc_per_node=2``. Two peers (one per rank) swap
a model-like state dict (float32 weights plus a few small BN-style entries) in both directions,
the way a 2-peer ring does every round. For each size it prints, in the same run:

* ``socket``  — the baseline: both processes ``sendall`` the raw bytes over one TCP connection
  while receiving the other's (no framing, no checks: the floor for moving those bytes);
* ``gloo``    — one bare ``batch_isend_irecv`` of a single flat tensor each way;
* ``transport`` — ``TorchDistTransport.exchange`` (preamble all_gather, header, per-dtype
  buffers, packing and unpacking into a fresh state dict);

with the median time per exchange, the throughput per direction and the ratio to ``socket``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dimat.transport.torchdist import TorchDistTransport  # noqa: E402


def model_like_state(nbytes: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = max(nbytes // 4 - 3 * 256, 256)
    return {
        "features.weight": torch.randn(n, generator=g),
        "bn.weight": torch.randn(256, generator=g),
        "bn.bias": torch.randn(256, generator=g),
        "bn.running_mean": torch.randn(256, generator=g),
        "bn.num_batches_tracked": torch.tensor(seed),
    }


def _recv_exact(conn: socket.socket, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        k = conn.recv_into(buf[got:])
        if k == 0:
            raise ConnectionError("socket closed early")
        got += k


def socket_pair(rank: int) -> socket.socket:
    """Rank 0 listens on an ephemeral loopback port, published through a gloo broadcast."""
    if rank == 0:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = torch.tensor([srv.getsockname()[1]])
        dist.broadcast(port, 0)
        conn, _ = srv.accept()
        srv.close()
    else:
        port = torch.tensor([0])
        dist.broadcast(port, 0)
        conn = socket.create_connection(("127.0.0.1", int(port.item())))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        conn.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
    return conn


def time_socket(conn: socket.socket, payload: bytes, reps: int) -> list[float]:
    inbox = bytearray(len(payload))
    out = []
    for _ in range(reps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        th = threading.Thread(target=conn.sendall, args=(payload,))
        th.start()
        _recv_exact(conn, memoryview(inbox))
        th.join()
        out.append(time.perf_counter() - t0)
    assert bytes(inbox[:16]) != b"" and len(inbox) == len(payload)
    return out[1:]  # first rep warms up


def time_gloo(rank: int, flat: torch.Tensor, reps: int) -> list[float]:
    other = 1 - rank
    inbox = torch.empty_like(flat)
    out = []
    for _ in range(reps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, flat, other), dist.P2POp(dist.irecv, inbox, other)]):
            w.wait()
        out.append(time.perf_counter() - t0)
    return out[1:]


def time_transport(t: TorchDistTransport, state: dict[str, torch.Tensor], reps: int) -> list[float]:
    me, other = t.rank, 1 - t.rank
    out = []
    for r in range(reps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        got = t.exchange(r, {me: state}, {me: [other]}, {me: [other]}).received
        out.append(time.perf_counter() - t0)
        assert other in got[me]
    return out[1:]


# ----------------------------------------------------------------------------- bench/transport.py plug-in
# One-directional methods in the (serve, send) form of the gRPC branch's bench/transport.py, so it
# can list gloo beside dimat-grpc, bare-grpc and tcp-socket:
#     from transport_gloo import gloo_serve, gloo_send      # (bench/ on sys.path)
#     METHODS["dimat-gloo"] = (gloo_serve, gloo_send)


def _main_make_state() -> Callable[..., dict[str, torch.Tensor]]:
    make = getattr(sys.modules["__main__"], "make_state", None)
    if make is None:
        raise RuntimeError("gloo_serve needs the driver's make_state(size_mib, device=...) to learn the schema")
    return make


def _join(rank: int, port: int, is_master: bool) -> TorchDistTransport:
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=is_master, timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    return TorchDistTransport(n_peers=2)


def gloo_serve(args: argparse.Namespace, ready: Callable[[int], None]) -> None:
    """Receiver (rank/peer 1): hosts the rendezvous store, receives ``args.reps`` states into fresh buffers."""
    # the receiver's own "state" only tells the transport the schema: meta tensors, no memory
    schema_only = _main_make_state()(args.size_mib, device="meta")
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=datetime.timedelta(seconds=120),
                          wait_for_workers=False)  # the sender connects after ready()
    ready(store.port)
    dist.init_process_group("gloo", store=store, rank=1, world_size=2)
    t = TorchDistTransport(n_peers=2)
    for r in range(args.reps):
        got = t.exchange(r, {1: schema_only}, {1: [0]}, {1: []}).received
        assert 0 in got[1], f"round {r}: nothing received"
        dist.barrier()  # tells the sender the whole state has arrived
        del got
    t.close()
    dist.destroy_process_group()


def gloo_send(args: argparse.Namespace, port: int, state: dict[str, torch.Tensor], rep: int) -> None:
    """Sender (rank/peer 0): one transfer; returns once the receiver has all of it."""
    global _GLOO_SENDER
    if "_GLOO_SENDER" not in globals():
        _GLOO_SENDER = _join(0, port, is_master=False)
    _GLOO_SENDER.exchange(rep, {0: state}, {0: []}, {0: [1]})
    dist.barrier()


# ----------------------------------------------------------------------------- standalone bench
def worker(args: argparse.Namespace) -> None:
    t = TorchDistTransport(n_peers=2, backend="gloo")
    rank = t.rank
    conn = socket_pair(rank)
    rows = []
    for mib in args.mib:
        state = model_like_state(int(mib * 2**20), seed=rank)
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        flat = torch.cat([v.reshape(-1).float() for v in state.values()])
        payload = flat.numpy().tobytes()
        s = statistics.median(time_socket(conn, payload, args.reps))
        g = statistics.median(time_gloo(rank, flat, args.reps))
        x = statistics.median(time_transport(t, state, args.reps))
        rows.append((nbytes, s, g, x))
    conn.close()
    if rank == 0:
        print(f"torch {torch.__version__}, 2 ranks on loopback, {os.cpu_count()} CPUs, median of {args.reps} swaps")
        print(f"{'state':>9} | {'socket ms':>9} {'MiB/s':>7} | {'gloo ms':>8} {'MiB/s':>7} {'x sock':>6} | "
              f"{'transport ms':>12} {'MiB/s':>7} {'x sock':>6}")
        for nbytes, s, g, x in rows:
            mb = nbytes / 2**20
            print(f"{mb:7.2f}Mi | {s * 1e3:9.2f} {mb / s:7.0f} | {g * 1e3:8.2f} {mb / g:7.0f} {g / s:6.2f} | "
                  f"{x * 1e3:12.2f} {mb / x:7.0f} {x / s:6.2f}")
        print("x sock = time / raw-socket time (lower is better; 1.00 = as fast as the bare socket)")
    t.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=float, nargs="+", default=[1, 8, 32], help="state sizes in MiB")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if "RANK" in os.environ:
        worker(args)
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, *sys.argv[1:]]
    sys.exit(subprocess.call(cmd, env=env))


if __name__ == "__main__":
    main()
