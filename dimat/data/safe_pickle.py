"""A restricted unpickler for the CIFAR python batch files.

Those files are pickles, and a pickle can name any importable callable. This unpickler resolves
only the handful of globals numpy needs to rebuild arrays, plus builtin containers; any other
global raises `UnsafePickleError` naming it, before anything is called. `bytearray` is allowed
only from bytes or text, never from a size (a 121-byte pickle could otherwise ask for 1 TiB).
Every failure to read a file is a `BadFileError` naming it (one error line, exit code 2).
"""

from __future__ import annotations

import builtins
import codecs
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from dimat.files import BadFileError, describe

__all__ = ["UnsafePickleError", "RestrictedUnpickler", "safe_load", "safe_load_file"]


class UnsafePickleError(pickle.UnpicklingError, BadFileError):
    """A pickle referred to a global outside the allow-list (or asked for a refused construction)."""

    def __init__(self, message: str) -> None:  # the message already names the file
        Exception.__init__(self, message)


def _bytearray(*args: Any) -> bytearray:
    """`bytearray` from bytes or text only: `bytearray(n)` would allocate n zero bytes on request."""
    if args and not isinstance(args[0], (bytes, bytearray, str)):
        raise UnsafePickleError(f"refusing bytearray({type(args[0]).__name__}) in a data file (only bytes or text)")
    return bytearray(*args)


def _multiarray_attr(name: str) -> Any:
    # numpy 2 moved numpy.core to numpy._core; resolve without touching the deprecated alias.
    try:
        from numpy._core import multiarray  # type: ignore[attr-defined]
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    return getattr(multiarray, name)


def _latin1_encode(obj: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """Stand-in for `_codecs.encode`: protocol-2 pickles from Python 3 spell bytes as
    `_codecs.encode(text, 'latin1')`; any other codec is refused."""
    if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(obj, str):
        raise UnsafePickleError(f"refusing _codecs.encode with codec {encoding!r}")
    return obj.encode("latin1", errors)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    for _name in ("_reconstruct", "scalar"):
        _ALLOWED[(_mod, _name)] = _multiarray_attr(_name)
for _mod in ("builtins", "__builtin__"):  # __builtin__: Python 2 pickles
    for _name in ("dict", "list", "tuple", "set", "frozenset"):
        _ALLOWED[(_mod, _name)] = getattr(builtins, _name)
    _ALLOWED[(_mod, "bytearray")] = _bytearray


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that only resolves allow-listed globals (numpy arrays, builtin containers)."""

    def __init__(self, file: BinaryIO, *, source: str = "<pickle>", encoding: str = "bytes") -> None:
        super().__init__(file, encoding=encoding)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refusing to load global '{module}.{name}'; only numpy arrays "
                "and builtin containers are allowed in a data file"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: persistent ids are not allowed in a data file")


def safe_load(file: BinaryIO, source: str = "<pickle>") -> Any:
    """Unpickle from an open binary file with the restricted unpickler (Python 2 str -> bytes)."""
    return RestrictedUnpickler(file, source=source, encoding="bytes").load()


def safe_load_file(path: str | Path, what: str = "pickle") -> Any:
    """Unpickle a file; any failure (refused global, truncation, garbage, memory) is a `BadFileError`
    (``<path>: not a readable <what> (...)``)."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return safe_load(f, source=str(path))
        except UnsafePickleError as exc:
            text = str(exc)
            raise UnsafePickleError(text if text.startswith(str(path)) else f"{path}: {text}") from None
        except Exception as exc:  # a damaged or hostile file: whatever the unpickler raised
            raise BadFileError(path, f"not a readable {what} ({describe(exc)})") from None
