"""CIFAR-10 / CIFAR-100 read from the standard python-pickle batch files in a local folder.

Nothing is downloaded. The files are loaded with a restricted unpickler (see `safe_pickle`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import DatasetBundle, make_bundle, register_dataset
from .safe_pickle import safe_load_file

__all__ = ["CIFAR10", "CIFAR100", "CifarSpec", "find_cifar_folder", "load_cifar", "read_cifar_batch"]


@dataclass(frozen=True)
class CifarSpec:
    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def files(self) -> tuple[str, ...]:
        return self.train_files + self.test_files


# The usual per-channel statistics of each training set (pixel values scaled to [0, 1]).
CIFAR10 = CifarSpec(
    name="cifar10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    label_key=b"labels",
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)
CIFAR100 = CifarSpec(
    name="cifar100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    label_key=b"fine_labels",
    num_classes=100,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)


def _expected(spec: CifarSpec) -> str:
    return f"{spec.folder}/{{{', '.join(spec.files)}}}"


def find_cifar_folder(root: str | Path | None, spec: CifarSpec) -> Path:
    """The folder holding the batch files: `root` itself or `root/<standard folder name>`."""
    if root is None:
        raise ValueError(
            f"{spec.name} needs root=<folder containing {spec.folder}/> (files {_expected(spec)}); "
            "nothing is downloaded"
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"{spec.name}: data folder {root} does not exist; expected it to contain {_expected(spec)} "
            f"(or to be the {spec.folder} folder itself)"
        )
    for cand in (root / spec.folder, root):
        if cand.is_dir() and all((cand / f).is_file() for f in spec.files):
            return cand
    cand = root / spec.folder if (root / spec.folder).is_dir() else root
    missing = [str(cand / f) for f in spec.files if not (cand / f).is_file()]
    raise FileNotFoundError(
        f"{spec.name}: missing {', '.join(missing)}; expected the standard python batch files "
        f"{_expected(spec)} under {root}"
    )


def _get(d: dict, key: bytes) -> object:
    # Standard files decode to bytes keys; accept str keys from files re-pickled under Python 3.
    if key in d:
        return d[key]
    return d.get(key.decode())


def read_cifar_batch(path: str | Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 data N x 3072, int64 labels N), checked."""
    path = Path(path)
    d = safe_load_file(path, what="CIFAR batch file")  # BadFileError (UnsafePickleError too) names the file
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a dict, found {type(d).__name__}")
    data, labels = _get(d, b"data"), _get(d, label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: b'data' must be a uint8 array N x 3072, found {desc}")
    if labels is None:
        raise ValueError(f"{path}: no {label_key!r} entry")
    try:
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {label_key!r} is not a list of integers") from e
    if y.shape[0] != data.shape[0]:
        raise ValueError(f"{path}: {data.shape[0]} images but {y.shape[0]} labels")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{path}: labels outside [0, {num_classes})")
    return data, y


def _read_split(folder: Path, files: tuple[str, ...], spec: CifarSpec, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    xs, ys, n = [], [], 0
    for f in files:
        if limit is not None and n >= limit:
            break
        x, y = read_cifar_batch(folder / f, spec.label_key, spec.num_classes)
        xs.append(x)
        ys.append(y)
        n += len(y)
    x, y = np.concatenate(xs), np.concatenate(ys)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y


def _normalise(x: np.ndarray, spec: CifarSpec) -> np.ndarray:
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each a 32x32 image in row order.
    out = x.reshape(-1, 3, 32, 32).astype(np.float32)
    out /= 255.0
    out -= np.asarray(spec.mean, np.float32)[None, :, None, None]
    out /= np.asarray(spec.std, np.float32)[None, :, None, None]
    return out


def load_cifar(root: str | Path | None, spec: CifarSpec, limit: int | None = None) -> DatasetBundle:
    """Read a CIFAR folder into a bundle, (N, 3, 32, 32), normalised per channel.

    `limit` keeps at most that many samples of each split (the first ones; the files are shuffled).
    """
    if limit is not None and int(limit) < 1:
        raise ValueError(f"{spec.name}: limit must be a positive integer, got {limit}")
    limit = None if limit is None else int(limit)
    folder = find_cifar_folder(root, spec)
    x_tr, y_tr = _read_split(folder, spec.train_files, spec, limit)
    x_te, y_te = _read_split(folder, spec.test_files, spec, limit)
    return make_bundle(spec.name, _normalise(x_tr, spec), y_tr, _normalise(x_te, spec), y_te, spec.num_classes)


@register_dataset("cifar10")
def load_cifar10(root: str | Path | None = None, limit: int | None = None) -> DatasetBundle:
    """CIFAR-10 from `root` (the `cifar-10-batches-py` folder or its parent)."""
    return load_cifar(root, CIFAR10, limit)


@register_dataset("cifar100")
def load_cifar100(root: str | Path | None = None, limit: int | None = None) -> DatasetBundle:
    """CIFAR-100 (fine labels) from `root` (the `cifar-100-python` folder or its parent)."""
    return load_cifar(root, CIFAR100, limit)
