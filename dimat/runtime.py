"""Process-wide runtime settings a run applies once (below every package that needs them)."""
from __future__ import annotations

import torch


def set_threads(threads: int | None) -> None:
    """Apply ``threads`` (torch intra-op threads) when the config sets it (None: torch's default)."""
    if threads:
        torch.set_num_threads(int(threads))


__all__ = ["set_threads"]
