"""dimat: decentralized merge-and-train with permutation alignment (DIMAT)."""

__version__ = "0.1.0"
