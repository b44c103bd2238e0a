"""Aggregators by name. This module imports the built-ins; they import only ``base``, so no cycle."""
from __future__ import annotations

from typing import Any, Callable

from .base import Aggregator
from .mean import MeanAggregator
from .robust import (
    MedianAggregator,
    MultiKrumAggregator,
    NormClipAggregator,
    SignConsensusAggregator,
    TrimmedMeanAggregator,
)
from .probe import ProbeTrustAggregator
from .safety import SafetyMaskAggregator

_REGISTRY: dict[str, Callable[..., Aggregator]] = {
    cls.name: cls
    for cls in (MeanAggregator, MedianAggregator, TrimmedMeanAggregator, NormClipAggregator,
                MultiKrumAggregator, SignConsensusAggregator, SafetyMaskAggregator, ProbeTrustAggregator)
}


def register_aggregator(name: str) -> Callable[[Callable[..., Aggregator]], Callable[..., Aggregator]]:
    """Class/factory decorator adding a third-party aggregator under ``name``."""

    def deco(factory: Callable[..., Aggregator]) -> Callable[..., Aggregator]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"aggregator {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_aggregators() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def get_aggregator(name: str = "mean", **kwargs: Any) -> Aggregator:
    """An aggregator instance by name: ``mean``, ``median``, ``trimmed_mean``, ``norm_clip``,
    ``multi_krum``, ``sign_consensus``, ``safety_mask``, ``probe_trust``; ``kwargs`` go to its constructor."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown aggregator {name!r}; available: {sorted(_REGISTRY)}")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad options for aggregator {name!r}: {e}") from e
