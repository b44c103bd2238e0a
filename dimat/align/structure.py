"""Permutation structure as data (in the spirit of Git Re-Basin's ``PermutationSpec``).

A *group* is a set of hidden units (neurons, channels) that may be permuted together without
changing the network's function. It lists every (state-dict key, axis) it acts on — weights,
biases, BatchNorm affine parameters and running statistics — and the modules whose outputs carry
its units (on dim 1, or on ``hook_dims``), which is where activation matching looks. Every other
position of a hook's output is a sample, except axes named in ``hook_pool``, which are averaged
over first: axes whose order is itself permuted (and so differs between two models).

``hook_offsets`` says where the units start on that axis when they are a slice of it (the
query units of a fused ``qkv`` projection); ``None`` means the axis is the group's units.

Structured kinds of group:

- *headed* (``heads > 1``): the units are ``heads`` equal blocks (attention heads) and a
  permutation must move whole blocks, with any order of units inside each block, or with the
  order inside kept where ``inner_free`` is False (rotary embeddings rotate pairs of units inside
  a head). Groups naming the same ``head_group`` (a head's query/key units and its value/output
  units) move their blocks by one shared head permutation.
- *derived*: never matched on its own, needs no hooks; its permutation follows from others'.
  ``parts``: the axis is a concatenation of other groups' units (``torch.cat``, or a fused
  projection that ``split``/``chunk``/``unbind`` take apart); its permutation is theirs side by
  side (``None`` marks a segment that is never permuted). ``repeat_of``: the units are
  ``repeats`` copies of each head of a headed group, in (head, copy, unit) order (the query heads
  of grouped-query attention share each key/value head); a permutation of that group moves all
  copies with their head. ``heads_of``: the axis is one entry per head of a head group (a
  per-head table such as a relative position bias); it takes that group's head permutation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn


# a hook named "<module>:in_proj" reads the query/key/value projections an nn.MultiheadAttention
# computes inside its forward (no module outputs them), recomputed from its inputs and in_proj_weight
IN_PROJ = ":in_proj"


def hook_module(hook: str) -> str:
    """The module a hook reads (a ``:in_proj`` hook reads its nn.MultiheadAttention)."""
    return hook[:-len(IN_PROJ)] if hook.endswith(IN_PROJ) else hook


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
    hook_offsets: tuple[int | None, ...] = ()  # per hook, where the units start on its axis; () means the whole axis
    inner_free: bool = True
    repeat_of: str | None = None
    repeats: int = 1
    repeat_block: int = 1
    heads_of: str | None = None

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
        offsets = tuple(None if o is None else int(o) for o in self.hook_offsets) or (None,) * len(self.hooks)
        if len(offsets) != len(self.hooks):
            raise ValueError(f"permutation group '{self.name}': {len(self.hooks)} hooks but {len(offsets)} hook_offsets")
        set_(self, "hook_offsets", offsets)
        if self.repeat_of is not None and (self.repeats < 1 or self.size % self.repeats):
            raise ValueError(f"permutation group '{self.name}': {self.repeats} repeats do not divide its {self.size} units")
        set_(self, "parts", tuple((None if g is None else str(g), int(n)) for g, n in self.parts))
        if self.heads < 1 or self.size % self.heads:
            raise ValueError(f"permutation group '{self.name}': {self.heads} heads do not divide its {self.size} units")
        if self.heads > 1 and self.head_group is None:
            set_(self, "head_group", self.name)
        if self.parts and sum(n for _, n in self.parts) != self.size:
            raise ValueError(f"permutation group '{self.name}': parts {self.parts} do not add up to its size {self.size}")

    @property
    def derived(self) -> bool:
        return bool(self.parts) or self.repeat_of is not None or self.heads_of is not None

    @property
    def hook_points(self) -> tuple[tuple[str, int], ...]:
        return tuple(zip(self.hooks, self.hook_dims))

    @property
    def hook_reads(self) -> tuple[tuple[str, int, tuple[int, ...], int | None, int], ...]:
        """Per hook: (module, unit axis, axes averaged over first, offset of the units or None, units)."""
        return tuple((h, d, p, o, self.size) for h, d, p, o in
                     zip(self.hooks, self.hook_dims, self.hook_pool, self.hook_offsets))


@dataclass(frozen=True)
class PermutationSpec:
    groups: tuple[PermutationGroup, ...]
    _by_name: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate permutation group names in {names}")
        self._by_name.update({g.name: g for g in self.groups})
        heads = {g.head_group: g for g in self.groups if g.heads > 1}
        for g in self.groups:
            if g.repeat_of is not None:
                src = self._by_name.get(g.repeat_of)
                if src is None or src.derived or src.size * g.repeats != g.size:
                    raise ValueError(f"derived group '{g.name}' repeats '{g.repeat_of}', which is no plain group "
                                     f"of {g.size // g.repeats} units")
            if g.heads_of is not None and (g.heads_of not in heads or heads[g.heads_of].heads != g.size):
                raise ValueError(f"derived group '{g.name}' names head group '{g.heads_of}', which has no {g.size} heads")
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
                    if hook_module(h) not in modules:
                        raise ValueError(f"permutation group '{g.name}' hooks module '{h}', which the model does not have")
