"""One model trained on the union of every peer's data, on the same epoch budget: the upper bound."""
from __future__ import annotations

from typing import Sequence

from dimat.methods.base import Method


class Centralized(Method):
    """The federation is one peer holding all training data; nothing is exchanged."""

    name = "centralized"
    centralized = True

    def exchanges_per_round(self, steps_per_round: Sequence[int]) -> int:
        return 0


__all__ = ["Centralized"]
