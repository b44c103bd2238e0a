"""The real effect on real data: aligned midpoints keep accuracy that plain averaging loses.

Two models of the same architecture trained from different seeds on MNIST-1D (generated
offline) or scikit-learn digits (shipped with scikit-learn); nothing is downloaded.
"""
import pytest
import torch
from torch import nn

from dimat.data import load_dataset
from dimat.merge import merge
from dimat.models import build_model


def split(name: str):
    bundle = load_dataset(name)
    return bundle.train.tensors, bundle.test.tensors


def train(model: nn.Module, x, y, seed: int, epochs: int, lr: float) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


CASES = {
    # name: (data set, build kwargs, epochs, lr, endpoint accuracy floor)
    "mlp": ("mnist1d", dict(input_dim=40, hidden=(128, 128)), 40, 0.05, 0.6),
    "vgg11": ("digits", dict(in_channels=1, width=0.25), 15, 0.05, 0.9),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_alignment_keeps_accuracy_that_averaging_loses(name):
    dataset, kwargs, epochs, lr, floor = CASES[name]
    (xtr, ytr), (xte, yte) = split(dataset)
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(train(build_model(name, num_classes=10, **kwargs), xtr, ytr, seed, epochs, lr))
    ends = [accuracy(m, xte, yte) for m in models]
    data = [(xtr[i:i + 200], ytr[i:i + 200]) for i in range(0, len(ytr), 200)]
    averaged = merge(models, [0.5, 0.5], data, alignment=None)
    aligned = merge(models, [0.5, 0.5], data, alignment="activation")
    weight_aligned = merge(models, [0.5, 0.5], data, alignment="weight")
    acc_avg, acc_dimat, acc_wm = (accuracy(m, xte, yte) for m in (averaged, aligned, weight_aligned))
    print(f"\n{name} on {dataset}: endpoints {ends}, average {acc_avg:.3f}, dimat {acc_dimat:.3f}, weight matching {acc_wm:.3f}")
    mean_end = sum(ends) / 2
    assert min(ends) > floor
    # plain averaging loses much; activation matching keeps most of it
    assert mean_end - acc_avg > 0.15
    assert acc_dimat > acc_avg + 0.10
    assert acc_dimat > mean_end - 0.10
