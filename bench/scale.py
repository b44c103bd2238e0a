"""How a simulated federation scales with the number of peers, against Flower's simulation on the same job.

The job: 1-D CNN peers on MNIST-1D, IID split, 1 local epoch per round, batch 64, lr 0.05, the
paper's protocol (one merge per round after local training, optimizer restarted, BatchNorm reset on
own data). ``dimat`` is DIMAT on a ring; ``fedavg`` is dimat's FedAvg-equivalent, the very job
Flower runs (``merge=average topology=fully_connected init=shared merge.bn_stats=average``: one
average of every state, BatchNorm buffers included); ``default`` is what ``dimat simulate
num_peers=N partition=iid`` runs (the default recipe, ``merge=scaffold``) and ``every_step`` the
previous default (``experiment=every_step``). Each runs per peer on one worker thread per core
(``per-peer``, the default ``workers: auto``), per peer on one (``one-worker``) or stacked
(``vectorise=true``, ``--executors``). MNIST-1D grows with the
federation (``data.samples_per_peer``: 40 per peer once 4,000 would give fewer). Each N runs in a
fresh subprocess so its peak RSS is its own. A baseline process that runs a 3-peer round (every
import, the data, the lazy initialisations) is measured the same way, so

    per-peer memory = (peak RSS(N) - peak RSS(baseline)) / (N - 3)

is what each further peer costs, compared with what it must hold: model + optimizer state (SGD
momentum = one copy of the parameters) + its share of the training data.

Every round is also set against its compute floor: the round's training FLOPs (torch's FLOP
counter on one forward and backward of a peer's batch, times every peer's steps) at the float32
matmul rate measured on every core at the start of the same run; the goals of issue 26 are
printed as measured (a round <= 0.5x Flower's FedAvg round, the FedAvg job <= 4x its floor).

Round time is the median of the rounds after the first (warm-up) and before the last (which
evaluates every peer on the whole test set; shown apart as "final"). Its growth is shown against
N / N_min, the linear growth aimed at.

With ``--flower-python PATH`` (an interpreter with ``flwr[simulation]``, in its own environment:
Flower pins its own protobuf) the same job runs under Flower's simulation (``bench/flower_job.py``:
FedAvg over every client each round, Ray backend, server-side evaluation) on the very same per-peer
data, in this run, with its peak memory summed over its whole process tree (Ray starts several
processes). Its figures are saved to ``bench/results/flower_scale.json``; without
``--flower-python`` the table shows that file's figures, named as Flower's last run.

    PYTHONPATH=. python bench/scale.py                                  # N = 8 64 1000, both jobs, both executors
    PYTHONPATH=. python bench/scale.py --peers 8 64 --flower-python /work/flower-venv/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOWER_RESULTS = REPO / "bench" / "results" / "flower_scale.json"
MIB = 1024 * 1024
BASE_PEERS = 3

#: the paper's protocol (one merge per round) and the job's training settings
PROTOCOL = ["partition=iid", "local_epochs=1", "merge.every_steps=null", "merge.keep_momentum=false",
            "merge.bn_stats=own", "baseline=null", "train.batch_size=64", "train.lr=0.05", "merge.align_batches=2",
            "progress=false", "checkpoint.enabled=false", "threads=1"]
#: what `dimat simulate num_peers=N partition=iid` runs, every other key at its default (the round's
#: figures do not include the centralized baseline or the checkpoints, which run outside it)
DEFAULT = ["partition=iid", "baseline=null", "progress=false", "checkpoint.enabled=false"]
JOBS = {
    "dimat": [*PROTOCOL, "merge=dimat", "topology=ring"],
    # FedAvg as Flower runs it: one average of every state, BatchNorm buffers averaged too (no reset)
    "fedavg": [*PROTOCOL, "merge=average", "topology=fully_connected", "init=shared", "merge.bn_stats=average"],
    # the default recipe (merge=scaffold: activation alignment, 2 merges a round, cosine lr, 2 local epochs)
    "default": DEFAULT,
    # the previous default: a merge after every local step
    "every_step": [*DEFAULT, "experiment=every_step"],
}


#: how the peers of one process execute: spread over one worker thread per core (the default),
#: one after another on one, or as one stacked computation
EXECUTORS = {"per-peer": ["vectorise=false"], "one-worker": ["vectorise=false", "workers=1"],
             "stacked": ["vectorise=true"]}


def overrides(job: str, n: int, rounds: int, executor: str = "per-peer") -> list[str]:
    return [f"num_peers={n}", f"rounds={rounds}", *JOBS[job], *EXECUTORS[executor]]


def matmul_rate(seconds: float = 2.0, size: int = 1024) -> float:
    """FLOP/s of float32 square matmuls on every core of this process (the machine's compute rate)."""
    import torch

    from dimat.config import cores

    torch.set_num_threads(cores())
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b  # warm-up: thread pool, caches
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2.0 * size ** 3 * n / (time.perf_counter() - t0)


def train_flops(fed) -> float:  # noqa: ANN001 (a Federation)
    """FLOPs of one round's local training over the whole federation: every peer's SGD steps, each a
    forward and backward pass of its batch (counted by torch's FLOP counter on peer 0's model)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    peer = next(iter(fed.peers.values()))
    bs = fed.config.train.batch_size
    model = __import__("copy").deepcopy(peer.model)
    x, y = peer.x[:bs], peer.y[:bs]
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    per_sample = counter.get_total_flops() / len(y)
    steps = {pid: fed.local_steps(p) for pid, p in fed.peers.items()}
    samples = sum(min(bs, len(p.y)) * steps[pid] for pid, p in fed.peers.items())
    return per_sample * samples


def steady(times: list[float]) -> float:
    """Median round time without the warm-up round and the final (full-evaluation) round."""
    inner = times[1:-1] or times[1:] or times
    return statistics.median(inner)


def child(job: str, executor: str, n: int, rounds: int, out: str, dump: str | None) -> None:
    """Run one federation of ``n`` peers and write its figures (and, with ``dump``, its data) to files."""
    import torch
    from dimat.entry import load
    from dimat.federation import build_federation, run_rounds
    from dimat.transport.inproc import InProcTransport

    torch.set_num_threads(1)
    fed = build_federation(load(overrides(job, n, rounds, executor)))
    if executor == "stacked" and fed.stacked is None:
        raise SystemExit(f"{job}: these peers cannot be stacked")
    peer = fed.peers[0]
    params = sum(p.numel() * p.element_size() for p in peer.model.parameters())
    rec: dict = {"job": job, "executor": executor, "n": n, "model_bytes": fed.info["model_bytes"], "optimizer_bytes": params,
                 "train_size": fed.info["train_size"],
                 "data_bytes_per_peer": sum(
                     (p.x.numel() * p.x.element_size() + p.y.numel() * p.y.element_size()
                      + (0 if p.val is None else p.val[0].numel() * 4 + p.val[1].numel() * 8))
                     for p in fed.peers.values()) / n}
    if dump:
        import numpy as np

        run = fed.config
        hp = {"lr": run.train.lr, "momentum": run.train.momentum, "weight_decay": run.train.weight_decay,
              "batch_size": run.train.batch_size, "seed": run.seed, "num_classes": fed.info["num_classes"],
              "input_shape": fed.info["input_shape"]}
        arrays = {f"{k}_{pid}": t.numpy() for pid, p in fed.peers.items() for k, t in (("x", p.x), ("y", p.y))}
        np.savez(dump, num_peers=n, hparams=json.dumps(hp), x_test=fed.test_data[0].numpy(),
                 y_test=fed.test_data[1].numpy(), **arrays)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = run_rounds(fed, InProcTransport(share_states=True), tmp, progress=False)  # as dimat simulate
        rec["total_s"] = time.perf_counter() - t0
    rec["round_times"] = [r["time_s"] for r in summary["rounds"]]
    rec["workers"] = fed.config.workers
    rec["train_flops"] = train_flops(fed)
    rec["acc"] = summary["final_mean_acc"]
    rec["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out).write_text(json.dumps(rec))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_dimat(job: str, executor: str, n: int, rounds: int, dump: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rec.json"
        cmd = [sys.executable, __file__, "--child", job, executor, str(n), "--rounds", str(rounds), "--out", str(out)]
        subprocess.run(cmd + (["--dump", dump] if dump else []), check=True, env=_env())
        return json.loads(out.read_text())


class TreeMemory:
    """Peak of the summed RSS of every process carrying a tag in its environment (Ray's included)."""

    def __init__(self, tag: str) -> None:
        self.tag = f"DIMAT_BENCH_TAG={tag}".encode()
        self.peak = 0
        self.procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def pids(self) -> list[int]:
        found = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    if self.tag in Path(f"/proc/{d}/environ").read_bytes():
                        found.append(int(d))
                except OSError:
                    pass
        return found

    def _poll(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            total, count = 0, 0
            for pid in self.pids():
                try:
                    total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
                    count += 1
                except (OSError, ValueError, IndexError):
                    pass
            self.peak, self.procs = max(self.peak, total), max(self.procs, count)
            self._stop.wait(0.25)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_flower(python: str, n: int, rounds: int, data: str) -> dict:
    """The job under Flower's simulation; the round time is the median of rounds 2.. (round 1 starts Ray)."""
    tag = uuid.uuid4().hex
    env = _env()
    env["DIMAT_BENCH_TAG"] = tag
    env.pop("VIRTUAL_ENV", None)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "flower.json"
        with TreeMemory(tag) as mem:
            res = subprocess.run([python, str(REPO / "bench" / "flower_job.py"), "--data", data, "--rounds", str(rounds),
                                  "--out", str(out)], env=env, capture_output=True, text=True)
        for pid in mem.pids():  # Ray processes that outlived the simulation (started by this bench)
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        if res.returncode != 0 or not out.exists():
            tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"Flower run with {n} clients failed (exit {res.returncode}):\n{tail}")
        rec = json.loads(out.read_text())
    ends = rec["round_ends"]
    times = [b - a for a, b in zip(ends, ends[1:])]
    return {"n": n, "round_times": times, "round_s": statistics.median(times[1:] or times),
            "peak_bytes": mem.peak, "processes": mem.procs, "flwr": rec["flwr"], "total_s": rec["total_s"]}


def goals(rows: dict[tuple[str, str], list[dict]], flower: dict[int, dict], label: str) -> None:
    """The issue's goals, each as measured: a round against Flower's FedAvg round and the compute floor."""
    print(f"\ngoals (Flower: {label}):")
    for (job, ex), recs in rows.items():
        for r in recs:
            f = flower.get(r["n"])
            vs = f"{r['round_s'] / f['round_s']:.2f}x Flower's FedAvg round ({f['round_s']:.2f} s)" if f else "no Flower figure"
            aim = " (goal <= 0.5x)" if job in ("fedavg", "default") and f else ""
            floor = " (goal <= 4x)" if job == "fedavg" else ""
            print(f"  {job:<10} {ex:<10} N={r['n']:>4}: {r['round_s']:.2f} s/round = {vs}{aim}; "
                  f"{r['round_s'] / r['floor_s']:.1f}x its compute floor {r['floor_s']:.3f} s{floor}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, nargs="+", default=[8, 64, 1000])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", nargs="+", default=["fedavg", "default", "dimat"], choices=sorted(JOBS))
    ap.add_argument("--executors", nargs="+", default=["stacked", "per-peer"], choices=sorted(EXECUTORS))
    ap.add_argument("--flower-python", default=None, help="an interpreter with flwr[simulation] installed")
    ap.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dump", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child[0], args.child[1], int(args.child[2]), args.rounds, args.out, args.dump)
        return
    if args.rounds < 3:
        ap.error("--rounds must be at least 3 (a warm-up round, a measured round, the final full evaluation)")

    rate = matmul_rate()
    print(f"compute rate: {rate / 1e9:.1f} GFLOP/s (float32 1024x1024 matmul on {os.cpu_count()} cores, this run); "
          "a round's floor = its training FLOPs at this rate", flush=True)
    base = run_dimat(args.jobs[0], args.executors[0], BASE_PEERS, 1)
    print(f"baseline process (a {BASE_PEERS}-peer round: imports, data, lazy set-up): "
          f"peak RSS {base['peak_rss_bytes'] / MIB:.1f} MiB", flush=True)
    runs = [(job, ex) for job in args.jobs for ex in args.executors]
    rows: dict[tuple[str, str], list[dict]] = {run: [] for run in runs}
    flower: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.peers:
            for job, ex in runs:
                # Flower runs the FedAvg job on the very data dimat's FedAvg peers hold
                dump = (str(Path(tmp) / f"job_{n}.npz") if args.flower_python and job == "fedavg"
                        and ex == args.executors[0] else None)
                rec = run_dimat(job, ex, n, args.rounds, dump)
                rec["round_s"] = steady(rec["round_times"])
                rec["floor_s"] = rec["train_flops"] / rate
                rows[(job, ex)].append(rec)
                print(f"  {job} ({ex}, {rec['workers']} worker(s)) N={n:>4}: {rec['round_s']:.2f} s/round "
                      f"(first {rec['round_times'][0]:.2f} s, final {rec['round_times'][-1]:.2f} s), "
                      f"floor {rec['floor_s']:.3f} s ({rec['round_s'] / rec['floor_s']:.1f}x), "
                      f"peak RSS {rec['peak_rss_bytes'] / MIB:.1f} MiB, final acc {rec['acc']:.3f}", flush=True)
            if args.flower_python:
                try:
                    flower[n] = run_flower(args.flower_python, n, args.rounds, str(Path(tmp) / f"job_{n}.npz"))
                    f = flower[n]
                    print(f"  Flower {f['flwr']} N={n:>4}: {f['round_s']:.2f} s/round, peak {f['peak_bytes'] / MIB:.0f} MiB "
                          f"over {f['processes']} processes", flush=True)
                except RuntimeError as exc:
                    print(f"  {exc}", flush=True)
    label = "Flower (this run)"
    if args.flower_python and flower:
        FLOWER_RESULTS.parent.mkdir(parents=True, exist_ok=True)
        now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        kept = json.loads(FLOWER_RESULTS.read_text())["runs"] if FLOWER_RESULTS.exists() else []
        runs = {int(r["n"]): r for r in kept} | {n: {**r, "date": now} for n, r in flower.items()}
        FLOWER_RESULTS.write_text(json.dumps({"date": now, "rounds": args.rounds,
                                              "runs": [runs[n] for n in sorted(runs)]}, indent=1) + "\n")
    elif FLOWER_RESULTS.exists():
        saved = json.loads(FLOWER_RESULTS.read_text())
        flower = {int(r["n"]): r for r in saved["runs"]}
        label = f"Flower (last runs, up to {saved['date']}, not this run)"

    goals(rows, flower, label)
    for (job, ex), recs in rows.items():
        print(f"\n{job}, {ex}: {' '.join(JOBS[job] + EXECUTORS[ex])}; vs {label}")
        print("| peers | train samples | s/round | first round s | final round s | floor s | x floor | time ratio "
              "| N ratio | peak RSS MiB | per-peer KiB | model+opt+data KiB | ratio | Flower s/round | Flower peak MiB "
              "| dimat/Flower time |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        first = recs[0]
        for r in recs:
            per_peer = (r["peak_rss_bytes"] - base["peak_rss_bytes"]) / max(r["n"] - BASE_PEERS, 1)
            need = r["model_bytes"] + r["optimizer_bytes"] + r["data_bytes_per_peer"]
            f = flower.get(r["n"])
            fl = (f"{f['round_s']:.2f} | {f['peak_bytes'] / MIB:.0f} | {r['round_s'] / f['round_s']:.2f}" if f
                  else "- | - | -")
            print(f"| {r['n']} | {r['train_size']} | {r['round_s']:.2f} | {r['round_times'][0]:.2f} | "
                  f"{r['round_times'][-1]:.2f} | {r['floor_s']:.3f} | {r['round_s'] / r['floor_s']:.1f} | "
                  f"{r['round_s'] / first['round_s']:.2f} | {r['n'] / first['n']:.0f} | "
                  f"{r['peak_rss_bytes'] / MIB:.1f} | {per_peer / 1024:.0f} | {need / 1024:.0f} | {per_peer / need:.2f} | {fl} |")
        last = recs[-1]
        if len(recs) > 1:
            growth = (last["round_s"] / first["round_s"]) / (last["n"] / first["n"])
            print(f"time per round grew {last['round_s'] / first['round_s']:.2f}x for {last['n'] / first['n']:.0f}x peers "
                  f"({growth:.2f} of linear); model {first['model_bytes'] / 1024:.0f} KiB, "
                  f"optimizer {first['optimizer_bytes'] / 1024:.0f} KiB per peer")


if __name__ == "__main__":
    main()
