"""Plain mixing-weight averaging without alignment (the DIMAT paper's WA baseline; D-PSGD's mixing step)."""
from __future__ import annotations

from dimat.methods.aligned import AlignedAverage


class Average(AlignedAverage):
    """The weighted average of the states as sent."""

    name = "average"
    alignment = None


__all__ = ["Average"]
