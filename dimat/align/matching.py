"""Finding permutations: activation matching (DIMAT) and weight matching (Git Re-Basin)."""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .permute import StateDict
from .spec import PermutationSpec
from .stats import CrossStats, collect_cross_stats


def solve_assignment(score: torch.Tensor) -> torch.Tensor:
    """``perm[i]`` = the other unit assigned to reference unit ``i``, maximising total score."""
    s = score.detach().to(torch.float64).cpu().numpy()
    if not np.isfinite(s).all():
        raise ValueError("assignment scores contain NaN or Inf")
    rows, cols = linear_sum_assignment(s, maximize=True)
    perm = np.empty(s.shape[0], dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


def perms_from_stats(spec: PermutationSpec, stats: Mapping[str, list[CrossStats]]) -> dict[str, torch.Tensor]:
    """One assignment per group on the correlation summed over the group's hook points.

    Activations of the unaligned model already determine every group's match (a permutation
    elsewhere in the network does not change which unit computes what), so groups are
    independent here; solving them in the spec's order (input to output) is the dependency
    order the DIMAT reference code uses.
    """
    perms = {}
    for g in spec.groups:
        corr = sum(s.correlation() for s in stats[g.name])
        perms[g.name] = solve_assignment(corr)
    return perms


def match_activations(reference: nn.Module, others: list[nn.Module], data: Iterable,
                      spec: PermutationSpec, max_batches: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Permutations mapping each of ``others`` into ``reference``'s basis by activation correlation."""
    all_stats = collect_cross_stats(reference, others, data, spec, max_batches)
    return [perms_from_stats(spec, s) for s in all_stats]


def _group_score(name: str, spec: PermutationSpec, axes_map: dict[str, dict[int, str]],
                 a: StateDict, b: StateDict, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the group's axes of <A_axis, B_axis permuted on its other axes>, as a size×size matrix."""
    g = spec[name]
    total = torch.zeros(g.size, g.size, dtype=torch.float64)
    for key, axis in g.axes:
        wa = a[key].detach().to(torch.float64)
        wb = b[key].detach().to(torch.float64)
        for other_axis, other_group in axes_map[key].items():
            if other_axis != axis:
                wb = wb.index_select(other_axis, perms[other_group])
        wa = wa.movedim(axis, 0).reshape(g.size, -1)
        wb = wb.movedim(axis, 0).reshape(g.size, -1)
        total += wa @ wb.T
    return total


def weight_matching(reference: StateDict, other: StateDict, spec: PermutationSpec,
                    max_iter: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    """Data-free alignment: coordinate descent over groups maximising Σ <θ_ref, P(θ_other)>."""
    axes_map = spec.axes_to_groups()
    perms = {g.name: torch.arange(g.size) for g in spec.groups}
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        improved = False
        for idx in rng.permutation(len(spec.groups)):
            name = spec.groups[idx].name
            score = _group_score(name, spec, axes_map, reference, other, perms)
            new = solve_assignment(score)
            eye = torch.arange(len(new))
            old_val = score[eye, perms[name]].sum()
            new_val = score[eye, new].sum()
            if new_val > old_val + 1e-12 * max(1.0, abs(float(old_val))):
                perms[name] = new
                improved = True
        if not improved:
            break
    return perms
