"""Fewer bytes per round at the same accuracy: every codec on the default job (class-disjoint, the
default recipe) and on IID, over seeds; codec throughput against a memcpy measured in the same run.

    PYTHONPATH=. python bench/compression.py [--seeds 0 1 2] [--jobs 1] [--out outputs/compression] [override ...]
    PYTHONPATH=. python bench/compression.py --throughput-only      # the GB/s table alone
    PYTHONPATH=. python bench/compression.py --table-only           # rebuild the table from finished runs

Every run is ``dimat simulate`` with the default config plus the job's partition and the codec's
``exchange.*`` overrides (in-process transport: its ``bytes_sent`` equals gRPC's and torchdist's
for the same config, tests/test_exchange.py); extra overrides apply to every run. Runs already
finished under ``--out`` are reused (the command resumes). Prints one table and writes
``table.md``, ``results.json`` and ``accuracy_vs_bytes.png``.

Accuracy: mean and spread (std over seeds) of the final round's mean test accuracy and of the mean
over the last 5 rounds; ``fewer bytes`` is the uncompressed run's bytes over the codec's, per job.
The goals (issue 27) are checked on the last-5 mean against ``none`` of the same job and seeds.

Throughput: encode and decode of a float32 state (16 tensors, 64 MiB) per codec on one torch
thread, in GB/s of float32, and as a fraction of a memcpy of the same bytes timed in this run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
JOBS = {"default": [], "iid": ["partition=iid"]}
#: every lossy codec sends a change (exchange.delta: auto); each row names its consensus step
#: (exchange.choco_step): "gamma off" mixes the public copies as received, "gamma auto" takes CHOCO's step
#: with gamma = the sender's measured contraction. Run-folder names replace spaces with "_".
CODECS: dict[str, list[str]] = {
    "none": [],
    "int8 gamma off": ["exchange.compress=int8", "exchange.choco_step=null"],
    "int8 gamma auto": ["exchange.compress=int8", "exchange.choco_step=auto"],
    "int4 gamma off": ["exchange.compress=int4", "exchange.choco_step=null"],
    "sign gamma off": ["exchange.compress=sign", "exchange.choco_step=null"],
    "sign gamma auto": ["exchange.compress=sign", "exchange.choco_step=auto"],
    "topk5% gamma off": ["exchange.compress=topk", "exchange.ratio=0.05", "exchange.choco_step=null"],
    # the previous behaviours, for comparison
    "int8 vectors compressed gamma auto": ["exchange.compress=int8", "exchange.raw_vectors=false", "exchange.choco_step=auto"],
    "int8 full state": ["exchange.compress=int8", "exchange.delta=false"],
}
DEFAULT_CODECS = "none,int8 gamma off,int8 gamma auto,int4 gamma off,sign gamma off,sign gamma auto,topk5% gamma off"
LAST = 5  # rounds in the "last rounds" mean


def run_one(job: str, codec: str, seed: int, extra: list[str], out: Path) -> dict:
    run_dir = out / "runs" / f"{job}-{codec.replace(' ', '_')}-s{seed}"
    summary = run_dir / "summary.json"
    if not summary.is_file():
        cmd = [sys.executable, "-m", "dimat", "simulate", *JOBS[job], *CODECS[codec], f"seed={seed}", *extra,
               "progress=false", "checkpoint.enabled=false", "baseline=null", f"run_dir={run_dir}"]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{job}/{codec}/seed {seed} failed:\n{proc.stderr[-3000:]}")
        print(f"  {job:>8} {codec:>24} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return read_run(run_dir, job, codec, seed)


def read_run(run_dir: Path, job: str, codec: str, seed: int) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    cum, curve = 0, []
    for r in rounds:
        cum += int(r["bytes_sent"])
        curve.append((cum, float(r["mean_acc"])))
    accs = [a for _, a in curve]
    return {"job": job, "codec": codec, "seed": seed, "final": float(s["final_mean_acc"]),
            "last": statistics.fmean(accs[-LAST:]), "bytes": int(s["total_bytes_sent"]), "rounds": len(rounds),
            "curve": curve}


def _timed(f, repeat: int = 3) -> float:
    """Best wall time of ``f`` over ``repeat`` calls after one warm-up call (first touch of pages excluded)."""
    f()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def throughput(size_mib: int = 64) -> dict:
    """Encode / decode GB/s of float32 per codec on one torch thread, and a memcpy of the same bytes."""
    from dimat.exchange import CodecSettings, get_codec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        state = [torch.randn((size_mib << 20) // 16 // 4, generator=g) for _ in range(16)]
        copies = [torch.empty_like(t) for t in state]
        nbytes = sum(t.numel() * 4 for t in state)
        memcpy = nbytes / _timed(lambda: [c.copy_(t) for c, t in zip(copies, state)]) / 1e9
        out: dict = {"memcpy_gb_s": memcpy, "mib": size_mib, "codecs": {}}
        for name in ("fp16", "bf16", "int8", "int4", "sign", "topk", "randk"):
            c = get_codec(CodecSettings(name, block=256, ratio=0.05))
            gen = torch.Generator().manual_seed(1)
            parts = [c.encode(t, t.dtype, gen) for t in state]
            enc = nbytes / _timed(lambda: [c.encode(t, t.dtype, gen) for t in state]) / 1e9
            dec = nbytes / _timed(lambda: [c.decode("w", p, tuple(t.shape), t.dtype) for t, p in zip(state, parts)]) / 1e9
            out["codecs"][name] = {"encode": enc, "decode": dec}
        return out
    finally:
        torch.set_num_threads(threads)


def aggregate(results: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (job, codec): mean and std over seeds of final and last-5 accuracy, mean bytes, seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["job"], r["codec"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        def ms(field: str) -> tuple[float, float]:
            v = [r[field] for r in rs]
            return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)
        out[key] = {"final": ms("final"), "last": ms("last"), "bytes": statistics.fmean(r["bytes"] for r in rs),
                    "seeds": sorted(r["seed"] for r in rs)}
    return out


def table(results: list[dict], tput: dict | None, args: argparse.Namespace) -> str:
    agg = aggregate(results)
    lines = ["`PYTHONPATH=. python bench/compression.py --seeds " + " ".join(map(str, args.seeds))
             + (" " + " ".join(args.overrides) if args.overrides else "") + "`", "",
             f"| job | codec | fewer bytes | final acc (mean ± std) | last-{LAST} mean | vs none (last {LAST}) | MB per run | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    goals = []
    for job in JOBS:
        base = agg.get((job, "none"))
        rows = [(c, a) for (j, c), a in agg.items() if j == job]
        for codec, a in sorted(rows, key=lambda ca: list(CODECS).index(ca[0])):
            ratio = "" if base is None else f"{base['bytes'] / a['bytes']:.1f}x"
            d = "" if base is None else f"{100 * (a['last'][0] - base['last'][0]):+.1f} pt"
            lines.append(f"| {job} | {codec} | {ratio} | {a['final'][0]:.3f} ± {a['final'][1]:.3f} | "
                         f"{a['last'][0]:.3f} ± {a['last'][1]:.3f} | {d} | {a['bytes'] / 1e6:,.1f} | "
                         f"{','.join(map(str, a['seeds']))} |")
        if base is None:
            continue
        ok = [(base["bytes"] / a["bytes"], c) for c, a in rows if c != "none" and base["last"][0] - a["last"][0] <= 0.01]
        best = max(ok, default=None)
        i8 = agg.get((job, "int8 gamma off"))
        if i8 is not None:
            gap = 100 * (base["last"][0] - i8["last"][0])
            goals.append(f"- {job}: int8 (the default exchange settings) {gap:+.1f} pt below none (goal: within 1): {'met' if gap <= 1 else 'NOT met'}")
        want = 16 if job == "iid" else 8
        goals.append(f"- {job}: most fewer bytes at <= 1 pt: " + ("none of the codecs" if best is None else
                     f"{best[0]:.1f}x ({best[1]})") + f" (goal: >= {want}x): "
                     + ("met" if best is not None and best[0] >= want else "NOT met"))
    lines += ["", "Goals (last-5 mean against none, same job and seeds):", *goals]
    if tput:
        m = tput["memcpy_gb_s"]
        lines += ["", f"Codec throughput, one torch thread, {tput['mib']} MiB of float32 in 16 tensors; "
                  f"memcpy of the same bytes in the same run: {m:.2f} GB/s", "",
                  "| codec | encode GB/s | decode GB/s | encode / memcpy | decode / memcpy |", "|---|---|---|---|---|"]
        for c, v in tput["codecs"].items():
            lines.append(f"| {c} | {v['encode']:.2f} | {v['decode']:.2f} | {v['encode'] / m:.2f} | {v['decode'] / m:.2f} |")
        slow = [c for c, v in tput["codecs"].items() if min(v["encode"], v["decode"]) < max(1.0, m / 10)]
        lines.append(f"- encode and decode >= 1 GB/s and >= memcpy/10: "
                     + ("met by every codec" if not slow else f"NOT met by {', '.join(slow)}"))
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(JOBS), figsize=(6 * len(JOBS), 4.2))
    names = [c for c in CODECS if any(r["codec"] == c for r in results)]
    colours = plt.get_cmap("tab10")
    for ax, job in zip(axes, JOBS):
        for i, codec in enumerate(names):
            rs = [r for r in results if r["job"] == job and r["codec"] == codec]
            if not rs:
                continue
            n = min(len(r["curve"]) for r in rs)  # the seeds' mean curve
            xs = [statistics.fmean(r["curve"][k][0] for r in rs) / 1e6 for k in range(n)]
            ys = [statistics.fmean(r["curve"][k][1] for r in rs) for k in range(n)]
            ax.plot(xs, ys, marker=".", color=colours(i % 10), label=f"{codec} ({len(rs)} seeds)")
        ax.set_xscale("log")
        ax.set_xlabel("cumulative MB sent (all peers)")
        ax.set_ylabel("mean test accuracy (mean over seeds)")
        ax.set_title(job)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (each one torch thread)")
    ap.add_argument("--codecs", default=DEFAULT_CODECS, help=f"comma-separated, of: {', '.join(CODECS)}")
    ap.add_argument("--job", choices=list(JOBS), action="append", help="only these jobs (default: both)")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "compression")
    ap.add_argument("--table-only", action="store_true", help="only the finished runs under --out")
    ap.add_argument("--throughput-only", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.throughput_only:
        tput = throughput()
        print(table([], tput, args))
        (args.out / "throughput.json").write_text(json.dumps(tput, indent=1))
        return
    codecs = [c.strip() for c in args.codecs.split(",")]
    unknown = [c for c in codecs if c not in CODECS]
    if unknown:
        raise SystemExit(f"unknown codec(s) {unknown}: choose from {', '.join(CODECS)}")
    jobs = args.job or list(JOBS)
    todo = [(job, c, s) for s in args.seeds for job in jobs for c in codecs]
    t0 = time.perf_counter()
    if args.table_only:
        results = []
        for job, c, s in todo:
            d = args.out / "runs" / f"{job}-{c.replace(' ', '_')}-s{s}"
            if (d / "summary.json").is_file():
                results.append(read_run(d, job, c, s))
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(lambda t: run_one(t[0], t[1], t[2], args.overrides, args.out), todo))
    wall = time.perf_counter() - t0
    tput = throughput()
    text = table(results, tput, args) + f"\n\n{len(results)} runs, {wall / 60:.1f} min wall with --jobs {args.jobs}"
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({"runs": results, "throughput": tput}, indent=1))
    if results:
        plot(results, args.out / "accuracy_vs_bytes.png")
        print(f"plot: {args.out / 'accuracy_vs_bytes.png'}")


if __name__ == "__main__":
    main()
