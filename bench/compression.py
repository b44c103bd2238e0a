"""Fewer bytes per round: accuracy and bytes sent for every codec, on IID and on the class-disjoint
default job, at the same rounds; codec throughput beside the gRPC transport's MB/s.

    PYTHONPATH=. python bench/compression.py [--rounds 20] [--jobs 1] [--out bench/out/compression] [override ...]

Every run is ``dimat simulate`` (in-process transport: its ``bytes_sent`` equals gRPC's and
torchdist's for the same config, tests/test_exchange.py) with the default config plus the job's
partition and the codec's ``exchange.*`` overrides; extra overrides apply to every run (e.g.
``rounds=10`` is the same as ``--rounds 10``). Prints one table, writes ``table.md``,
``results.json`` and ``accuracy_vs_bytes.png`` (accuracy after each round against cumulative bytes).

Throughput: encode + decode of a 64 MiB float32 state (16 tensors) per codec, in GB/s of float32
input, against one loopback push between two real gRPC transports in this process (MB/s).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
JOBS = {"iid": ["partition=iid"], "class-disjoint": []}
CODECS: dict[str, list[str]] = {
    "none": [],
    "fp16": ["exchange.compress=fp16"],
    "int8": ["exchange.compress=int8"],
    "int4": ["exchange.compress=int4"],
    "int4+ef": ["exchange.compress=int4", "exchange.error_feedback=true"],
    "int8+delta": ["exchange.compress=int8", "exchange.delta=true"],
    "int4+delta": ["exchange.compress=int4", "exchange.delta=true"],
    "topk10%+delta": ["exchange.compress=topk", "exchange.ratio=0.1", "exchange.delta=true"],
    "randk10%+delta": ["exchange.compress=randk", "exchange.ratio=0.1", "exchange.delta=true"],
    "int4/tensor+ef": ["exchange.compress=int4", "exchange.block=null", "exchange.error_feedback=true"],
    "topk5%+delta": ["exchange.compress=topk", "exchange.ratio=0.05", "exchange.delta=true"],
    # consensus SGD and its CHOCO-gossip form (gamma 0.5, not tuned), same job and rounds
    "gossip": ["merge=gossip"],
    "gossip+choco-topk10%": ["merge=gossip", "exchange.compress=topk", "exchange.ratio=0.1", "exchange.delta=true",
                             "exchange.choco_step=0.5"],
}
#: the rows ``vs none`` compares with: gossip rows with plain gossip, the others with the job's own method
BASE = {"gossip+choco-topk10%": "gossip"}


GRPC_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "transport" / "grpc.yaml"  # the defaults

def run_one(job: str, codec: str, rounds: int, extra: list[str], out: Path) -> dict:
    run_dir = out / "runs" / f"{job}-{codec}"
    summary = run_dir / "summary.json"
    if not summary.is_file():
        cmd = [sys.executable, "-m", "dimat", "simulate", *JOBS[job], *CODECS[codec], f"rounds={rounds}", *extra,
               "progress=false", "checkpoint.enabled=false", "baseline=null", f"run_dir={run_dir}"]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{job}/{codec} failed:\n{proc.stderr[-3000:]}")
        print(f"  {job:>14} {codec:>15}: {time.perf_counter() - t0:.0f} s", flush=True)
    s = json.loads(summary.read_text())
    rounds_ = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    cum, curve = 0, []
    for r in rounds_:
        cum += int(r["bytes_sent"])
        curve.append((cum, float(r["mean_acc"])))
    return {"job": job, "codec": codec, "acc": float(s["final_mean_acc"]), "bytes": int(s["total_bytes_sent"]),
            "rounds": int(s["rounds_done"]), "curve": curve}


def codec_throughput(size_mib: int = 64) -> dict[str, tuple[float, float]]:
    """(encode GB/s, decode GB/s) of float32 input for each codec, on this machine's torch threads."""
    from dimat.exchange import CodecSettings, get_codec

    g = torch.Generator().manual_seed(0)
    per = (size_mib << 20) // 16 // 4
    state = [torch.randn(per, generator=g) for _ in range(16)]
    nbytes = sum(t.numel() * 4 for t in state)
    out = {}
    for name in ("fp16", "bf16", "int8", "int4", "topk", "randk"):
        c = get_codec(CodecSettings(name, block=256, ratio=0.1))
        gen = torch.Generator().manual_seed(1)
        best_e = best_d = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            parts = [c.encode(t, t.dtype, gen) for t in state]
            t1 = time.perf_counter()
            for t, p in zip(state, parts):
                c.decode("w", p, tuple(t.shape), t.dtype)
            t2 = time.perf_counter()
            best_e, best_d = min(best_e, t1 - t0), min(best_d, t2 - t1)
        out[name] = (nbytes / best_e / 1e9, nbytes / best_d / 1e9)
    return out


def grpc_mb_s(size_mib: int = 64) -> float:
    """One push of a float32 state between two real gRPC transports on loopback (send to received), MB/s."""
    from dimat.transport.grpc import GrpcTransport

    g = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn((size_mib << 20) // 16 // 4, generator=g) for i in range(16)}
    ts = [GrpcTransport.from_config_file(i, {i: "127.0.0.1:0"}, GRPC_CONFIG, heartbeat_interval=None) for i in range(2)]
    try:
        book = {t.peer_id: t.address for t in ts}
        for t in ts:
            t.set_peers(book)
        ts[0].wait_for_peers([1], timeout=10)
        ts[1].set_schema(state)
        best = float("inf")
        for r in range(2):
            ts[1].begin_round(r, [0])
            t0 = time.perf_counter()
            ts[0].send(1, r, state)
            ts[1].receive(r, [0], timeout=60)
            best = min(best, time.perf_counter() - t0)
    finally:
        for t in ts:
            t.close(grace=0)
    return (size_mib << 20) / best / 1e6


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(JOBS), figsize=(6 * len(JOBS), 4.2))
    names = list(dict.fromkeys(r["codec"] for r in results))
    colours = plt.get_cmap("tab20")
    for ax, job in zip(axes, JOBS):
        for r in [r for r in results if r["job"] == job]:
            i = names.index(r["codec"])
            xs = [b / 1e6 for b, _ in r["curve"]]
            ax.plot(xs, [a for _, a in r["curve"]], marker=".", color=colours(i % 20),
                    linestyle="--" if "gossip" in r["codec"] else "-", label=r["codec"])
        ax.set_xscale("log")
        ax.set_xlabel("cumulative MB sent (all peers)")
        ax.set_ylabel("mean test accuracy")
        ax.set_title(job)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (each one torch thread)")
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "compression")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    codecs = args.codecs.split(",")
    todo = [(job, c) for job in JOBS for c in codecs]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda jc: run_one(jc[0], jc[1], args.rounds, args.overrides, args.out), todo))
    wall = time.perf_counter() - t0
    tput = codec_throughput()
    mbs = grpc_mb_s()

    lines = [f"`PYTHONPATH=. python bench/compression.py --rounds {args.rounds} --jobs {args.jobs}"
             + (" " + " ".join(args.overrides) if args.overrides else "") + "`",
             "", "| job | codec | final mean acc | vs none (gossip rows: vs gossip) | bytes sent | fewer bytes |", "|---|---|---|---|---|---|"]
    for job in JOBS:
        for r in [r for r in results if r["job"] == job]:
            ref = "none" if r["codec"] != "gossip" else None
            ref = BASE.get(r["codec"], ref)
            base = next((b for b in results if b["job"] == job and b["codec"] == ref), None)
            d = "" if base is None else f"{100 * (r['acc'] - base['acc']):+.1f} pt"
            x = "" if base is None else f"{base['bytes'] / r['bytes']:.2f}x"
            lines.append(f"| {job} | {r['codec']} | {r['acc']:.3f} | {d} | {r['bytes'] / 1e6:,.1f} MB | {x} |")
    lines += ["", f"codec throughput (GB/s of float32, encode / decode, {torch.get_num_threads()} torch thread(s)); "
              f"gRPC loopback push of 64 MiB: {mbs:,.0f} MB/s", "",
              "| codec | encode GB/s | decode GB/s |", "|---|---|---|"]
    lines += [f"| {c} | {e:.2f} | {d:.2f} |" for c, (e, d) in tput.items()]
    lines += ["", f"{len(todo)} runs, {wall / 60:.1f} min wall with --jobs {args.jobs}"]
    table = "\n".join(lines)
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps({"runs": results, "throughput_gb_s": tput, "grpc_mb_s": mbs}, indent=1))
    plot(results, args.out / "accuracy_vs_bytes.png")
    print(f"plot: {args.out / 'accuracy_vs_bytes.png'}")


if __name__ == "__main__":
    main()
