"""Merge operators: weighted average, DIMAT (align + average), robust and safety-masked variants."""
from .api import METHODS, merge, merge_states, normalise_weights
from .average import weighted_average

__all__ = ["METHODS", "merge", "merge_states", "normalise_weights", "weighted_average"]
