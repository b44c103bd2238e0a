"""Transport throughput and memory: a float32 state dict between two processes over loopback.

Measured in the same run, each method in a fresh sender/receiver process pair:
  dimat-grpc      our full path (GrpcTransport.send: chunking, hashing, schema/NaN checks, buffering)
  bare-grpc       a bare grpcio client stream of raw 4 MiB chunks (no protobuf, hashing or checks)
  bare-grpc-tuned the same with our transport's channel options (frame size, TCP reads)
  tcp-socket      a plain loopback TCP socket into a preallocated buffer
Prints MB/s, peak extra RSS of both sides (peak minus RSS just before the transfer, the receiver's
figure includes the received state itself) and ratios to the baselines.

    PYTHONPATH=. python bench/transport.py [--size-mib 256] [--reps 3] [--streams 1,2]

Adding a method (e.g. gloo for the torchdist transport): write ``serve(args, ready)`` (receiver:
call ``ready(port)`` once listening, then receive ``args.reps`` payloads) and ``send(args, port, state)``
(sender: one transfer, returns when the receiver has it all), then register them in ``METHODS``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from dimat.transport.wire import alloc_tensor

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 4 << 20
WINDOW = int(os.environ["DIMAT_BENCH_WINDOW"]) if os.environ.get("DIMAT_BENCH_WINDOW") else None
PREFETCH = int(os.environ.get("DIMAT_BENCH_PREFETCH", "2"))


GRPC_CONFIG = ROOT / "configs" / "transport" / "grpc.yaml"  # the defaults

def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_state(size_mib: int, tensors: int = 16, device: str = "cpu") -> dict[str, torch.Tensor]:
    per = (size_mib << 20) // tensors // 4
    if device == "meta":
        return {f"layer{i}.weight": torch.empty(per, device="meta") for i in range(tensors)}
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(tensors)}


# ----------------------------------------------------------------------------- dimat-grpc
def dimat_serve(args, ready: Callable[[int], None]) -> None:
    from dimat.transport.grpc import GrpcTransport
    from dimat.transport.schema import Schema

    schema = Schema.from_state(make_state(args.size_mib, device="meta"))  # shapes only, no memory
    t = GrpcTransport.from_config_file(1, {1: "127.0.0.1:0", 0: "127.0.0.1:1"}, GRPC_CONFIG, schema=schema,
                                       num_streams=args.streams, window_bytes=WINDOW, prefetch=PREFETCH)
    ready(t.port)
    for r in range(args.reps):
        t.begin_round(r, [0])
        got = t.receive(r, [0], timeout=300)
        assert got, f"round {r}: nothing received"
        del got
    time.sleep(0.5)
    t.close()


def dimat_send(args, port: int, state, rep: int) -> None:
    global _SENDER
    from dimat.transport.grpc import GrpcTransport
    from dimat.transport.wire import OutgoingPayload

    if "_SENDER" not in globals():
        _SENDER = GrpcTransport.from_config_file(0, {0: "127.0.0.1:0", 1: f"127.0.0.1:{port}"}, GRPC_CONFIG,
                                                  num_streams=args.streams, window_bytes=WINDOW)
    # --half: the wire layer's own half-precision encoding (runs use exchange.compress=fp16 instead)
    _SENDER.send(1, rep, OutgoingPayload(state, half=args.half, hash_algorithm=_SENDER.hash_algorithm), deadline=300)


# ----------------------------------------------------------------------------- bare-grpc
def _bare_opts(method: str = "bare-grpc"):
    if method == "bare-grpc-tuned":  # our transport's channel options, to separate their gain from our checks' cost
        from dimat.transport.grpc import channel_options

        return channel_options(64 << 20)
    return [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def bare_serve(args, ready) -> None:
    import threading
    from concurrent import futures

    import grpc

    done = threading.Semaphore(0)

    def push(it, ctx):
        n = sum(len(m) for m in it)
        done.release()
        return n.to_bytes(8, "little")

    h = grpc.method_handlers_generic_handler("bench.Bare", {"Push": grpc.stream_unary_rpc_method_handler(push)})
    s = grpc.server(futures.ThreadPoolExecutor(8), options=_bare_opts(args.method))
    s.add_generic_rpc_handlers((h,))
    port = s.add_insecure_port("127.0.0.1:0")
    s.start()
    ready(port)
    for _ in range(args.reps):
        done.acquire()
    time.sleep(0.5)
    s.stop(0)


def bare_send(args, port: int, state, rep: int) -> None:
    global _BARE
    import grpc

    if "_BARE" not in globals():
        ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=_bare_opts(args.method))
        _BARE = ch.stream_unary("/bench.Bare/Push")

    def gen():
        for t in state.values():
            mv = memoryview(t.numpy()).cast("B")
            for i in range(0, len(mv), CHUNK):
                yield bytes(mv[i : i + CHUNK])

    _BARE(gen(), timeout=300, wait_for_ready=True)


# ----------------------------------------------------------------------------- tcp-socket
def socket_serve(args, ready) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    ready(srv.getsockname()[1])
    conn, _ = srv.accept()
    total = args.size_mib << 20
    for _ in range(args.reps):
        buf = alloc_tensor((total,), torch.uint8)  # fresh buffer per transfer, allocated like ours
        mv = memoryview(buf.numpy())
        got = 0
        while got < total:
            n = conn.recv_into(mv[got:], min(total - got, CHUNK))
            if n == 0:
                raise ConnectionError("sender closed early")
            got += n
        conn.sendall(b"k")
        del buf, mv
    conn.close()
    srv.close()


def socket_send(args, port: int, state, rep: int) -> None:
    global _SOCK
    if "_SOCK" not in globals():
        _SOCK = socket.create_connection(("127.0.0.1", port))
    for t in state.values():
        _SOCK.sendall(memoryview(t.numpy()).cast("B"))
    assert _SOCK.recv(1) == b"k"


#: name -> (serve, send). Register more transports here (see the module docstring).
METHODS: dict[str, tuple[Callable, Callable]] = {
    "dimat-grpc": (dimat_serve, dimat_send),
    "bare-grpc": (bare_serve, bare_send),
    "bare-grpc-tuned": (bare_serve, bare_send),
    "tcp-socket": (socket_serve, socket_send),
}

# torch.distributed (gloo) point-to-point, as the torchrun transport sends it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from transport_gloo import gloo_send, gloo_serve  # noqa: E402

METHODS["dimat-gloo"] = (gloo_serve, gloo_send)


# ----------------------------------------------------------------------------- driver
def role_main(args) -> None:
    serve, send = METHODS[args.method]
    if args.role == "serve":
        base = [0]

        cpu0 = [0.0]

        def ready(port: int) -> None:  # baseline once the server is set up, before any payload
            base[0] = rss_bytes()
            cpu0[0] = cpu_seconds()
            print(json.dumps({"port": port}), flush=True)

        serve(args, ready)
        print(json.dumps({"peak_extra": peak_rss_bytes() - base[0], "cpu": cpu_seconds() - cpu0[0]}), flush=True)
    else:
        state = make_state(args.size_mib)
        if args.method == "dimat-grpc":
            import dimat.transport.grpc  # noqa: F401  (import cost outside the measurement)
        base = rss_bytes()
        cpu0 = cpu_seconds()
        times = []
        for rep in range(args.reps):
            t0 = time.perf_counter()
            send(args, args.port, state, rep)
            times.append(time.perf_counter() - t0)
            time.sleep(0.3)  # let the receiver drop the previous payload: RSS figures are per transfer
        print(json.dumps({"times": times, "peak_extra": peak_rss_bytes() - base, "cpu": cpu_seconds() - cpu0}), flush=True)


def run_method(method: str, args, streams: int = 1) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    common = [sys.executable, __file__, "--method", method, "--size-mib", str(args.size_mib), "--reps", str(args.reps),
              "--streams", str(streams)] + (["--half", args.half] if args.half else [])
    srv = subprocess.Popen(common + ["--role", "serve"], stdout=subprocess.PIPE, text=True, env=env)
    port = json.loads(srv.stdout.readline())["port"]
    cli = subprocess.run(common + ["--role", "send", "--port", str(port)], capture_output=True, text=True, env=env, timeout=900)
    if cli.returncode != 0:
        srv.kill()
        raise RuntimeError(f"{method} sender failed:\n{cli.stderr[-3000:]}")
    sent = json.loads(cli.stdout.strip().splitlines()[-1])
    out, _ = srv.communicate(timeout=120)
    recv = json.loads(out.strip().splitlines()[-1])
    best = min(sent["times"])
    return {"method": method if streams == 1 else f"{method} x{streams} streams", "mbps": (args.size_mib << 20) / best / 1e6,
            "times": sent["times"], "send_extra": sent["peak_extra"], "recv_extra": recv["peak_extra"],
            "cpu": (sent["cpu"] + recv["cpu"]) / args.reps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3, help="transfers per sender/receiver process pair")
    ap.add_argument("--cycles", type=int, default=2, help="interleaved repetitions of the whole method list")
    ap.add_argument("--streams", default="1,2", help="stream counts to try for dimat-grpc (comma-separated)")
    ap.add_argument("--half", default=None, help="send floats as float16/bfloat16 on the wire (our path only)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--role", choices=["serve", "send"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        args.streams = int(args.streams)
        role_main(args)
        return
    payload = args.size_mib << 20
    runs = [(m, k) for m in args.methods.split(",")
            for k in ([int(s) for s in args.streams.split(",")] if m == "dimat-grpc" else [1])]
    best: dict[str, dict] = {}
    # methods are interleaved over several cycles so that a noisy moment on a shared machine does not
    # single out one method; each row keeps its best transfer and its worst memory figures
    for cycle in range(args.cycles):
        for m, k in runs:
            row = run_method(m, args, k)
            print(f"[cycle {cycle}] {row['method']:<26} {row['mbps']:8.0f} MB/s  transfers {[round(t, 3) for t in row['times']]} s  "
                  f"peak extra RSS: sender {row['send_extra'] / payload:4.2f}x  receiver {row['recv_extra'] / payload:4.2f}x payload  "
                  f"CPU {row['cpu']:.2f} s/transfer (both sides)", flush=True)
            b = best.setdefault(row["method"], dict(row))
            b["mbps"] = max(b["mbps"], row["mbps"])
            b["send_extra"] = max(b["send_extra"], row["send_extra"])
            b["recv_extra"] = max(b["recv_extra"], row["recv_extra"])
    rows = list(best.values())
    print(f"\n{'method':<26} {'best MB/s':>9}   peak extra RSS (worst run)")
    for row in rows:
        print(f"{row['method']:<26} {row['mbps']:9.0f}   sender {row['send_extra'] / payload:4.2f}x  receiver {row['recv_extra'] / payload:4.2f}x payload")
    by = {r["method"]: r for r in rows}
    ours = max((r for r in rows if r["method"].startswith("dimat-grpc")), key=lambda r: r["mbps"], default=None)
    if ours:
        print(f"\npayload {args.size_mib} MiB float32{' (wire ' + args.half + ')' if args.half else ''}; best dimat-grpc: {ours['method']}")
        for base in ("bare-grpc", "bare-grpc-tuned", "tcp-socket"):
            if base in by:
                print(f"  dimat-grpc / {base:<10} throughput ratio {ours['mbps'] / by[base]['mbps']:.2f}")
        worst = max(ours["send_extra"], ours["recv_extra"]) / payload
        print(f"  peak extra memory {worst:.2f}x payload (goal <= 1.5x): {'OK' if worst <= 1.5 else 'OVER'}")
        if "bare-grpc" in by:
            ok = ours["mbps"] >= by["bare-grpc"]["mbps"]
            print(f"  full path >= bare grpcio throughput: {'OK' if ok else 'NO'}")


if __name__ == "__main__":
    main()
