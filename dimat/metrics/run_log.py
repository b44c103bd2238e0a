"""A run's outputs: per-peer records, per-round results, the summary and the plot.

One :class:`RunLog` per process writes ``metrics.jsonl`` (a record per peer per round),
``rounds.jsonl`` (a :class:`RoundResult` per round, so a resumed run's summary still covers every
round), ``metrics.csv``, ``summary.json`` and ``accuracy.png``. Processes that share a run folder
(gRPC, torchrun) pass a ``tag`` and write under ``<run>/<tag>/``; :func:`combine_rounds` rebuilds
the federation-wide per-round results from every process's records (the torchrun merge).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from dimat.metrics.io import prune_jsonl, read_jsonl, repair_jsonl, write_json_atomic
from dimat.metrics.logger import MetricsLogger
from dimat.metrics.plots import plot_accuracy

ROUNDS_NAME = "rounds.jsonl"


@dataclass
class RoundResult:
    """Federation view of one round (what the progress line prints)."""

    round: int
    #: test accuracy over the peers evaluated this round (None: the round did not evaluate)
    mean_acc: float | None
    min_acc: float | None
    max_acc: float | None
    #: mean squared distance to the peers' average; None where this process does not see every peer
    consensus: float | None
    bytes_sent: int
    time_s: float
    #: peers evaluated in this round (the evaluation policy's sample of this process's peers)
    peers: int = 0
    #: what the round's evaluation covered: all (every peer, whole test set), sample or none
    eval: str = "all"
    #: test samples each evaluated peer was scored on (0: none evaluated)
    test_samples: int = 0

    def line(self, total: int) -> str:
        cons = "n/a" if self.consensus is None else f"{self.consensus:.4g}"
        if self.mean_acc is None:
            acc = "test acc not evaluated"
        else:
            scope = "" if self.eval == "all" else f" ({self.peers} peers, {self.test_samples} test samples)"
            acc = (f"test acc mean {self.mean_acc:.4f} min {self.min_acc:.4f} max {self.max_acc:.4f}{scope}")
        return (f"round {self.round:>3}/{total} | {acc} | consensus {cons} | sent {format_bytes(self.bytes_sent)} "
                f"| {self.time_s:.1f}s")


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def round_result(round_idx: int, records: Sequence[Mapping[str, Any]], *, consensus: float | None,
                 time_s: float) -> RoundResult:
    """The round's result from its per-peer records (accuracy spread over the evaluated peers, bytes
    summed over every peer). Records without an ``eval`` field (older runs) evaluated everything."""
    scored = [r for r in records if r.get("test_acc") is not None]
    accs = [float(r["test_acc"]) for r in scored]
    kinds = {r.get("eval", "all") for r in records}
    kind = "all" if kinds == {"all"} else ("none" if not scored else "sample")
    mean = sum(accs) / len(accs) if accs else None
    return RoundResult(round_idx, mean, min(accs, default=None), max(accs, default=None), consensus,
                       int(sum(int(r.get("bytes_sent") or 0) for r in records)), float(time_s), len(scored),
                       kind, max((int(r.get("test_samples") or 0) for r in scored), default=0))


def combine_rounds(records: Sequence[Mapping[str, Any]], parts: Sequence[Sequence[Mapping[str, Any]]]) -> list[RoundResult]:
    """Federation-wide results from every process's records and round results (``parts``).

    A round's time is the slowest process's; consensus is not known (no process saw every model).
    """
    slowest: dict[int, float] = {}
    for rounds in parts:
        for r in rounds:
            slowest[int(r["round"])] = max(slowest.get(int(r["round"]), 0.0), float(r.get("time_s") or 0.0))
    by_round: dict[int, list[Mapping[str, Any]]] = {}
    for rec in records:
        by_round.setdefault(int(rec["round"]), []).append(rec)
    return [round_result(k, by_round[k], consensus=None, time_s=slowest.get(k, 0.0)) for k in sorted(by_round)]


class RunLog:
    """The files of one process's share of a run (see the module docstring)."""

    def __init__(self, run_dir: str | Path, tag: str | None = None, tensorboard: bool = False) -> None:
        self.run_dir = Path(run_dir) / tag if tag else Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.rounds_path = self.run_dir / ROUNDS_NAME
        self.summary_path = self.run_dir / "summary.json"
        self.plot_path = self.run_dir / "accuracy.png"
        self.tensorboard = tensorboard
        self.rounds: list[dict[str, Any]] = []
        self._logger: MetricsLogger | None = None

    def start(self, resume_after: int | None) -> None:
        """Open the files: fresh, or (resume) keeping only rounds up to ``resume_after``."""
        if resume_after is None:
            self.metrics_path.unlink(missing_ok=True)
            self.rounds_path.unlink(missing_ok=True)
        else:
            for path in (self.metrics_path, self.rounds_path):
                if path.exists():
                    prune_jsonl(path, resume_after)  # a crash mid-round may have logged more
            if self.rounds_path.exists():
                repair_jsonl(self.rounds_path)
                self.rounds = read_jsonl(self.rounds_path)
        self._logger = MetricsLogger(self.run_dir, tensorboard=self.tensorboard)

    def log(self, records: Sequence[Mapping[str, Any]], result: RoundResult) -> None:
        assert self._logger is not None, "RunLog.start() first"
        for rec in records:
            self._logger.log(rec)
        entry = asdict(result)
        with open(self.rounds_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        self.rounds.append(entry)

    def finish(self, summary: Mapping[str, Any]) -> None:
        assert self._logger is not None, "RunLog.start() first"
        self._logger.write_csv()
        self._logger.close()
        write_json_atomic(self.summary_path, dict(summary))
        if self.metrics_path.exists() and self.metrics_path.stat().st_size > 0:
            plot_accuracy(self.metrics_path, self.plot_path, title=summary.get("title"))


def make_summary(*, title: str, method: str, num_peers: int, local_peers: Sequence[int], rounds_planned: int,
                 rounds: Sequence[Mapping[str, Any]], wall_s: float, model_bytes: int,
                 one_merge_bytes: int, info: Mapping[str, Any]) -> dict[str, Any]:
    """Final figures of a run (what summary.json holds).

    ``one_merge_bytes``: what one uncompressed merge per round over the same graph would have sent
    in the rounds done (the budget unit ``total_bytes_sent`` is compared with).
    """
    last = rounds[-1] if rounds else None
    return {
        "title": title,
        "method": method,
        "num_peers": num_peers,
        "local_peers": sorted(local_peers),
        "rounds_planned": rounds_planned,
        "rounds_done": last["round"] if last else 0,
        "final_mean_acc": last["mean_acc"] if last else None,
        "final_min_acc": last["min_acc"] if last else None,
        "final_max_acc": last["max_acc"] if last else None,
        # over the rounds that evaluated (a sampled round's figure is its sample's)
        "best_mean_acc": max((r["mean_acc"] for r in rounds if r.get("mean_acc") is not None), default=None),
        "total_bytes_sent": int(sum(r["bytes_sent"] for r in rounds)),
        "model_bytes": model_bytes,
        "one_merge_bytes": one_merge_bytes,
        "bytes_vs_one_merge": (round(sum(r["bytes_sent"] for r in rounds) / one_merge_bytes, 3)
                               if one_merge_bytes else None),
        "wall_time_s_this_session": wall_s,
        "data": dict(info),
        "rounds": list(rounds),
    }
