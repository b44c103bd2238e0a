"""A model's permutation structure: declared (``permutation_spec()``) or traced, and permutations for it.

The structure itself (groups, headed and derived groups, specs) is defined in
:mod:`dimat.align.structure`; its names are re-exported here.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .structure import PermutationGroup, PermutationSpec

__all__ = ["PermutationGroup", "PermutationSpec", "get_spec", "block_permutation", "complete",
           "random_permutations", "identity_permutations", "SpecBuilder", "bn_axes"]


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
