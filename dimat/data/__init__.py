"""Data sets, peer partitions and deterministic loaders.

`load_dataset(name, root=None, **kw) -> DatasetBundle`; `partition(labels, n_peers, scheme)`;
`make_loader(data, batch_size, shuffle, seed)`.
"""

from .bundle import DatasetBundle, available_datasets, load_dataset, make_bundle, register_dataset
from .loader import BatchTensorDataset, make_loader, tensor_subset
from .partition import SCHEMES, describe_partition, partition, partition_stats, train_val_split
from .safe_pickle import RestrictedUnpickler, UnsafePickleError, safe_load, safe_load_file

# Importing the loaders registers them.
from . import cifar, digits, mnist1d, synthetic, text  # noqa: E402,F401  isort: skip

__all__ = [
    "BatchTensorDataset",
    "DatasetBundle",
    "RestrictedUnpickler",
    "SCHEMES",
    "UnsafePickleError",
    "available_datasets",
    "describe_partition",
    "load_dataset",
    "make_bundle",
    "make_loader",
    "partition",
    "partition_stats",
    "register_dataset",
    "safe_load",
    "safe_load_file",
    "tensor_subset",
    "train_val_split",
]
