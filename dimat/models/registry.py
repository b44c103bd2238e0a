"""Model registry: ``build_model(name, **kwargs)``."""
from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable:
    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model '{name}' is already registered")
        _MODELS[name] = factory
        return factory
    return deco


def available_models() -> list[str]:
    return sorted(_MODELS)


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; unknown names or keyword arguments raise ValueError."""
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'; available: {', '.join(available_models())}")
    factory = _MODELS[name]
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ValueError(f"model '{name}' does not take {unknown}; it takes {sorted(params)}")
    return factory(**kwargs)
