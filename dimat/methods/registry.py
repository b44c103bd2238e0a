"""Methods by name: the built-ins, one module each, and ``custom`` (a user's class, ``merge.class``)."""
from __future__ import annotations

from dimat.config import ConfigError, MergeSettings
from dimat.methods.average import Average
from dimat.methods.base import Method
from dimat.methods.centralized import Centralized
from dimat.methods.dimat import Dimat
from dimat.methods.gossip import Gossip
from dimat.methods.isolated import Isolated
from dimat.methods.scaffold import Scaffold
from dimat.methods.weight_matching import WeightMatching
from dimat.plugins import import_object

_METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Dimat, WeightMatching, Average, Gossip, Isolated, Centralized, Scaffold)
}

#: ``merge.method`` of a user's class (``merge.class=pkg.mod:Class``)
CUSTOM = "custom"


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method under ``cls.name`` (then ``merge.method=<name>`` selects it)."""
    if cls.name in _METHODS and _METHODS[cls.name] is not cls or cls.name == CUSTOM:
        raise ValueError(f"method {cls.name!r} is already registered")
    _METHODS[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """The names ``merge.method`` takes (``custom`` included)."""
    return sorted([*_METHODS, CUSTOM])


def method_class(settings: MergeSettings) -> type[Method]:
    """The class ``settings`` names; ConfigError (one line) for an unknown name or a bad ``merge.class``."""
    if settings.method == CUSTOM:
        if not settings.method_class:
            raise ConfigError("merge=custom needs merge.class=<package.module:Class> (a dimat.methods.Method subclass)")
        try:
            cls = import_object(settings.method_class, "merge.class")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise ConfigError(f"merge.class {settings.method_class!r} is not a subclass of dimat.methods.Method")
        return cls
    if settings.method_class:
        raise ConfigError(f"merge.class is for merge=custom (got merge.method={settings.method})")
    if settings.method not in _METHODS:
        raise ConfigError(f"unknown merge method {settings.method!r} (expected one of {', '.join(available_methods())})")
    return _METHODS[settings.method]


def build_method(settings: MergeSettings) -> Method:
    """The method object for a validated ``merge:`` section.

    Keys of ``merge:`` that no shared field reads must be ones the class declares in ``options``.

    Example:
        >>> from dimat.entry import compose                                  # doctest: +SKIP
        >>> build_method(RunConfig.from_config(compose([])).merge).name      # doctest: +SKIP
        'dimat'
    """
    cls = method_class(settings)
    unknown = sorted(set(settings.options) - set(cls.options))
    if unknown:
        raise ConfigError(f"unknown merge option(s) for merge.method={settings.method}: {', '.join(unknown)}"
                          + (f" (it takes {', '.join(cls.options)})" if cls.options else ""))
    return cls(settings)


__all__ = ["available_methods", "build_method", "method_class", "register_method", "CUSTOM"]
