"""A small on-disk cache of numpy arrays (.npz), keyed by a hash of the arguments that made them."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..atomic import atomic_write

__all__ = ["cache_dir", "cache_key", "load_npz", "save_npz_atomic"]


def cache_dir(root: str | Path | None = None) -> Path:
    """The cache folder: `root` if given, else `$DIMAT_CACHE`, else `~/.cache/dimat`."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("DIMAT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "dimat"


def cache_key(args: Mapping[str, Any]) -> str:
    """A stable short hash of JSON-able arguments (sorted keys, so order does not matter)."""
    blob = json.dumps(args, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def save_npz_atomic(path: str | Path, **arrays: np.ndarray) -> Path:
    """Write arrays to `path` via a temporary file and rename, so readers never see half a file."""
    # A file object (not a name) stops numpy appending a second ".npz".
    return atomic_write(path, lambda fh: np.savez(fh, **arrays))


def load_npz(path: str | Path, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """Read `keys` from a cache file; None if it is missing, unreadable or lacks a key."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        # allow_pickle=False: a cache file must never run code.
        with np.load(path, allow_pickle=False) as z:
            if not all(k in z.files for k in keys):
                return None
            return {k: z[k] for k in keys}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None
