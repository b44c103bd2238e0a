"""Loading a user's class from ``package.module:Name`` (``model.class``, ``merge.class``)."""
from __future__ import annotations

import importlib
from typing import Any


def import_object(path: str, what: str = "class") -> Any:
    """``"package.module:Name"`` (or ``package.module.Name``) -> the object; ValueError naming ``path`` otherwise.

    Args:
        path: where the object lives; the module must be importable (on ``PYTHONPATH``).
        what: the noun for error messages, e.g. ``"method class"``.

    Example:
        >>> import_object("collections:OrderedDict").__name__
        'OrderedDict'
    """
    mod_name, sep, attr = str(path).partition(":")
    if not sep:
        mod_name, _, attr = str(path).rpartition(".")
    if not mod_name or not attr:
        raise ValueError(f"{what} {path!r} is not of the form 'package.module:ClassName'")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"{what} {path!r}: cannot import {mod_name!r} ({exc})") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {path!r}: {mod_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {path!r} is not callable")
    return obj


__all__ = ["import_object"]
