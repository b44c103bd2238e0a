"""Accuracy-against-round figures from ``metrics.jsonl`` files.

Uses matplotlib's object API with the Agg canvas directly: no pyplot global state, no display needed,
safe to call from any thread or a headless CI box.
"""
from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dimat.metrics.io import read_jsonl


def accuracy_by_round(metrics_jsonl: str | os.PathLike, key: str = "test_acc") -> dict[str, np.ndarray]:
    """Per round: mean, min and max of ``key`` over the peers that reported it.

    Returns ``{"round", "mean", "min", "max", "count"}`` arrays sorted by round. Raises ``ValueError``
    when no record carries a numeric ``key`` and ``round``.
    """
    by_round: dict[float, list[float]] = {}
    for rec in read_jsonl(metrics_jsonl):
        r, v = rec.get("round"), rec.get(key)
        if isinstance(r, numbers.Number) and isinstance(v, numbers.Number) and not isinstance(v, bool):
            by_round.setdefault(r, []).append(float(v))
    if not by_round:
        raise ValueError(f"{metrics_jsonl}: no record has both 'round' and a numeric {key!r}")
    rounds = sorted(by_round)
    vals = [np.asarray(by_round[r]) for r in rounds]
    return {
        "round": np.asarray(rounds, dtype=float),
        "mean": np.array([v.mean() for v in vals]),
        "min": np.array([v.min() for v in vals]),
        "max": np.array([v.max() for v in vals]),
        "count": np.array([v.size for v in vals]),
    }


def _pretty(key: str) -> str:
    if key.endswith("_acc"):
        key = key[: -len("_acc")] + " accuracy"
    return key.replace("_", " ")


def plot_accuracy_runs(
    runs: Mapping[str, str | os.PathLike],
    out_png: str | os.PathLike,
    key: str = "test_acc",
    title: str | None = None,
) -> Path:
    """One line per run (its peers' mean ``key``) with a shaded min–max band over peers; saved as PNG."""
    if not runs:
        raise ValueError("plot_accuracy_runs needs at least one run")
    fig = Figure(figsize=(7.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, path in runs.items():
        s = accuracy_by_round(path, key)
        (line,) = ax.plot(s["round"], s["mean"], marker="o", markersize=3, linewidth=1.8,
                          label=str(label))
        if (s["count"] > 1).any():
            ax.fill_between(s["round"], s["min"], s["max"], color=line.get_color(), alpha=0.2, linewidth=0,
                            label="min–max over peers" if len(runs) == 1 else None)
    ax.set_xlabel("round")
    pretty = _pretty(key)
    ax.set_ylabel(pretty)
    ax.set_title(title or f"{pretty} per round (line: mean over peers, band: min–max)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def plot_accuracy(
    metrics_jsonl: str | os.PathLike,
    out_png: str | os.PathLike,
    key: str = "test_acc",
    label: str = "mean over peers",
    title: str | None = None,
) -> Path:
    """Accuracy (``key``) against round for one run: mean over peers with a min–max band."""
    return plot_accuracy_runs({label: metrics_jsonl}, out_png, key=key, title=title)
