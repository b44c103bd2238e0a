"""The peers' independent work (local training, evaluation) spread over worker threads.

``workers: auto`` (the default) gives one worker per core. A peer's local steps read only its own
model, optimizer, data and generator, and evaluation only its own model and the shared test set,
so peers on different workers never touch the same tensors and each computes exactly what it
computes alone: the metrics of a run do not depend on the number of workers (a test pins it).
Threads, not processes: PyTorch releases the GIL inside its kernels, and the small models this
runs at scale spend most of a step there (with ``threads: 1`` each worker's kernels run on its own
thread), while every peer stays in one process, so merging, the shared average and checkpoints see
every model directly and the run has one folder. Merges stay sequential: a peer's merge reads
states that other peers' merges overwrite (``sent_states``) and shares averages with them
(``shared_merge``), both ordered.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch

T = TypeVar("T")


class PeerPool:
    """Runs a function for each of several peers, on ``workers`` threads (1: in the calling thread).

    Args:
        workers: threads to use; 1 runs everything in the caller, as before workers existed.

    Example:
        >>> with PeerPool(2) as pool:
        ...     pool.map(lambda pid: pid * pid, [1, 2, 3])
        {1: 1, 2: 4, 3: 9}
    """

    def __init__(self, workers: int) -> None:
        if int(workers) < 1:
            raise ValueError(f"workers must be at least 1 (got {workers})")
        self.workers = int(workers)
        self._pool = None
        if self.workers > 1:
            # OpenMP's thread count is per thread: a worker would otherwise start with every core
            # for each of its kernels (oversubscribed, and reductions split differently)
            threads = torch.get_num_threads()
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="dimat-peer",
                                            initializer=torch.set_num_threads, initargs=(threads,))

    def map(self, fn: Callable[[int], T], ids: Iterable[int]) -> dict[int, T]:
        """``{pid: fn(pid)}`` in the order of ``ids``; the first exception raised is re-raised here."""
        ids = list(ids)
        if self._pool is None or len(ids) < 2:
            return {pid: fn(pid) for pid in ids}
        # one task per peer: peers of unequal size balance over the workers by themselves
        return dict(zip(ids, self._pool.map(fn, ids)))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "PeerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: the pool of a federation that was never given one: everything in the caller
SERIAL = PeerPool(1)

__all__ = ["PeerPool", "SERIAL"]
