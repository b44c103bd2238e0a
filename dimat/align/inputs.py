"""`data` everywhere in dimat: any iterable of input tensors or of (input, label) pairs."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch


def _input_of(item: Any) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0]
    if isinstance(item, dict) and isinstance(item.get("input"), torch.Tensor):
        return item["input"]
    raise ValueError(
        f"data must yield input tensors or (input, label) pairs; got an item of type {type(item).__name__}")


def iter_inputs(data: Iterable, max_batches: int | None = None, device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
    for i, item in enumerate(data):
        if max_batches is not None and i >= max_batches:
            break
        x = _input_of(item)
        yield x.to(device) if device is not None else x


def reiterable_inputs(data: Iterable | None, max_batches: int | None = None) -> list[torch.Tensor] | Iterable:
    """Data that can be iterated more than once (statistics, then BatchNorm reset).

    A one-shot iterator is materialised (bounded by ``max_batches``); a re-iterable (list,
    DataLoader) is returned as is. Raises ValueError when there is nothing in it.
    """
    if data is None:
        raise ValueError("data is required here (an iterable of input tensors or (input, label) pairs); got None")
    if iter(data) is data or max_batches is not None:
        batches = list(iter_inputs(data, max_batches))
    else:
        batches = None
    if batches is not None:
        if not batches:
            raise ValueError("data is empty: no batches to collect activation statistics from")
        return batches
    first = next(iter(iter_inputs(data)), None)
    if first is None:
        raise ValueError("data is empty: no batches to collect activation statistics from")
    return data


def first_input(data: Iterable | None) -> torch.Tensor | None:
    """The first input batch of re-iterable ``data`` (what a model without a declared spec is traced on)."""
    if data is None:
        return None
    return next(iter(iter_inputs(data)), None)
