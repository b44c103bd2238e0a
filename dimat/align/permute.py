"""Applying permutations to weights: the neighbour is moved into the reference's basis."""
from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from .perms import StateDict, permute_state
from .spec import PermutationSpec, get_spec

__all__ = ["StateDict", "permute_state", "apply_permutation", "invert"]


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
