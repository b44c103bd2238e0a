"""Permutation structure as data (in the spirit of Git Re-Basin's ``PermutationSpec``).

A *group* is a set of hidden units (neurons, channels) that may be permuted together without
changing the network's function. It lists every (state-dict key, axis) it acts on — weights,
biases, BatchNorm affine parameters and running statistics — and the modules whose outputs carry
its units on dim 1, which is where activation matching looks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn


@dataclass(frozen=True)
class PermutationGroup:
    name: str
    size: int
    axes: tuple[tuple[str, int], ...]
    hooks: tuple[str, ...] = ()


@dataclass(frozen=True)
class PermutationSpec:
    groups: tuple[PermutationGroup, ...]
    _by_name: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate permutation group names in {names}")
        self._by_name.update({g.name: g for g in self.groups})

    def __getitem__(self, name: str) -> PermutationGroup:
        return self._by_name[name]

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    def axes_to_groups(self) -> dict[str, dict[int, str]]:
        """For each state key, which group permutes which axis."""
        out: dict[str, dict[int, str]] = {}
        for g in self.groups:
            for key, axis in g.axes:
                out.setdefault(key, {})[axis] = g.name
        return out

    def validate(self, state: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Module] | None = None) -> None:
        """Raise ValueError if the spec does not fit ``state`` (and ``modules`` for hooks)."""
        seen: dict[tuple[str, int], str] = {}
        for g in self.groups:
            for key, axis in g.axes:
                if key not in state:
                    raise ValueError(f"permutation group '{g.name}' names '{key}', which the model does not have")
                t = state[key]
                if axis >= t.dim() or t.shape[axis] != g.size:
                    raise ValueError(
                        f"permutation group '{g.name}' (size {g.size}) does not fit axis {axis} of '{key}' "
                        f"with shape {tuple(t.shape)}")
                if (key, axis) in seen:
                    raise ValueError(f"axis {axis} of '{key}' is claimed by groups '{seen[(key, axis)]}' and '{g.name}'")
                seen[(key, axis)] = g.name
            if modules is not None:
                for h in g.hooks:
                    if h not in modules:
                        raise ValueError(f"permutation group '{g.name}' hooks module '{h}', which the model does not have")


def get_spec(model: nn.Module) -> PermutationSpec:
    """The model's declared permutation structure, or a ValueError saying it has none."""
    fn = getattr(model, "permutation_spec", None)
    if fn is None:
        raise ValueError(
            f"{type(model).__name__} declares no permutation structure: give it a "
            "`permutation_spec()` method returning dimat.align.PermutationSpec")
    spec = fn()
    if not isinstance(spec, PermutationSpec):
        raise ValueError(f"{type(model).__name__}.permutation_spec() returned {type(spec).__name__}, not a PermutationSpec")
    return spec


def random_permutations(spec: PermutationSpec, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    return {g.name: torch.randperm(g.size, generator=generator) for g in spec.groups}


def identity_permutations(spec: PermutationSpec) -> dict[str, torch.Tensor]:
    return {g.name: torch.arange(g.size) for g in spec.groups}


class SpecBuilder:
    """Small helper models use to declare their groups: chain layers whose outputs feed the next."""

    def __init__(self) -> None:
        self._groups: list[PermutationGroup] = []

    def add(self, name: str, size: int, axes: list[tuple[str, int]], hooks: list[str] | tuple[str, ...] = ()) -> None:
        self._groups.append(PermutationGroup(name, size, tuple(axes), tuple(hooks)))

    def build(self) -> PermutationSpec:
        return PermutationSpec(tuple(self._groups))


def bn_axes(prefix: str) -> list[tuple[str, int]]:
    """Every per-channel entry of a BatchNorm module, permuted on axis 0."""
    return [(f"{prefix}.{n}", 0) for n in ("weight", "bias", "running_mean", "running_var")]
