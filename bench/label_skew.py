"""Label skew at every budget: accuracy against bytes sent, each recipe, DIMAT and averaging side by side.

    .venv/bin/python bench/label_skew.py --seeds 0 1 2 --jobs 2            # the full grid (README table)
    .venv/bin/python bench/label_skew.py --partitions class_disjoint --topologies fully_connected \\
        --recipes default --seeds 0 1 2 [hydra overrides...]                # one cell

Every run is ``dimat simulate merge=<method> seed=<s> <cell> <recipe> <overrides>`` in its own process.
The grid is partitions (class-disjoint, Dirichlet(0.1), IID) x topologies (ring, fully connected) x
recipes x methods (dimat, average), plus centralized training of the same model on the same budget
once per partition and seed. Recipes (``--recipes``; each names every part it changes):

- ``default``: what ``dimat simulate`` runs (configs/config.yaml);
- ``every_step``: merge after every local SGD step, momentum kept, BN statistics mixed (46x the
  bytes of one merge per round; configs/experiment/every_step.yaml);
- ``every_10``: a merge every 10 local steps, the same otherwise;
- ``per_round``: one merge per round, momentum kept, BN statistics mixed;
- ``paper``: the DIMAT paper's protocol (one merge per round, optimizer restarted, BN recomputed on own data);
- ``scaffold``: drift-corrected local steps (merge=scaffold, variates computed locally), 2 merges per round;
- ``scaffold_sent``: SCAFFOLD variates sent with the weights, 1 merge per round (2x the bytes);
- ``scaffold_int8``: ``scaffold`` with int8 deltas on the wire (exchange.compress=int8, exchange.delta=true).

For the scaffold recipes the method column chooses the alignment (dimat: activation matching,
average: none). The table gives MB sent per run and its ratio to one merge per round (the
``per_round`` recipe's bytes, computed from the model size and the graph when that recipe was not run);
``frontier.png`` plots final accuracy against MB, one panel per partition and topology.

Extra hydra overrides apply to every run (e.g. ``merge.proxy_samples=500`` for the shared-data
setting of the reference code; the table header then says so). Run folders are kept under ``--out``
and a finished run is not redone, so an interrupted grid continues where it stopped. Written there:
``results.jsonl`` (one line per run), ``table.md`` (the markdown below) and ``accuracy.png`` (mean
test accuracy per round, mean over seeds, one panel per partition).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PARTITIONS = {
    "class_disjoint": ["partition=class_disjoint"],
    "dirichlet0.1": ["partition=dirichlet", "partition.alpha=0.1"],
    "iid": ["partition=iid"],
}
TOPOLOGIES = {"ring": ["topology=ring"], "fully_connected": ["topology=fully_connected"]}
RECIPES = {
    "default": [],
    "every_step": ["merge={method}", "merge.every_steps=1", "merge.merges_per_round=null", "merge.keep_momentum=true",
                   "merge.bn_stats=mixture"],
    "every_10": ["merge={method}", "merge.every_steps=10", "merge.merges_per_round=null", "merge.keep_momentum=true",
                 "merge.bn_stats=mixture"],
    "per_round": ["merge={method}", "merge.every_steps=null", "merge.merges_per_round=null", "merge.keep_momentum=true",
                  "merge.bn_stats=mixture"],
    "paper": ["merge={method}", "merge.every_steps=null", "merge.merges_per_round=null", "merge.keep_momentum=false",
              "merge.bn_stats=own"],
    "scaffold": ["merge=scaffold", "merge.alignment={alignment}", "merge.variates=local", "merge.merges_per_round=2"],
    "scaffold_sent": ["merge=scaffold", "merge.alignment={alignment}", "merge.variates=sent",
                      "merge.merges_per_round=1"],
    "scaffold_int8": ["merge=scaffold", "merge.alignment={alignment}", "merge.variates=local",
                      "merge.merges_per_round=2", "exchange.compress=int8", "exchange.delta=true"],
}
ALIGNMENT_OF = {"dimat": "activation", "weight_matching": "weight", "average": "none"}


@dataclass(frozen=True)
class Run:
    partition: str
    topology: str | None  # None: centralized (no topology)
    recipe: str | None
    method: str
    seed: int

    @property
    def name(self) -> str:
        return "_".join(str(p) for p in (self.partition, self.topology, self.recipe, self.method, f"s{self.seed}")
                        if p is not None)

    def overrides(self) -> list[str]:
        recipe = RECIPES[self.recipe] if self.recipe is not None else []
        out = [f"seed={self.seed}", *PARTITIONS[self.partition]]
        if not any(a.startswith("merge=") for a in recipe):
            out.insert(0, f"merge={self.method}")
        if self.topology is not None:
            out += TOPOLOGIES[self.topology]
        fill = {"method": self.method, "alignment": ALIGNMENT_OF.get(self.method, "activation")}
        return out + [a.format(**fill) for a in recipe]


def execute(run: Run, extra: list[str], out: Path, table_only: bool = False) -> dict | None:
    run_dir = out / run.name
    summary = run_dir / "summary.json"
    if not summary.exists() and table_only:
        return None
    if not summary.exists():
        cmd = [sys.executable, "-m", "dimat", "simulate", *run.overrides(), "baseline=null", "progress=false",
               "checkpoint.enabled=false", *extra, f"run_dir={run_dir}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        print(f"done {run.name}", file=sys.stderr, flush=True)
    s = json.loads(summary.read_text())
    accs = [r["mean_acc"] for r in s["rounds"]]
    return {**asdict(run), "final": s["final_mean_acc"], "last5": statistics.mean(accs[-5:]),
            "first5": statistics.mean(accs[:5]), "mb": s["total_bytes_sent"] / 1e6, "curve": accs,
            "one_merge_mb": one_merge_per_round_mb(s),
            "shared_data": (s.get("data") or {}).get("shared_data")}


def one_merge_per_round_mb(summary: dict) -> float | None:
    """MB one merge per round would send in this run: every round's first exchange, uncompressed.

    summary.json's ``one_merge_bytes`` (the model size times every round's directed edges).
    """
    return summary["one_merge_bytes"] / 1e6 if summary.get("one_merge_bytes") else None


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def table(rows: list[dict], args: argparse.Namespace, extra: list[str]) -> str:
    a, b = (args.methods * 2)[:2] if len(args.methods) < 2 else args.methods[:2]
    shared = {r["shared_data"] for r in rows} - {None}
    lines = [f"seeds {args.seeds}; overrides: {' '.join(extra) or '(none)'}"
             + (f"; SHARED DATA: {', '.join(sorted(shared))}" if shared else "; no shared data"),
             "",
             f"| partition | topology | recipe | {a} final | {b} final | {a} last 5 | {b} last 5 "
             f"| {a} first 5 | {b} first 5 | MB sent per run | x one merge per round |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def pick(**key) -> list[dict]:
        return [r for r in rows if all(r[k] == v for k, v in key.items())]

    for part in args.partitions:
        for topo in args.topologies:
            for recipe in args.recipes:
                cell = {m: pick(partition=part, topology=topo, recipe=recipe, method=m) for m in (a, b)}
                if not all(cell.values()):
                    continue
                figs = [spread([r[f] for r in cell[m]]) for f in ("final", "last5", "first5") for m in (a, b)]
                mb = statistics.mean(r["mb"] for r in cell[a])
                base = [r["one_merge_mb"] for r in cell[a] if r.get("one_merge_mb")]
                ratio = f"{mb / statistics.mean(base):.1f}" if base else "-"
                seeds = sorted({r["seed"] for r in cell[a]} & {r["seed"] for r in cell[b]})
                note = "" if seeds == sorted(args.seeds) else f" (seeds {', '.join(map(str, seeds))} only)"
                lines.append(f"| {part} | {topo} | {recipe}{note} | {' | '.join(figs)} | {mb:,.0f} | {ratio} |")
        central = pick(partition=part, method="centralized")
        if central:
            lines.append(f"| {part} | (one model) | centralized | {spread([r['final'] for r in central])} | | "
                         f"{spread([r['last5'] for r in central])} | | {spread([r['first5'] for r in central])} | | 0 | 0 |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, partitions: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(partitions), figsize=(5 * len(partitions), 4), squeeze=False)
    for ax, part in zip(axes[0], partitions):
        groups: dict[tuple, list[list[float]]] = {}
        for r in rows:
            if r["partition"] == part:
                groups.setdefault((r["topology"], r["recipe"], r["method"]), []).append(r["curve"])
        colours: dict[tuple, str] = {}
        for (topo, recipe, method), curves in sorted(groups.items(), key=str):
            mean = [statistics.mean(c[i] for c in curves) for i in range(min(map(len, curves)))]
            label = method if topo is None else f"{method}, {topo}, {recipe}"
            # one colour per cell, a line style per method: dimat and average side by side
            colour = colours.setdefault((topo, recipe), f"C{len(colours)}")
            ax.plot(range(1, len(mean) + 1), mean, label=label, color=colour,
                    linestyle="--" if method == "average" else "-")
        ax.set_title(part)
        ax.set_xlabel("round")
        ax.set_ylabel("mean test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_frontier(rows: list[dict], path: Path, partitions: list[str], topologies: list[str]) -> None:
    """Final accuracy (mean over seeds, bars: min to max) against MB sent, a panel per partition x topology."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(topologies), len(partitions), figsize=(5 * len(partitions), 4 * len(topologies)),
                             squeeze=False)
    recipes = sorted({r["recipe"] for r in rows if r["recipe"] is not None})  # one colour per recipe, every panel
    for i, topo in enumerate(topologies):
        for j, part in enumerate(partitions):
            ax = axes[i][j]
            cells: dict[tuple, list[dict]] = {}
            for r in rows:
                if r["partition"] == part and r["topology"] == topo:
                    cells.setdefault((r["recipe"], r["method"]), []).append(r)
            for (recipe, method), rs in sorted(cells.items(), key=str):
                x = statistics.mean(r["mb"] for r in rs)
                ys = [r["final"] for r in rs]
                y = statistics.mean(ys)
                ax.errorbar([x], [y], yerr=[[y - min(ys)], [max(ys) - y]], fmt="o" if method == "dimat" else "s",
                            color=f"C{recipes.index(recipe)}", capsize=3,
                            label=f"{recipe} ({method})")
            central = [r["final"] for r in rows if r["partition"] == part and r["method"] == "centralized"]
            if central:
                ax.axhline(statistics.mean(central), color="grey", linestyle=":", label="centralized")
            ax.set_xscale("log")
            ax.set_title(f"{part}, {topo}")
            ax.set_xlabel("MB sent per run (log)")
            ax.set_ylabel("final mean test accuracy")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=list(PARTITIONS))
    ap.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES), choices=list(TOPOLOGIES))
    ap.add_argument("--recipes", nargs="+", default=["every_step", "per_round", "paper", "scaffold", "scaffold_sent"],
                    choices=list(RECIPES))
    ap.add_argument("--methods", nargs="+", default=["dimat", "average"],
                    help="merging methods compared (the table's columns are the first two)")
    ap.add_argument("--no-centralized", action="store_true", help="skip the centralized reference runs")
    ap.add_argument("--table-only", action="store_true", help="tabulate the finished runs in --out; run nothing")
    ap.add_argument("--out", default="outputs/label_skew", help="run folders, results.jsonl, table.md, accuracy.png")
    args, extra = ap.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [Run(p, t, r, m, s) for p in args.partitions for t in args.topologies for r in args.recipes
            for m in args.methods for s in args.seeds]
    if not args.no_centralized:
        runs += [Run(p, None, None, "centralized", s) for p in args.partitions for s in args.seeds]
    print(f"{len(runs)} runs in {out} ({args.jobs} at a time)", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = [r for r in pool.map(lambda r: execute(r, extra, out, args.table_only), runs) if r is not None]
    with open(out / "results.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    text = table(rows, args, extra)
    (out / "table.md").write_text(text + "\n")
    plot(rows, out / "accuracy.png", args.partitions)
    plot_frontier(rows, out / "frontier.png", args.partitions, args.topologies)
    print(text)
    print(f"\nwritten: {out / 'results.jsonl'}, {out / 'table.md'}, {out / 'accuracy.png'}, {out / 'frontier.png'}")


if __name__ == "__main__":
    main()
