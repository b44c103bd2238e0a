"""Deterministic DataLoaders over tensors, fetching whole batches by fancy indexing."""

from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = ["BatchTensorDataset", "make_loader", "tensor_subset"]

DataLike = Union[Dataset, Sequence[Any]]


class BatchTensorDataset(TensorDataset):
    """A TensorDataset the DataLoader can read a batch at a time (`__getitems__`), which is many
    times faster than gathering and re-stacking one sample at a time."""

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return [t[idx] for t in self.tensors]


def _keep_batch(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    return batch  # already stacked by __getitems__


def _tensors_of(data: DataLike) -> tuple[torch.Tensor, ...] | None:
    if isinstance(data, TensorDataset):
        return tuple(data.tensors)
    if isinstance(data, Subset) and isinstance(data.dataset, TensorDataset):
        idx = torch.as_tensor(np.asarray(data.indices, dtype=np.int64))
        return tuple(t[idx] for t in data.dataset.tensors)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in data):
        return tuple(torch.as_tensor(t) for t in data)
    if isinstance(data, torch.Tensor):
        return (data,)
    return None


def tensor_subset(data: DataLike, indices: Sequence[int] | np.ndarray) -> TensorDataset:
    """A TensorDataset holding copies of the rows `indices` (a peer's own share of the data)."""
    tensors = _tensors_of(data)
    if tensors is None:
        raise TypeError(f"tensor_subset needs tensors or a TensorDataset, got {type(data).__name__}")
    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    return TensorDataset(*(t[idx] for t in tensors))


def make_loader(
    data: DataLike,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    indices: Sequence[int] | np.ndarray | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A deterministic DataLoader (seeded generator, num_workers=0).

    `data`: a TensorDataset (or Subset of one), a tuple of tensors/arrays, or any Dataset.
    `indices` restricts it to those rows. Each pass over the loader draws its shuffle order from
    the loader's own generator (`loader.generator`), so a run is reproducible from `seed` and the
    global torch RNG is never touched. Batches are `[inputs, labels]` lists, like the default collate.
    """
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    tensors = _tensors_of(data)
    if tensors is not None:
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError(f"tensors differ in length: {[t.shape[0] for t in tensors]}")
        if indices is not None:
            idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
            tensors = tuple(t[idx] for t in tensors)
        return DataLoader(
            BatchTensorDataset(*tensors), batch_size=int(batch_size), shuffle=shuffle, generator=gen,
            num_workers=0, collate_fn=_keep_batch, drop_last=drop_last,
        )
    if not isinstance(data, Dataset):
        raise TypeError(f"make_loader needs a Dataset or tensors, got {type(data).__name__}")
    if indices is not None:
        data = Subset(data, [int(i) for i in np.asarray(indices).reshape(-1)])
    return DataLoader(data, batch_size=int(batch_size), shuffle=shuffle, generator=gen, num_workers=0, drop_last=drop_last)
