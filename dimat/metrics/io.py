"""Run-folder files: the per-round JSONL log, its CSV copy, atomic JSON writes.

``metrics.jsonl`` holds one JSON object per line, one record per peer per round (``round``, ``peer``
and numbers). Each line is flushed as it is written, so a killed run loses at most its last,
partial line, which `read_jsonl` skips and `MetricsLogger` trims before appending.
"""
from __future__ import annotations

import csv
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..atomic import atomic_write

JSONL_NAME = "metrics.jsonl"
CSV_NAME = "metrics.csv"


def _to_json(obj: Any) -> Any:
    """``json`` fallback for numpy/torch scalars and small arrays, paths and sets."""
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def dumps(obj: Any, **kwargs) -> str:
    """``json.dumps`` that also takes numpy/torch scalars; NaN/inf are written as ``null``."""
    return json.dumps(_nan_to_none(obj), default=lambda o: _nan_to_none(_to_json(o)), allow_nan=False, **kwargs)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` so readers see the old file or the whole new one, never a torn one.

    Temp file in the same folder (same file system, so the rename is atomic) + fsync + ``os.replace``.
    """
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (see `write_text_atomic`)."""
    return write_text_atomic(path, dumps(obj, indent=2) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file. A truncated *last* line (a run killed mid-write) is skipped.

    A corrupt line anywhere else is real damage and raises ``ValueError`` naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    records: list[dict] = []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if k == len(lines) - 1:
                break  # partial final write
            raise ValueError(f"{path}: line {k + 1} is not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: line {k + 1} is not a JSON object")
        records.append(rec)
    return records


def repair_jsonl(path: str | os.PathLike) -> int:
    """Cut a partial last line off ``path`` so appending starts on a clean line; returns bytes removed."""
    path = Path(path)
    if not path.is_file():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    try:
        json.loads(tail)
    except ValueError:
        with open(path, "r+b") as fh:
            fh.truncate(cut)
        return len(tail)
    with open(path, "ab") as fh:  # complete record that only lacks its newline
        fh.write(b"\n")
    return 0


def prune_jsonl(path: str | os.PathLike, max_round: int) -> int:
    """Keep only records with ``round <= max_round`` (for ``--resume``); rewritten atomically.

    Returns the number of records dropped. Records without a ``round`` are kept.
    """
    path = Path(path)
    records = read_jsonl(path)
    kept = [r for r in records if not isinstance(r.get("round"), numbers.Number) or r["round"] <= max_round]
    write_text_atomic(path, "".join(dumps(r) + "\n" for r in kept))
    return len(records) - len(kept)


def write_csv(records: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Records as CSV; columns are the union of keys in first-seen order (``round``, ``peer`` first)."""
    records = list(records)
    columns: dict[str, None] = {}
    for key in ("round", "peer"):
        if any(key in r for r in records):
            columns[key] = None
    for r in records:
        for key in r:
            columns.setdefault(key, None)
    lines = []

    class _Sink:
        def write(self, s: str) -> None:
            lines.append(s)

    writer = csv.DictWriter(_Sink(), fieldnames=list(columns), restval="", lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: (dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()})
    return write_text_atomic(path, "".join(lines))
