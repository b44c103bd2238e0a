"""How aligned neighbour states are combined: the contract (``base``), the plain mean (``mean``),
robust estimators (``robust``), safety-aware masking (``safety``) and the names (``registry``)."""
from .base import AggregationContext, Aggregator, BaseAggregator, validate_inputs
from .mean import MeanAggregator, is_plain_mean, weighted_average
from .registry import available_aggregators, get_aggregator, register_aggregator

__all__ = ["AggregationContext", "Aggregator", "BaseAggregator", "MeanAggregator", "available_aggregators",
           "get_aggregator", "is_plain_mean", "register_aggregator", "validate_inputs", "weighted_average"]
