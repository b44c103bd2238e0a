"""Model registry: ``build_model(name, **kwargs)``."""
from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from dimat.plugins import import_object

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


def import_model_class(path: str) -> Callable[..., nn.Module]:
    """``"package.module:ClassName"`` (or ``package.module.ClassName``) -> the class (or factory)."""
    return import_object(path, "model class")


def build_imported(path: str, **kwargs) -> nn.Module:
    """Instantiate a user's model class; ``num_classes``/``input_shape`` are passed only if it takes them."""
    cls = import_model_class(path)
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kw = {k: v for k, v in kwargs.items() if takes_any or k in params or k not in ("num_classes", "input_shape")}
    unknown = sorted(set(kw) - set(params)) if not takes_any else []
    if unknown:
        raise ValueError(f"model class {path!r} does not take {unknown}; it takes {sorted(params)}")
    model = cls(**kw)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model class {path!r} built a {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model, or a class named ``"package.module:ClassName"``.

    Unknown names or keyword arguments raise ValueError. A model without ``permutation_spec()``
    is aligned with a spec traced from it (``dimat.align.derive_spec``).
    """
    if ":" in str(name):
        return build_imported(name, **kwargs)
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'; available: {', '.join(available_models())}")
    factory = _MODELS[name]
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ValueError(f"model '{name}' does not take {unknown}; it takes {sorted(params)}")
    return factory(**kwargs)


@register_model("custom")
def custom(**kwargs) -> nn.Module:
    """A user's own model: ``class`` names it (``package.module:ClassName``); other options go to it."""
    path = kwargs.pop("class", None)
    if not path:
        raise ValueError("model 'custom' needs class=package.module:ClassName (model.class=... on the command line)")
    return build_imported(path, **kwargs)
