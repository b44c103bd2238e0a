"""Clean accuracy and attack success rate of a model."""
from __future__ import annotations

import torch
from torch import nn

from dimat.attacks.triggers import Trigger


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = model.training
    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            preds.append(model(x[i : i + batch_size].to(device)).argmax(dim=1).cpu())
    model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Share of ``x`` classified as ``y``."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y disagree on the number of samples: {x.shape[0]} vs {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("clean_accuracy needs at least one sample")
    return float((_predict(model, x, batch_size) == y.cpu()).float().mean())


def attack_success_rate(
    model: nn.Module,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    trigger: Trigger,
    target_class: int,
    batch_size: int = 1024,
) -> float:
    """Share of triggered test inputs of non-target classes that the model classifies as ``target_class``."""
    if x_test.shape[0] != y_test.shape[0]:
        raise ValueError(f"x and y disagree on the number of samples: {x_test.shape[0]} vs {y_test.shape[0]}")
    keep = y_test.cpu() != target_class
    if not bool(keep.any()):
        raise ValueError(f"no test samples outside target class {target_class}; ASR is undefined")
    x = trigger(x_test[keep.to(x_test.device)])
    return float((_predict(model, x, batch_size) == target_class).float().mean())
