"""The label-skew table: the default recipe for DIMAT and for plain averaging, several seeds, side by side.

    .venv/bin/python bench/label_skew.py --seeds 0 1 2 --jobs 2 [hydra overrides...]

Runs ``dimat simulate merge=<method> seed=<s> <overrides>`` for merge=dimat, average (and, once per
seed, centralized for reference), each in its own process, and prints a markdown table: final mean
test accuracy and the mean of the last 5 rounds (mean ± std over seeds), the first 5 rounds' mean,
and MB sent per run. Overrides apply to every run (e.g. ``partition=iid`` or ``topology=ring``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(method: str, seed: int, overrides: list[str], out: Path) -> dict:
    run_dir = out / f"{method}_s{seed}"
    cmd = [sys.executable, "-m", "dimat", "simulate", f"merge={method}", f"seed={seed}", "baseline=null",
           "progress=false", "checkpoint.enabled=false", *overrides, f"run_dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["dimat", "average", "centralized"])
    ap.add_argument("--out", default=None, help="keep the run folders here (default: a temporary folder)")
    args, overrides = ap.parse_known_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dimat_label_skew_"))
    jobs = [(m, s) for m in args.methods for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(jobs, pool.map(lambda j: run(j[0], j[1], overrides, out), jobs)))
    print(f"overrides: {' '.join(overrides) or '(none: the default recipe)'}; seeds {args.seeds}; runs in {out}")
    print("| method | final | last 5 rounds | first 5 rounds | MB sent |")
    print("|---|---|---|---|---|")
    for m in args.methods:
        sums = [results[(m, s)] for s in args.seeds]
        final = [x["final_mean_acc"] for x in sums]
        last5 = [statistics.mean(r["mean_acc"] for r in x["rounds"][-5:]) for x in sums]
        first5 = [statistics.mean(r["mean_acc"] for r in x["rounds"][:5]) for x in sums]
        mb = statistics.mean(x["total_bytes_sent"] for x in sums) / 1e6
        print(f"| {m} | {spread(final)} | {spread(last5)} | {spread(first5)} | {mb:.0f} |")


if __name__ == "__main__":
    main()
