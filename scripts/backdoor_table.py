"""Run the backdoor grid (settings x attackers x defences x seeds) and write its table.

    python scripts/backdoor_table.py --out outputs/backdoor [--jobs 2] [--seeds 0 1 2]
        [--settings default dirichlet8 iid] [--attackers badnets scale stealth blended collude]
        [--defences mean norm_clip probe_trust ...] [override ...]

Each cell is one `dimat simulate` run composed from configs/ with Hydra: a *setting* (the data,
partition, graph and recipe), an *attacker* and a *defence* (`merge.aggregator`, optionally with
options: `norm_clip:noise=0.2`), once per seed. Every setting also runs without an attack (the
attacker's poison rate 0, no defence): the clean reference, whose "ASR" is the base rate at which
triggered inputs land in the target class anyway. For the honest peers the table reports the mean
clean accuracy and attack success rate at the last round and over the last 5 rounds (a label-skewed
final round is noisy), as mean ± standard deviation over the seeds, and the cost against no attack.
Finished runs (summary.json present) are reused, so an interrupted grid continues where it stopped.
Writes ``<out>/table.md`` and ``<out>/table.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the federation each row runs in (Hydra overrides on configs/config.yaml)
SETTINGS: dict[str, list[str]] = {
    # the default job: MNIST-1D, 5 peers, class c whole to peer c mod 5, full graph, the default recipe; peer 0 malicious
    "default": [],
    # 2 of 8 malicious on Dirichlet(0.1) label skew, exponential graph, the default recipe
    "dirichlet8": ["partition=dirichlet", "num_peers=8", "topology=exponential", "attack.malicious=[0,1]"],
    # the IID table of earlier stages (experiment backdoor_mnist1d: ring, DIMAT, one merge a round, 10 rounds)
    "iid": ["experiment=backdoor_mnist1d"],
}
#: how the malicious peers behave (on top of `attack=badnets` unless they replace it)
ATTACKERS: dict[str, list[str]] = {
    "badnets": [],
    "scale": ["attack.scale=5.0"],            # model replacement: the update sent 5x
    "stealth": ["attack.stealth=clip"],       # the update scaled down to the honest median norm
    "blended": ["attack=blended"],            # a blended full-input trigger instead of a patch
    "collude": ["attack.collude=true"],       # the malicious peers send one shared state
}
DEFENCES = ["mean", "norm_clip", "norm_clip:noise=0.2", "multi_krum", "probe_trust"]


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


def defence_overrides(spec: str) -> list[str]:
    """``name`` or ``name:key=value,key=value`` (aggregator options) as Hydra overrides."""
    name, _, opts = spec.partition(":")
    return [f"merge.aggregator={name}", *(f"+merge.aggregator_kwargs.{kv}" for kv in filter(None, opts.split(",")))]


def honest_figures(run_dir: Path) -> dict[str, float]:
    """The honest peers' mean clean accuracy and ASR at the last round and over the last 5 rounds (in %)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = max(r["round"] for r in recs)
    honest = [r for r in recs if not r.get("malicious", False)]

    def mean(rows: list[dict], key: str) -> float:
        vals = [r.get(key, r.get("test_acc")) if key == "clean_acc" else r.get(key) for r in rows]
        vals = [v for v in vals if v is not None]
        return 100 * sum(vals) / len(vals) if vals else float("nan")

    final = [r for r in honest if r["round"] == last]
    tail = [r for r in honest if r["round"] > last - 5]
    return {"clean": mean(final, "clean_acc"), "clean_last5": mean(tail, "clean_acc"),
            "asr": mean(final, "asr"), "asr_last5": mean(tail, "asr")}


def _spread(values: list[float]) -> str:
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.1f} ± {s:.1f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/backdoor")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=["default"], choices=sorted(SETTINGS))
    ap.add_argument("--attackers", nargs="+", default=["badnets"], choices=sorted(ATTACKERS))
    ap.add_argument("--defences", nargs="+", default=DEFENCES,
                    help="aggregator names, optionally with options: norm_clip:noise=0.2")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    jobs, rows = [], []
    for setting in args.settings:
        base = ["attack=badnets", "baseline=null", *SETTINGS[setting]]
        cells = [("no attack", "-", [*base, "attack.poison_rate=0.0"])]
        cells += [(attacker, defence, [*base, *ATTACKERS[attacker], *defence_overrides(defence)])
                  for attacker in args.attackers for defence in args.defences]
        for attacker, defence, overrides in cells:
            dirs = []
            for seed in args.seeds:
                name = "-".join([setting, attacker.replace(" ", "_"), defence, f"s{seed}"])
                name = name.replace(":", "-").replace(",", "-").replace("=", "")
                jobs.append((name, [*overrides, *args.overrides, f"seed={seed}"], str(out / name)))
                dirs.append(out / name)
            rows.append({"setting": setting, "attacker": attacker, "defence": defence, "dirs": dirs})
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for msg in pool.map(_run, jobs):
            print(msg, flush=True)
    lines = ["| setting | attacker | defence | honest clean, final (%) | last 5 | Δ vs no attack (last 5) "
             "| ASR, final (%) | last 5 |", "|---|---|---|---:|---:|---:|---:|---:|"]
    refs: dict[str, float] = {}
    with open(out / "table.jsonl", "w") as fh:
        for row in rows:
            figs = [honest_figures(d) for d in row["dirs"]]
            col = {k: [f[k] for f in figs] for k in figs[0]}
            if row["attacker"] == "no attack":
                refs[row["setting"]] = statistics.fmean(col["clean_last5"])
            cost = statistics.fmean(col["clean_last5"]) - refs[row["setting"]]
            fh.write(json.dumps({k: row[k] for k in ("setting", "attacker", "defence")}
                                | {"seeds": args.seeds, **col, "cost_last5": cost}) + "\n")
            lines.append(f"| {row['setting']} | {row['attacker']} | {row['defence']} | {_spread(col['clean'])} "
                         f"| {_spread(col['clean_last5'])} | {cost:+.1f} | {_spread(col['asr'])} | {_spread(col['asr_last5'])} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
