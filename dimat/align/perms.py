"""Permutations of a spec's groups, and moving a state dict by them: the layer below specs and tracing.

Nothing here looks up or derives a model's spec, so the tracer's own check (which plants
permutations) can use it without importing the code that calls the tracer.
"""
from __future__ import annotations

from typing import Mapping

import torch

from dimat.typing import StateDict

from .structure import PermutationSpec


def block_permutation(head_perm: torch.Tensor, inner: list[torch.Tensor]) -> torch.Tensor:
    """A permutation of ``len(head_perm)`` blocks: block ``i`` takes block ``head_perm[i]``, reordered by ``inner[i]``."""
    d = len(inner[0]) if inner else 0
    return torch.cat([int(h) * d + inner[i] for i, h in enumerate(head_perm.tolist())]) if d else torch.arange(0)


def head_order(perm: torch.Tensor, heads: int) -> torch.Tensor:
    """The permutation of whole heads inside a block permutation of ``heads`` blocks."""
    d = perm.numel() // heads
    return perm.reshape(heads, d)[:, 0] // d


def _repeated(perm: torch.Tensor, block: int, repeats: int) -> torch.Tensor:
    """A permutation of blocks of ``block`` units, on ``repeats`` copies of each block, laid out (block, copy, unit)."""
    blocks = perm.reshape(-1, block)
    head = blocks[:, 0] // block
    inner = blocks - (head * block)[:, None]
    copy = torch.arange(repeats)
    return ((head[:, None, None] * repeats + copy[None, :, None]) * block + inner[:, None, :]).reshape(-1)


def complete(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``perms`` with every derived group's permutation put together from its parts'."""
    out = dict(perms)
    for g in spec.groups:
        if g.repeat_of is not None:
            if g.repeat_of in out:
                out[g.name] = _repeated(torch.as_tensor(out[g.repeat_of]).cpu(), g.repeat_block, g.repeats)
            continue
        if g.heads_of is not None:
            member = next((m for m in spec.groups if m.heads > 1 and m.head_group == g.heads_of and m.name in out), None)
            if member is not None:
                out[g.name] = head_order(torch.as_tensor(out[member.name]).cpu(), member.heads)
            continue
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
            inner = [torch.randperm(d, generator=generator) if g.inner_free else torch.arange(d)
                     for _ in range(g.heads)]
            out[g.name] = block_permutation(head_perm[g.head_group], inner)
        else:
            out[g.name] = torch.randperm(g.size, generator=generator)
    return complete(spec, out)


def identity_permutations(spec: PermutationSpec) -> dict[str, torch.Tensor]:
    return {g.name: torch.arange(g.size) for g in spec.groups}


def permute_state(state: Mapping[str, torch.Tensor], spec: PermutationSpec,
                  perms: Mapping[str, torch.Tensor], *, partial: bool = False) -> StateDict:
    """Return a new state dict with ``new[key].index_select(axis, perm)`` for every group axis.

    ``perms[g][i]`` is the unit of ``state`` that goes to position ``i``. A derived group's
    permutation is put together from its parts' (see :func:`dimat.align.spec.complete`).
    ``partial=True`` permutes the entries ``state`` has and skips the spec's other keys (e.g.
    optimizer buffers of parameters).
    """
    out = dict(state)
    perms = complete(spec, perms)
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
