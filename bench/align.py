"""Benchmark: DIMAT alignment cost against one local training epoch, measured in the same run.

For ResNet-20 at each width: 2 neighbours aligned to a reference on ``--align-samples``
CIFAR-shaped samples, timed as (a) activation statistics and (b) linear assignment, beside one
training epoch (SGD, batch 128) on ``--train-samples`` samples. Goal: alignment <= 10% of an epoch.

On a CPU a width-8 epoch takes long; ``--epoch-batches N`` times N batches and extrapolates to
the epoch (printed as such). Run: ``python bench/align.py [--widths 1 8] [--device cuda]``.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from dimat.align import collect_cross_stats, get_spec, perms_from_stats
from dimat.models import build_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_alignment(model: nn.Module, neighbours: list[nn.Module], data: list[torch.Tensor], device) -> tuple[float, float]:
    spec = get_spec(model)
    # one warm-up batch so CUDA/cuBLAS set-up is not billed to alignment (the epoch gets the same)
    for s in collect_cross_stats(model, neighbours, data[:1], spec):
        perms_from_stats(spec, s)
    sync(device)
    t0 = time.perf_counter()
    stats = collect_cross_stats(model, neighbours, data, spec)
    sync(device)
    t1 = time.perf_counter()
    for s in stats:
        perms_from_stats(spec, s)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def time_epoch(model: nn.Module, n: int, batch: int, device, max_batches: int | None) -> tuple[float, bool]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    steps = (n + batch - 1) // batch
    run = min(steps, max_batches) if max_batches else steps
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    # one warm-up step so allocator/cuDNN set-up is not billed to the epoch
    nn.functional.cross_entropy(model(x), y).backward()
    opt.zero_grad()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(run):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    sync(device)
    elapsed = time.perf_counter() - t0
    return elapsed * steps / run, run < steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=float, nargs="+", default=[1, 8])
    ap.add_argument("--align-samples", type=int, default=1024)
    ap.add_argument("--train-samples", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epoch-batches", type=int, default=None,
                    help="time this many training batches and extrapolate (default: 10 on CPU for width > 2, else all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} align_samples={args.align_samples} "
          f"train_samples={args.train_samples}")
    print(f"{'width':>5} {'stats_s':>8} {'assign_s':>8} {'align_s':>8} {'epoch_s':>9} {'ratio':>7}")
    for width in args.widths:
        torch.manual_seed(0)
        model = build_model("resnet20", width=width).to(device)
        neighbours = [build_model("resnet20", width=width).to(device) for _ in range(2)]
        data = [torch.randn(min(args.batch, args.align_samples - i), 3, 32, 32, device=device)
                for i in range(0, args.align_samples, args.batch)]
        stats_s, assign_s = time_alignment(model, neighbours, data, device)
        limit = args.epoch_batches
        if limit is None and device.type == "cpu" and width > 2:
            limit = 10
        epoch_s, extrapolated = time_epoch(copy.deepcopy(model), args.train_samples, args.batch, device, limit)
        align_s = stats_s + assign_s
        note = " (epoch extrapolated)" if extrapolated else ""
        print(f"{width:>5g} {stats_s:>8.2f} {assign_s:>8.2f} {align_s:>8.2f} {epoch_s:>9.2f} {align_s / epoch_s:>7.1%}{note}")
    print("goal: alignment (statistics + assignment for 2 neighbours) <= 10% of one epoch")


if __name__ == "__main__":
    main()
