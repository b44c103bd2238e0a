"""Run the backdoor experiment grid and print the results table (markdown).

    python scripts/backdoor_table.py --out outputs/backdoor [--jobs 2] [--datasets mnist1d digits]
        [--topologies ring fully_connected] [--aggregators mean median ...] [override ...]

Each cell is one `dimat simulate` run (composed from configs/ with Hydra, experiment
`backdoor_<dataset>`), once without attack (plain DIMAT with poison rate 0: the clean reference and
the base rate of triggered inputs landing in the target class) and once per
aggregator with the configured attack. The table reports, for the honest peers at the last round,
the mean clean accuracy and the mean and maximum ASR. Finished runs (summary.json present) are
reused, so an interrupted grid continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AGGREGATORS = ["mean", "median", "trimmed_mean", "norm_clip", "multi_krum", "sign_consensus", "safety_mask"]


def _run(job: tuple[str, list[str], str]) -> str:
    name, overrides, run_dir = job
    if (Path(run_dir) / "summary.json").exists():
        return f"{name}: cached"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(ROOT))
    from hydra import compose, initialize_config_dir

    from dimat.federation import simulate

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("config", overrides=overrides + [f"run_dir={run_dir}"])
    simulate(cfg, run_dir, progress=False)
    return f"{name}: done"


def _aggregator_overrides(spec: str) -> list[str]:
    """``name`` or ``name:key=value,key=value`` (aggregator options) as Hydra overrides."""
    name, _, opts = spec.partition(":")
    out = [f"merge.aggregator={name}"]
    for kv in filter(None, opts.split(",")):
        out.append(f"+merge.aggregator_kwargs.{kv}")
    return out


def _final(run_dir: Path) -> dict[str, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = max(r["round"] for r in recs)
    honest = [r for r in recs if r["round"] == last and not r.get("malicious", False)]
    clean = [r.get("clean_acc", r["test_acc"]) for r in honest]
    asr = [r["asr"] for r in honest if r.get("asr") is not None]
    return {
        "clean": 100 * sum(clean) / len(clean),
        "asr": 100 * sum(asr) / len(asr) if asr else float("nan"),
        "asr_max": 100 * max(asr) if asr else float("nan"),
    }




def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/backdoor")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--datasets", nargs="+", default=["mnist1d", "digits"])
    ap.add_argument("--topologies", nargs="+", default=["ring", "fully_connected"])
    ap.add_argument("--aggregators", nargs="+", default=AGGREGATORS,
                    help="aggregator names, optionally with options: safety_mask:refine=true,z_max=3")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    jobs, cells = [], []
    for ds in args.datasets:
        for topo in args.topologies:
            base = [f"experiment=backdoor_{ds}", f"topology={topo}", *args.overrides]
            cell = {"dataset": ds, "topology": topo, "rows": []}
            name = f"{ds}-{topo}-clean"
            # peer 0 trains on clean data (poison rate 0): honest peers' "ASR" here is the base rate at
            # which triggered inputs land in the target class without any backdoor
            clean = [o for o in base if not o.startswith("attack.poison_rate=")] + ["attack.poison_rate=0.0"]
            jobs.append((name, clean, str(out / name)))
            cell["clean_dir"] = out / name
            for agg in args.aggregators:
                name = f"{ds}-{topo}-{agg.replace(':', '-').replace(',', '-').replace('=', '')}"
                jobs.append((name, base + _aggregator_overrides(agg), str(out / name)))
                cell["rows"].append((agg, out / name))
            cells.append(cell)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for msg in pool.map(_run, jobs):
            print(msg, flush=True)
    print("\n| data | topology | merge | honest clean acc (%) | Δ vs no attack | honest ASR mean (%) | honest ASR max (%) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for cell in cells:
        ref = _final(cell["clean_dir"])
        print(f"| {cell['dataset']} | {cell['topology']} | DIMAT, no attack | {ref['clean']:.1f} | – "
              f"| {ref['asr']:.1f} | {ref['asr_max']:.1f} |")
        for agg, d in cell["rows"]:
            f = _final(d)
            label = "DIMAT (mean)" if agg == "mean" else agg
            print(f"| {cell['dataset']} | {cell['topology']} | {label} | {f['clean']:.1f} | {f['clean'] - ref['clean']:+.1f} "
                  f"| {f['asr']:.1f} | {f['asr_max']:.1f} |")


if __name__ == "__main__":
    main()
