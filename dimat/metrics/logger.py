"""`MetricsLogger`: the per-round metrics of a run, as JSONL (always), CSV and TensorBoard (optional)."""
from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any, Mapping

from dimat.metrics.io import CSV_NAME, JSONL_NAME, dumps, read_jsonl, repair_jsonl, write_csv

# Keys that identify a record rather than measure something; never sent to TensorBoard as scalars.
ID_KEYS = ("round", "peer", "step", "epoch")


class MetricsLogger:
    """Append metric records to ``run_dir/metrics.jsonl``, one flushed JSON line each.

    A record is a flat mapping such as ``{"round": 3, "peer": 1, "test_acc": 0.91, "loss": 0.3}``;
    ``peer`` may be absent (or ``None``) for run-wide numbers. Opening an existing file appends to it
    (``--resume``) after trimming a partial last line. With ``tensorboard=True`` every numeric
    field is also written as a scalar tagged ``<metric>/peer_<id>`` (or ``<metric>`` without a peer)
    at step ``round``, under ``run_dir/tensorboard``.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / JSONL_NAME
        repair_jsonl(self.path)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # heavy import, only when asked

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    @property
    def closed(self) -> bool:
        return self._fh.closed

    def log(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one JSON line and flush it to the OS."""
        if not isinstance(record, Mapping):
            raise TypeError(f"a metrics record must be a mapping, got {type(record).__name__}")
        if self._fh.closed:
            raise ValueError(f"MetricsLogger for {self.run_dir} is closed")
        self._fh.write(dumps(dict(record)) + "\n")
        self._fh.flush()
        if self._tb is not None:
            self._log_tensorboard(record)

    def _log_tensorboard(self, record: Mapping[str, Any]) -> None:
        step = record.get("round", record.get("step"))
        step = int(step) if isinstance(step, numbers.Number) else None
        peer = record.get("peer")
        for key, value in record.items():
            if key in ID_KEYS or isinstance(value, bool):
                continue
            if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
                value = value.item()
            if not isinstance(value, numbers.Real):
                continue
            tag = f"{key}/peer_{peer}" if peer is not None else str(key)
            self._tb.add_scalar(tag, float(value), global_step=step)

    def records(self) -> list[dict]:
        """Everything logged so far (including earlier sessions of a resumed run)."""
        if not self._fh.closed:
            self._fh.flush()
        return read_jsonl(self.path)

    def write_csv(self, path: str | os.PathLike | None = None) -> Path:
        """Write ``run_dir/metrics.csv`` (or ``path``) from the JSONL file; returns its path."""
        return write_csv(self.records(), path if path is not None else self.run_dir / CSV_NAME)

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort for loggers never closed explicitly
        try:
            if not self._fh.closed:
                self._fh.close()
        except Exception:
            pass
