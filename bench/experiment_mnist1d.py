"""The results table of docs/results.md: every method on the same MNIST-1D federation.

MNIST-1D, 5 peers, class-disjoint non-IID (class c -> peer c mod 5), ring, per-peer init seeds,
20 rounds x 2 local epochs (the ``experiment=mnist1d_results`` preset), for dimat, weight_matching,
average, gossip, isolated and centralized. Prints a markdown table of global test accuracy (mean,
min and max over peers after the last round, and the best round's mean) and writes a comparison
plot. Each method is one ordinary ``dimat simulate`` run; its folder is kept under --out.

    PYTHONPATH=. python bench/experiment_mnist1d.py --jobs 1         # ~8 min on 2 idle cores
    PYTHONPATH=. python bench/experiment_mnist1d.py --seeds 0 1 2     # mean ± std over seeds
    PYTHONPATH=. python bench/experiment_mnist1d.py --rounds 3 --methods dimat average   # smoke
    PYTHONPATH=. python bench/experiment_mnist1d.py partition=iid --out outputs/exp_iid  # Hydra overrides
                                                   # go BEFORE the options (or after `--`)
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

METHODS = ["dimat", "weight_matching", "average", "gossip", "isolated", "centralized"]


def run_one(method: str, seed: int, rounds: int | None, out: str, extra: list[str]) -> dict:
    """One federation run (in a worker process); returns its summary."""
    import torch
    from hydra import compose, initialize_config_dir

    from dimat.cli import config_dir
    from dimat.federation import simulate

    torch.set_num_threads(1)
    overrides = ["experiment=mnist1d_results", f"merge={method}", f"seed={seed}", "progress=false",
                 "checkpoint.keep_last=1", *extra]
    if rounds is not None:
        overrides.append(f"rounds={rounds}")
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose("config", overrides=overrides)
    run_dir = Path(out) / f"{method}_seed{seed}"
    t0 = time.perf_counter()
    summary = simulate(cfg, run_dir)
    summary["wall_s"] = time.perf_counter() - t0
    summary["run_dir"] = str(run_dir)
    summary["seed"] = seed
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rounds", type=int, default=None, help="override the preset's 20 rounds")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (one torch thread each)")
    ap.add_argument("--out", default="outputs/experiment_mnist1d")
    ap.add_argument("--table-only", action="store_true", help="only re-make the table from the runs in --out")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides applied to every run")
    args = ap.parse_args()

    jobs = [(m, s) for m in args.methods for s in args.seeds]
    results: dict[tuple[str, int], dict] = {}
    if args.table_only:
        for m, s in jobs:
            run_dir = Path(args.out) / f"{m}_seed{s}"
            r = json.loads((run_dir / "summary.json").read_text())
            r.update(run_dir=str(run_dir), seed=s, wall_s=sum(x["time_s"] for x in r["rounds"]))
            results[(m, s)] = r
    else:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_one, m, s, args.rounds, args.out, args.overrides): (m, s) for m, s in jobs}
            for fut in futures:
                m, s = futures[fut]
                results[(m, s)] = fut.result()
                r = results[(m, s)]
                print(f"{m:>16} seed {s}: final mean acc {r['final_mean_acc']:.4f} ({r['wall_s']:.0f} s)", flush=True)

    def fmt(vals: list[float]) -> str:
        return f"{np.mean(vals):.3f}" if len(vals) == 1 else f"{np.mean(vals):.3f} ± {np.std(vals):.3f}"

    rounds = next(iter(results.values()))["rounds_planned"]
    lines = ["| method | final mean acc | final min | final max | mean of last 5 rounds | mean of first 5 rounds "
             "| best-round mean | MB sent / round | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for m in args.methods:
        rs = [results[(m, s)] for s in args.seeds]
        mb = np.mean([r["total_bytes_sent"] / max(r["rounds_done"], 1) / 1e6 for r in rs])
        lines.append(f"| {m} | {fmt([r['final_mean_acc'] for r in rs])} | {fmt([r['final_min_acc'] for r in rs])} | "
                     f"{fmt([r['final_max_acc'] for r in rs])} | "
                     f"{fmt([float(np.mean([x['mean_acc'] for x in r['rounds'][-5:]])) for r in rs])} | "
                     f"{fmt([float(np.mean([x['mean_acc'] for x in r['rounds'][:5]])) for r in rs])} | "
                     f"{fmt([r['best_mean_acc'] for r in rs])} | "
                     f"{mb:.2f} | {np.mean([r['wall_s'] for r in rs]):.0f} |")
    table = "\n".join(lines)
    setting = " ".join(args.overrides) or "class-disjoint"
    print(f"\nMNIST-1D, 5 peers, ring, {rounds} rounds x 2 epochs, {setting}, seeds {args.seeds}\n")
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(
        {f"{m}/seed{s}": {k: v for k, v in r.items() if k != "rounds"} | {"curve": [x["mean_acc"] for x in r["rounds"]]}
         for (m, s), r in results.items()}, indent=2))
    from dimat.metrics import plot_accuracy_runs

    s0 = args.seeds[0]
    plot_accuracy_runs({m: Path(results[(m, s0)]["run_dir"]) / "metrics.jsonl" for m in args.methods},
                       out / "accuracy_methods.png", title=f"MNIST-1D, 5 peers, class-disjoint, ring (seed {s0})")
    print(f"\ntable: {out / 'table.md'}; plot: {out / 'accuracy_methods.png'}")


if __name__ == "__main__":
    main()
