"""Permutation structure as data (in the spirit of Git Re-Basin's ``PermutationSpec``).

A *group* is a set of hidden units (neurons, channels) that may be permuted together without
changing the network's function. It lists every (state-dict key, axis) it acts on — weights,
biases, BatchNorm affine parameters and running statistics — and the modules whose outputs carry
its units (on dim 1, or on ``hook_dims``), which is where activation matching looks. Every other
position of a hook's output is a sample, except axes named in ``hook_pool``, which are averaged
over first: axes whose order is itself permuted (and so differs between two models).

Two structured kinds of group:

- *headed* (``heads > 1``): the units are ``heads`` equal blocks (attention heads) and a
  permutation must move whole blocks, with any order of units inside each block. Groups naming
  the same ``head_group`` (a head's query/key units and its value/output units) move their blocks
  by one shared head permutation.
- *derived* (``parts``): the axis is a concatenation of other groups' units (``torch.cat``); its
  permutation is theirs side by side (``None`` marks a segment that is never permuted). It needs
  no hooks and is never matched on its own.
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
    hook_dims: tuple[int, ...] = ()  # per hook, the output dim carrying the units; () means dim 1 for all
    heads: int = 1
    head_group: str | None = None
    parts: tuple[tuple[str | None, int], ...] = ()
    hook_pool: tuple[tuple[int, ...], ...] = ()  # per hook, other axes averaged over (); () means none

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "axes", tuple((str(k), int(a)) for k, a in self.axes))
        set_(self, "hooks", tuple(self.hooks))
        dims = tuple(int(d) for d in self.hook_dims) or (1,) * len(self.hooks)
        if len(dims) != len(self.hooks):
            raise ValueError(f"permutation group '{self.name}': {len(self.hooks)} hooks but {len(dims)} hook_dims")
        set_(self, "hook_dims", dims)
        pool = tuple(tuple(int(d) for d in p) for p in self.hook_pool) or ((),) * len(self.hooks)
        if len(pool) != len(self.hooks):
            raise ValueError(f"permutation group '{self.name}': {len(self.hooks)} hooks but {len(pool)} hook_pool entries")
        set_(self, "hook_pool", pool)
        set_(self, "parts", tuple((None if g is None else str(g), int(n)) for g, n in self.parts))
        if self.heads < 1 or self.size % self.heads:
            raise ValueError(f"permutation group '{self.name}': {self.heads} heads do not divide its {self.size} units")
        if self.heads > 1 and self.head_group is None:
            set_(self, "head_group", self.name)
        if self.parts and sum(n for _, n in self.parts) != self.size:
            raise ValueError(f"permutation group '{self.name}': parts {self.parts} do not add up to its size {self.size}")

    @property
    def derived(self) -> bool:
        return bool(self.parts)

    @property
    def hook_points(self) -> tuple[tuple[str, int], ...]:
        return tuple(zip(self.hooks, self.hook_dims))

    @property
    def hook_reads(self) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
        """Per hook: (module, unit axis, axes averaged over before every position counts as a sample)."""
        return tuple(zip(self.hooks, self.hook_dims, self.hook_pool))


@dataclass(frozen=True)
class PermutationSpec:
    groups: tuple[PermutationGroup, ...]
    _by_name: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate permutation group names in {names}")
        self._by_name.update({g.name: g for g in self.groups})
        for g in self.groups:
            for part, n in g.parts:
                if part is None:
                    continue
                if part not in self._by_name or self._by_name[part].derived:
                    raise ValueError(f"derived group '{g.name}' names part '{part}', which is no plain group")
                if self._by_name[part].size != n:
                    raise ValueError(f"derived group '{g.name}': part '{part}' has {self._by_name[part].size} units, not {n}")

    def __getitem__(self, name: str) -> PermutationGroup:
        return self._by_name[name]

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    @property
    def matched(self) -> list[PermutationGroup]:
        """The groups a permutation is found for (derived groups follow from their parts)."""
        return [g for g in self.groups if not g.derived]

    def head_groups(self) -> dict[str, list[PermutationGroup]]:
        out: dict[str, list[PermutationGroup]] = {}
        for g in self.groups:
            if g.heads > 1:
                out.setdefault(g.head_group, []).append(g)
        for name, gs in out.items():
            if len({g.heads for g in gs}) != 1:
                raise ValueError(f"head group '{name}' joins groups with different head counts")
        return out

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
