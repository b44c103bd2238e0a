"""Local training: the objective a peer minimises on its own data (dimat.train.objective)."""
from dimat.train.objective import LocalObjective

__all__ = ["LocalObjective"]
