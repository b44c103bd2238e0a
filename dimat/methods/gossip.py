"""Consensus decentralized SGD (D-PSGD): average with the mixing weights every few local steps.

No alignment, optimizer momentum kept and BatchNorm buffers averaged, whatever ``merge.bn_stats`` and
``merge.keep_momentum`` say: gossip is the averaging step of SGD, not a merge of trained models.
"""
from __future__ import annotations

from typing import Sequence

from dimat.methods.aligned import AlignedAverage
from dimat.methods.base import _every


class Gossip(AlignedAverage):
    """Plain averaging every ``merge.gossip_every`` local steps."""

    name = "gossip"
    alignment = None
    choco = True

    @property
    def bn_stats(self) -> str:
        return "average"

    @property
    def reset_optimizer(self) -> bool:
        return False

    def exchanges_per_round(self, steps_per_round: Sequence[int]) -> int:
        return _every(self.settings.gossip_every, steps_per_round)


__all__ = ["Gossip"]
