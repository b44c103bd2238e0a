"""Permutation structure as data (in the spirit of Git Re-Basin's ``PermutationSpec``).

A *group* is a set of hidden units (neurons, channels) that may be permuted together without
changing the network's function. It lists every (state-dict key, axis) it acts on — weights,
biases, BatchNorm affine parameters and running statistics — and the modules whose outputs carry
its units (on dim 1, or on ``hook_dims``), which is where activation matching looks.

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

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "axes", tuple((str(k), int(a)) for k, a in self.axes))
        set_(self, "hooks", tuple(self.hooks))
        dims = tuple(int(d) for d in self.hook_dims) or (1,) * len(self.hooks)
        if len(dims) != len(self.hooks):
            raise ValueError(f"permutation group '{self.name}': {len(self.hooks)} hooks but {len(dims)} hook_dims")
        set_(self, "hook_dims", dims)
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


def get_spec(model: nn.Module, example_input: torch.Tensor | None = None) -> PermutationSpec:
    """The model's declared permutation structure; without one, the structure traced on ``example_input``.

    A derived spec is cached on the model instance (the same object is traced once).
    """
    fn = getattr(model, "permutation_spec", None)
    if fn is None:
        cached = getattr(model, "_dimat_derived_spec", None)
        if cached is not None:
            return cached
        if example_input is None:
            raise ValueError(
                f"{type(model).__name__} declares no permutation structure and no example input was given to "
                "derive one: give it a `permutation_spec()` method, or pass data (the first batch is traced)")
        from .trace import derive_spec
        spec = derive_spec(model, example_input)
        object.__setattr__(model, "_dimat_derived_spec", spec)  # plain attribute, not a submodule or state
        return spec
    spec = fn()
    if not isinstance(spec, PermutationSpec):
        raise ValueError(f"{type(model).__name__}.permutation_spec() returned {type(spec).__name__}, not a PermutationSpec")
    return spec


def block_permutation(head_perm: torch.Tensor, inner: list[torch.Tensor]) -> torch.Tensor:
    """A permutation of ``len(head_perm)`` blocks: block ``i`` takes block ``head_perm[i]``, reordered by ``inner[i]``."""
    d = len(inner[0]) if inner else 0
    return torch.cat([int(h) * d + inner[i] for i, h in enumerate(head_perm.tolist())]) if d else torch.arange(0)


def complete(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``perms`` with every derived group's permutation put together from its parts'."""
    out = dict(perms)
    for g in spec.groups:
        if not g.derived or any(p is not None and p not in out for p, _ in g.parts):
            continue
        pieces, offset = [], 0
        for part, n in g.parts:
            p = torch.arange(n) if part is None else torch.as_tensor(out[part], dtype=torch.long).cpu()
            pieces.append(p + offset)
            offset += n
        out[g.name] = torch.cat(pieces)
    return out


def random_permutations(spec: PermutationSpec, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A random permutation per group (whole heads moved by one draw per head group), derived groups completed."""
    out: dict[str, torch.Tensor] = {}
    head_perm = {name: torch.randperm(gs[0].heads, generator=generator) for name, gs in spec.head_groups().items()}
    for g in spec.matched:
        if g.heads > 1:
            d = g.size // g.heads
            out[g.name] = block_permutation(head_perm[g.head_group],
                                            [torch.randperm(d, generator=generator) for _ in range(g.heads)])
        else:
            out[g.name] = torch.randperm(g.size, generator=generator)
    return complete(spec, out)


def identity_permutations(spec: PermutationSpec) -> dict[str, torch.Tensor]:
    return {g.name: torch.arange(g.size) for g in spec.groups}


class SpecBuilder:
    """Small helper models use to declare their groups: chain layers whose outputs feed the next."""

    def __init__(self) -> None:
        self._groups: list[PermutationGroup] = []

    def add(self, name: str, size: int, axes: list[tuple[str, int]], hooks: list[str] | tuple[str, ...] = (),
            **kw) -> None:
        self._groups.append(PermutationGroup(name, size, tuple(axes), tuple(hooks), **kw))

    def build(self) -> PermutationSpec:
        return PermutationSpec(tuple(self._groups))


def bn_axes(prefix: str) -> list[tuple[str, int]]:
    """Every per-channel entry of a BatchNorm module, permuted on axis 0."""
    return [(f"{prefix}.{n}", 0) for n in ("weight", "bias", "running_mean", "running_var")]
