"""Applying permutations to weights: the neighbour is moved into the reference's basis."""
from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from .spec import PermutationSpec, get_spec

StateDict = dict[str, torch.Tensor]


def permute_state(state: Mapping[str, torch.Tensor], spec: PermutationSpec,
                  perms: Mapping[str, torch.Tensor], *, partial: bool = False) -> StateDict:
    """Return a new state dict with ``new[key].index_select(axis, perm)`` for every group axis.

    ``perms[g][i]`` is the unit of ``state`` that goes to position ``i``. ``partial=True`` permutes
    the entries ``state`` has and skips the spec's other keys (e.g. optimizer buffers of parameters).
    """
    out = dict(state)
    for g in spec.groups:
        perm = perms.get(g.name)
        if perm is None:
            continue
        perm = torch.as_tensor(perm, dtype=torch.long)
        if perm.numel() != g.size:
            raise ValueError(f"permutation for group '{g.name}' has {perm.numel()} entries, expected {g.size}")
        for key, axis in g.axes:
            if partial and key not in out:
                continue
            t = out[key]
            out[key] = t.index_select(axis, perm.to(t.device))
    return out


def apply_permutation(model: nn.Module, perms: Mapping[str, torch.Tensor],
                      spec: PermutationSpec | None = None) -> nn.Module:
    """A copy of ``model`` with its units permuted; functionally identical to ``model``."""
    spec = spec or get_spec(model)
    new = copy.deepcopy(model)
    new.load_state_dict(permute_state(model.state_dict(), spec, perms))
    return new


def invert(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv
