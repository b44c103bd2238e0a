"""Merge operators: weighted average, DIMAT (align + average), robust and safety-masked variants."""
from .aggregators import AggregationContext, available_aggregators, get_aggregator, register_aggregator
from .aggregators.mean import weighted_average
from .api import ALIGNMENTS, BN_STATS, merge, merge_states
from .basis import BASIS_KEY, attach_basis, split_basis

__all__ = ["ALIGNMENTS", "BN_STATS", "merge", "merge_states", "weighted_average", "AggregationContext",
           "available_aggregators", "get_aggregator", "register_aggregator", "BASIS_KEY", "attach_basis", "split_basis"]
