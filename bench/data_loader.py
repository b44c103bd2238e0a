"""Throughput of `make_loader` (batched __getitems__) against a plain DataLoader over the same
TensorDataset, measured in the same run. Prints batches/s for each and the speed-up ratio.

    PYTHONPATH=. python bench/data_loader.py
"""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from dimat.data import make_loader


def epoch_time(loader: DataLoader, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for xb, yb in loader:
            pass
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    torch.set_num_threads(1)
    cases = {
        "mnist1d-like 4000x1x40, batch 64": (torch.randn(4000, 1, 40), 64),
        "cifar-like 5000x3x32x32, batch 128": (torch.randn(5000, 3, 32, 32), 128),
    }
    for name, (x, bs) in cases.items():
        y = torch.randint(0, 10, (x.shape[0],))
        g = torch.Generator().manual_seed(0)
        plain = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True, generator=g, num_workers=0)
        ours = make_loader((x, y), batch_size=bs, shuffle=True, seed=0)
        tp, to = epoch_time(plain), epoch_time(ours)
        nb = len(ours)
        print(f"{name}: plain DataLoader {nb / tp:8.0f} batches/s ({tp * 1e3:7.1f} ms/epoch) | "
              f"make_loader {nb / to:8.0f} batches/s ({to * 1e3:7.1f} ms/epoch) | speed-up x{tp / to:.1f}")


if __name__ == "__main__":
    main()
