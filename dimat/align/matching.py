"""Finding permutations: activation matching (DIMAT) and weight matching (Git Re-Basin)."""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .permute import StateDict
from .spec import PermutationSpec, block_permutation, complete
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


def solve_heads(scores: list[torch.Tensor], heads: int, inner_free: list[bool] | None = None) -> list[torch.Tensor]:
    """Block-structured assignments sharing one head permutation, one per score matrix.

    Head ``a`` of the reference is paired with the other model's head ``b`` by the value of the
    best unit assignment between the two blocks, summed over the groups (query/key and
    value/output units of one attention); inside each paired block the units are then assigned.
    """
    inner: dict[tuple[int, int, int], torch.Tensor] = {}
    value = torch.zeros(heads, heads, dtype=torch.float64)
    free = inner_free if inner_free is not None else [True] * len(scores)
    for k, s in enumerate(scores):
        s = s.detach().to(torch.float64).cpu()
        d = s.shape[0] // heads
        eye = torch.arange(d)
        for a in range(heads):
            for b in range(heads):
                block = s[a * d:(a + 1) * d, b * d:(b + 1) * d]
                p = solve_assignment(block) if free[k] else eye  # a fixed order inside a head: unit to unit
                inner[k, a, b] = p
                value[a, b] += block[eye, p].sum()
    head = solve_assignment(value)
    return [block_permutation(head, [inner[k, a, int(head[a])] for a in range(heads)]) for k in range(len(scores))]


def _solve_units(spec: PermutationSpec, score) -> dict[str, torch.Tensor]:
    """Solve every matched group on ``score(group)``; groups of one head group jointly."""
    perms: dict[str, torch.Tensor] = {}
    heads = spec.head_groups()
    for g in spec.matched:
        if g.name in perms:
            continue
        if g.heads > 1:
            gs = heads[g.head_group]
            for x, p in zip(gs, solve_heads([score(x) for x in gs], g.heads, [x.inner_free for x in gs])):
                perms[x.name] = p
        else:
            perms[g.name] = solve_assignment(score(g))
    return perms


def perms_from_stats(spec: PermutationSpec, stats: Mapping[str, list[CrossStats]]) -> dict[str, torch.Tensor]:
    """One assignment per group on the correlation summed over the group's hook points.

    Activations of the unaligned model already determine every group's match (a permutation
    elsewhere in the network does not change which unit computes what), so groups are
    independent here; solving them in the spec's order (input to output) is the dependency
    order the DIMAT reference code uses. Headed groups move whole heads (:func:`solve_heads`);
    derived groups follow from their parts.
    """
    perms = _solve_units(spec, lambda g: sum(s.correlation() for s in stats[g.name]))
    return complete(spec, perms)


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
    segments = [(key, axis, None) for key, axis in g.axes]
    for d in spec.groups:  # the group's units inside concatenated (derived) axes
        offset = 0
        for part, n in d.parts:
            if part == name:
                segments += [(key, axis, offset) for key, axis in d.axes]
            offset += n
    repeated = [(key, axis, d.repeats, d.repeat_block) for d in spec.groups if d.repeat_of == name
                for key, axis in d.axes]
    for key, axis, offset in segments + [(k, ax, None) for k, ax, _, _ in repeated]:
        wa = a[key].detach().to(torch.float64)
        wb = b[key].detach().to(torch.float64)
        for other_axis, other_group in axes_map[key].items():
            if other_axis != axis:
                wb = wb.index_select(other_axis, perms[other_group])
        if offset is not None:
            wa, wb = wa.narrow(axis, offset, g.size), wb.narrow(axis, offset, g.size)
        reps, d = next(((r, b) for k, ax, r, b in repeated if (k, ax) == (key, axis)), (1, 1))
        if reps > 1:  # (block, copy, unit) along the axis: each copy is a sample of the source's unit
            wa, wb = (w.movedim(axis, 0).reshape(g.size // d, reps, d, -1).transpose(1, 2) for w in (wa, wb))
        wa = wa.movedim(axis, 0).reshape(g.size, -1) if reps == 1 else wa.reshape(g.size, -1)
        wb = wb.movedim(axis, 0).reshape(g.size, -1) if reps == 1 else wb.reshape(g.size, -1)
        total += wa @ wb.T
    return total


def weight_matching(reference: StateDict, other: StateDict, spec: PermutationSpec,
                    max_iter: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    """Data-free alignment: coordinate descent over groups maximising Σ <θ_ref, P(θ_other)>."""
    axes_map = spec.axes_to_groups()
    perms = {g.name: torch.arange(g.size) for g in spec.groups}
    rng = np.random.default_rng(seed)
    heads = spec.head_groups()
    units: list[list[str]] = []  # plain groups alone, a head group's groups together
    for g in spec.matched:
        if g.heads == 1:
            units.append([g.name])
        elif g.name == heads[g.head_group][0].name:
            units.append([x.name for x in heads[g.head_group]])
    for sweep in range(max_iter):
        improved = False
        # the first sweep goes in the spec's order (input to output): a group next to the input
        # is scored on weights whose other axes are never permuted, so it is solved exactly
        # first and each later group sees its neighbours already solved; in random order a
        # planted permutation of a tiny MLP-Mixer was left in a local optimum
        order = range(len(units)) if sweep == 0 else rng.permutation(len(units))
        for idx in order:
            names = units[idx]
            scores = [_group_score(n, spec, axes_map, reference, other, perms) for n in names]
            if spec[names[0]].heads > 1:
                new = solve_heads(scores, spec[names[0]].heads, [spec[n].inner_free for n in names])
            else:
                new = [solve_assignment(scores[0])]
            old_val = sum(s[torch.arange(len(p)), perms[n]].sum() for s, n, p in zip(scores, names, new))
            new_val = sum(s[torch.arange(len(p)), p].sum() for s, p in zip(scores, new))
            if new_val > old_val + 1e-12 * max(1.0, abs(float(old_val))):
                perms.update(zip(names, new))
                perms = complete(spec, perms)
                improved = True
        if not improved:
            break
    return perms
