"""The `DatasetBundle` every loader returns and the name -> loader registry."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "DatasetBundle",
    "available_datasets",
    "load_dataset",
    "make_bundle",
    "register_dataset",
]


@dataclass
class DatasetBundle:
    """A train/test pair of tensor data sets plus what a model needs to know about them.

    `train` and `test` hold float32 inputs shaped `(N, *input_shape)` and int64 labels in
    `[0, num_classes)`.
    """

    train: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    name: str
    groups: np.ndarray | None = None  # per training sample, the source it came from (a document), if any
    documents: list[str] | None = None  # names of those sources

    @property
    def train_labels(self) -> np.ndarray:
        """Training labels as a numpy array (what `partition` takes)."""
        return self.train.tensors[1].numpy()

    @property
    def test_labels(self) -> np.ndarray:
        return self.test.tensors[1].numpy()

    @property
    def in_channels(self) -> int:
        return int(self.input_shape[0])

    @property
    def input_dim(self) -> int:
        """Flattened input size (what an MLP's first layer takes)."""
        return int(np.prod(self.input_shape))

    def __repr__(self) -> str:
        return (
            f"DatasetBundle(name={self.name!r}, train={len(self.train)}, test={len(self.test)}, "
            f"num_classes={self.num_classes}, input_shape={self.input_shape})"
        )


def make_bundle(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
) -> DatasetBundle:
    """Wrap numpy arrays into a checked `DatasetBundle` (float32 inputs, int64 labels)."""
    xtr = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32))
    xte = torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32))
    ytr = torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64))
    yte = torch.from_numpy(np.ascontiguousarray(y_test, dtype=np.int64))
    if xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(f"{name}: train inputs {tuple(xtr.shape)} and test inputs {tuple(xte.shape)} differ in shape")
    for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        if x.shape[0] != y.shape[0] or y.ndim != 1:
            raise ValueError(f"{name}: {split} has {x.shape[0]} inputs but labels shaped {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"{name}: {split} labels outside [0, {num_classes})")
    return DatasetBundle(
        train=TensorDataset(xtr, ytr),
        test=TensorDataset(xte, yte),
        num_classes=int(num_classes),
        input_shape=tuple(int(s) for s in xtr.shape[1:]),
        name=name,
    )


_REGISTRY: dict[str, Callable[..., DatasetBundle]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., DatasetBundle]], Callable[..., DatasetBundle]]:
    """Decorator registering `factory(root, **kwargs) -> DatasetBundle` under `name`."""

    def deco(factory: Callable[..., DatasetBundle]) -> Callable[..., DatasetBundle]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"data set {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def get_loader(name: str) -> Callable[..., DatasetBundle]:
    """The registered factory of data set ``name`` (ValueError naming the available ones)."""
    key = str(name).lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(available_datasets())}")
    return _REGISTRY[key]


def available_datasets() -> list[str]:
    return sorted(_REGISTRY)


def load_dataset(name: str, root: str | Path | None = None, **kwargs: Any) -> DatasetBundle:
    """Load a registered data set by name.

    Names: see `available_datasets()` (`mnist1d`, `digits`, `cifar10`, `cifar100`, `synthetic`).
    `root` is the local data folder (CIFAR) or cache folder (mnist1d); others ignore it.
    Unknown names or options raise ValueError naming what is accepted.
    """
    key = str(name).lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(available_datasets())}")
    factory = _REGISTRY[key]
    params = inspect.signature(factory).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not accepts_any:
        allowed = [p for p in params if p != "root"]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ValueError(
                f"data set {key!r} got unknown option(s) {', '.join(unknown)}; accepted: {', '.join(allowed)}"
            )
    return factory(root, **kwargs)
