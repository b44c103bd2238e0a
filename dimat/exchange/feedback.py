"""Error feedback: what compression dropped is kept and added to the next message.

Without a reference (``exchange.delta: false``) a peer sends ``C(x + e)`` and keeps
``e <- (x + e) - D(C(x + e))``, so ``sent + residual == meant`` holds exactly at every step and
nothing compression dropped is lost, only delayed. With ``exchange.delta: true`` the reference
plays this role (``x - reference`` *is* the residual), so the two are not combined.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Residual:
    """One sender's residual per floating tensor (work dtype), empty before its first message."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def meant(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """What the sender means to send for ``name``: its value plus the carried residual."""
        e = self.values.get(name)
        return x if e is None else x + e

    def keep(self, name: str, meant: torch.Tensor, sent: torch.Tensor) -> None:
        """Remember ``meant - sent`` (``sent``: the decoded message, what every receiver gets)."""
        self.values[name] = meant - sent


__all__ = ["Residual"]
