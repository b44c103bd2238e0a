"""How a simulated federation scales with the number of peers: wall time per round and peak memory.

Runs a DIMAT federation of 1-D CNN peers on a ring (MNIST-1D, IID split, 1 local epoch per round)
for N = 8, 16, 32, 64, each in a fresh subprocess so peak RSS is that run's own. A baseline process
that imports everything and loads the data but builds no peer is measured the same way, so

    per-peer memory = (peak RSS(N) - peak RSS(baseline)) / N

is compared with what a peer must hold: model + optimizer state (SGD momentum = one copy of the
parameters) + its share of the training data. Time per round is reported against N/8, the linear
growth we aim for (the total training work is constant in N: the data set is split, not copied;
merging, exchange and evaluation grow with N).

    PYTHONPATH=. python bench/scale.py            # N = 8 16 32 64
    PYTHONPATH=. python bench/scale.py --peers 8 16 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _overrides(n: int, rounds: int) -> list[str]:
    return [f"num_peers={n}", f"rounds={rounds}", "local_epochs=1", "partition=iid", "topology=ring",
            "merge=dimat", "merge.every_steps=null", "merge.keep_momentum=false", "merge.reset_bn=true",
            "baseline=null", "train.batch_size=64", "train.lr=0.05", "merge.align_batches=2",
            "progress=false", "checkpoint.enabled=false", "threads=1"]


def child(n: int, rounds: int, out: str) -> None:
    """Run one federation of ``n`` peers (0 = baseline: data only) and write figures to ``out``."""
    import tempfile

    import torch
    from dimat.entry import load
    from dimat.federation import build_federation, run_rounds
    from dimat.federation.build import load_data
    from dimat.transport.inproc import InProcTransport

    torch.set_num_threads(1)
    cfg = load(_overrides(max(n, 3), rounds))
    rec: dict = {"n": n}
    if n == 0:
        load_data(cfg)
        import dimat.merge  # noqa: F401  (same imports as a real run)
    else:
        fed = build_federation(cfg)
        peer = fed.peers[0]
        params = sum(p.numel() * p.element_size() for p in peer.model.parameters())
        rec["model_bytes"] = fed.info["model_bytes"]
        rec["optimizer_bytes"] = params  # SGD momentum: one buffer per parameter
        rec["data_bytes_per_peer"] = sum(
            (p.x.numel() * p.x.element_size() + p.y.numel() * p.y.element_size()
             + (0 if p.val is None else p.val[0].numel() * 4 + p.val[1].numel() * 8)) for p in fed.peers.values()
        ) / n
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            summary = run_rounds(fed, InProcTransport(), tmp, progress=False)
            rec["total_s"] = time.perf_counter() - t0
        times = [r["time_s"] for r in summary["rounds"]]
        rec["round_s"] = min(times[1:]) if len(times) > 1 else times[0]  # skip warm-up round
        rec["acc"] = summary["final_mean_acc"]
    rec["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out).write_text(json.dumps(rec))


def run(n: int, rounds: int) -> dict:
    out = Path(f"/tmp/dimat_scale_{os.getpid()}_{n}.json")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, __file__, "--child", str(n), "--rounds", str(rounds), "--out", str(out)],
                   check=True, env=env)
    rec = json.loads(out.read_text())
    out.unlink()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.rounds, args.out)
        return
    mib = 1024 * 1024
    base = run(0, args.rounds)
    print(f"baseline process (imports + data, no peers): peak RSS {base['peak_rss_bytes'] / mib:.1f} MiB")
    rows = []
    for n in args.peers:
        rec = run(n, args.rounds)
        rows.append(rec)
        print(f"  N={n:>3}: {rec['round_s']:.2f} s/round, peak RSS {rec['peak_rss_bytes'] / mib:.1f} MiB", flush=True)
    first = rows[0]
    print()
    print("| peers | s/round | time ratio | N ratio | peak RSS MiB | per-peer KiB (measured) | model+opt+data KiB | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        per_peer = (r["peak_rss_bytes"] - base["peak_rss_bytes"]) / r["n"]
        need = r["model_bytes"] + r["optimizer_bytes"] + r["data_bytes_per_peer"]
        print(f"| {r['n']} | {r['round_s']:.2f} | {r['round_s'] / first['round_s']:.2f} | {r['n'] / first['n']:.0f} | "
              f"{r['peak_rss_bytes'] / mib:.1f} | {per_peer / 1024:.0f} | {need / 1024:.0f} | {per_peer / need:.2f} |")
    last = rows[-1]
    if len(rows) > 1:  # the slope excludes one-time costs (first allocations, lazy imports)
        marginal = (last["peak_rss_bytes"] - first["peak_rss_bytes"]) / (last["n"] - first["n"])
        need = last["model_bytes"] + last["optimizer_bytes"] + last["data_bytes_per_peer"]
        print(f"\nmarginal memory per added peer (N={first['n']}->{last['n']}): {marginal / 1024:.0f} KiB "
              f"vs model+optimizer+data {need / 1024:.0f} KiB (ratio {marginal / need:.2f}; the rest is the "
              f"round's transient copies: received neighbour states, merge working models, activation stats)")
    growth_t = (last["round_s"] / first["round_s"]) / (last["n"] / first["n"])
    print(f"\ntime per round grew {last['round_s'] / first['round_s']:.2f}x for {last['n'] / first['n']:.0f}x peers "
          f"({growth_t:.2f} of linear); model {first['model_bytes'] / 1024:.0f} KiB, "
          f"optimizer {first['optimizer_bytes'] / 1024:.0f} KiB per peer")


if __name__ == "__main__":
    main()
