"""A model's permutation structure: declared (``permutation_spec()``) or traced, and permutations for it.

The structure itself (groups, headed and derived groups, specs) is defined in
:mod:`dimat.align.structure`; its names are re-exported here.
"""
from __future__ import annotations


import torch
from torch import nn

from .perms import block_permutation, complete, identity_permutations, random_permutations
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
