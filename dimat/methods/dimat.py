"""DIMAT (Saadati et al., 2024): align neighbours by activation matching on own data, then average."""
from __future__ import annotations

from dimat.methods.aligned import AlignedAverage


class Dimat(AlignedAverage):
    """Activation-matched alignment into the peer's basis, then the mixing-weight average."""

    name = "dimat"
    alignment = "activation"


__all__ = ["Dimat"]
