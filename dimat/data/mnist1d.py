"""MNIST-1D, generated offline by the `mnist1d` package's own generator and cached as .npz.

Only `mnist1d.data.make_dataset` is used; the package's `get_dataset` (which may download) never is.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import DatasetBundle, make_bundle, register_dataset
from .cache import cache_dir, cache_key, load_npz, save_npz_atomic

__all__ = ["generate_mnist1d", "load_mnist1d"]

log = logging.getLogger(__name__)

_KEYS = ("x", "y", "x_test", "y_test")
_FORMAT = 1  # bump when the cached layout changes


def _generator_args(num_samples: int | None, seed: int | None, train_split: float | None) -> dict[str, Any]:
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)  # the download address plays no part in generation
    if num_samples is not None:
        args["num_samples"] = int(num_samples)
    if seed is not None:
        args["seed"] = int(seed)
    if train_split is not None:
        args["train_split"] = float(train_split)
    return args


def generate_mnist1d(args: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run the package generator with `args`, leaving the global `random`/numpy RNG state as it was."""
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    # make_dataset reseeds the global RNGs; put them back so callers' randomness is untouched.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(ObjectView(dict(args)))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: np.asarray(data[k]) for k in _KEYS}


def _sized(num_samples: int, train_split: float, min_train: int) -> dict[str, Any]:
    """Generator sizes giving at least ``min_train`` training samples and the same test set size."""
    n_train = int(num_samples * train_split)
    if n_train >= min_train:
        return {}
    n_test = num_samples - n_train
    total = int(min_train) + n_test
    # the generator cuts at int(total * train_split): half a sample of slack survives float rounding
    return {"num_samples": total, "train_split": (int(min_train) + 0.5) / total}


@register_dataset("mnist1d")
def load_mnist1d(
    root: str | Path | None = None,
    num_samples: int | None = None,
    seed: int | None = None,
    train_split: float | None = None,
    min_train: int | None = None,
) -> DatasetBundle:
    """MNIST-1D as (N, 1, 40) float32 signals, standardised with the training mean/std.

    Defaults are the package's (5000 samples, 80/20 split -> 4000/1000, seed 42). The generated
    arrays are cached under `root` (or `$DIMAT_CACHE`, or `~/.cache/dimat`) in `mnist1d/`.
    `min_train` generates at least that many training samples (a large federation's peers each get
    enough); the test set keeps the size it would have had, so evaluating stays as cheap.
    """
    if num_samples is not None and int(num_samples) < 20:
        raise ValueError(f"mnist1d: num_samples must be at least 20 (two per class per split), got {num_samples}")
    if train_split is not None and not 0.0 < float(train_split) < 1.0:
        raise ValueError(f"mnist1d: train_split must be in (0, 1), got {train_split}")
    args = _generator_args(num_samples, seed, train_split)
    if min_train is not None:
        args.update(_sized(int(args["num_samples"]), float(args["train_split"]), int(min_train)))
    path = cache_dir(root) / "mnist1d" / f"mnist1d-{cache_key({'format': _FORMAT, **args})}.npz"
    arrays = load_npz(path, _KEYS)
    if arrays is None:
        log.info("generating MNIST-1D (%d samples, seed %d) -> %s", args["num_samples"], args["seed"], path)
        arrays = generate_mnist1d(args)
        try:
            save_npz_atomic(path, **arrays)
        except OSError as e:  # a read-only cache folder costs time, not correctness
            log.warning("could not cache MNIST-1D at %s: %s", path, e)
    x, xt = arrays["x"].astype(np.float32), arrays["x_test"].astype(np.float32)
    mean, std = float(x.mean()), float(x.std()) or 1.0
    x = ((x - mean) / std)[:, None, :]
    xt = ((xt - mean) / std)[:, None, :]
    return make_bundle("mnist1d", x, arrays["y"], xt, arrays["y_test"], num_classes=10)
