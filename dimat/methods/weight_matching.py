"""Weight matching (Git Re-Basin's data-free alignment), then the mixing-weight average."""
from __future__ import annotations

from dimat.methods.aligned import AlignedAverage


class WeightMatching(AlignedAverage):
    """Alignment by matching weights (no data), then average."""

    name = "weight_matching"
    alignment = "weight"


__all__ = ["WeightMatching"]
