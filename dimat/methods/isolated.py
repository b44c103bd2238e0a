"""Peers that never communicate: the lower bound every federation should beat."""
from __future__ import annotations

from typing import Sequence

from dimat.methods.base import Method


class Isolated(Method):
    """Local training only."""

    name = "isolated"

    def exchanges_per_round(self, steps_per_round: Sequence[int]) -> int:
        return 0


__all__ = ["Isolated"]
