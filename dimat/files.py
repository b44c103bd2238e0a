"""``BadFileError``: a file a run needs exists but cannot be used (truncated, garbage, refused content).

Raised by the readers of data files, checkpoints, run progress, peers files and certificates with a
message that starts with the file's path (``<file>: <problem>``); :func:`dimat.entry.user_errors`
turns it into one ``dimat: error:`` line and exit code 2. It imports nothing, so every layer
(transport included) may raise it.
"""
from __future__ import annotations

from pathlib import Path


class BadFileError(ValueError):
    """``<file>: <problem>``; ``path`` is the file."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def describe(exc: BaseException) -> str:
    """A short one-line account of an unexpected error while reading a file (type and first line)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= 200 else text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


__all__ = ["BadFileError", "describe"]
