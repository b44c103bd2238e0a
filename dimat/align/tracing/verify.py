"""Every derived spec checks itself: a planted permutation of its groups must leave the function unchanged.

A spec the tracer got wrong (an op whose axis rule it misread, a module classified by its class
when its ``forward`` does something else) would otherwise be silently wrong: alignment would
permute weights into a different function. Two forward passes on the example input catch it.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..perms import permute_state, random_permutations
from ..structure import PermutationSpec
from .ops import _tensors
from .variables import TraceError


def _outputs(model: nn.Module, x: Any) -> list[torch.Tensor]:
    out = model(x)
    if hasattr(out, "to_tuple"):  # a transformers ModelOutput: its tensors, in order
        out = out.to_tuple()
    return [t.detach().double() for t in _tensors(out) if t.is_floating_point()]


def _differs(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float) -> float | None:
    """The largest difference relative to the output's scale, or None when within ``rtol``."""
    worst = 0.0
    for u, w in zip(a, b):
        if u.shape != w.shape:
            return float("inf")
        scale = max(float(u.abs().max()) if u.numel() else 0.0, 1e-6)
        worst = max(worst, float((u - w).abs().max()) / scale if u.numel() else 0.0)
    return worst if worst > rtol else None


def _units(spec: PermutationSpec) -> list[list[str]]:
    """Groups planted together: a plain group alone, a head group's groups as one."""
    out, seen = [], set()
    heads = spec.head_groups()
    for g in spec.matched:
        if g.name in seen:
            continue
        names = [x.name for x in heads[g.head_group]] if g.heads > 1 else [g.name]
        seen.update(names)
        out.append(names)
    return out


@torch.no_grad()
def verify_spec(model: nn.Module, spec: PermutationSpec, x: Any, *, rtol: float = 1e-4, seed: int = 0) -> None:
    """Raise :class:`TraceError` naming the group whose planted permutation changes ``model(x)``.

    Args:
        model: the traced model (put in eval mode for the check, then restored).
        spec: the spec derived from it.
        x: the example input it was traced on.
        rtol: allowed largest difference, relative to the largest output magnitude (float error
            of summing in another order is far below it; a wrong axis is far above).
        seed: of the planted permutations.
    """
    if not spec.matched:
        return
    was_training = model.training
    model.eval()
    try:
        ref = _outputs(model, x)
        state = model.state_dict()
        perms = random_permutations(spec, torch.Generator().manual_seed(seed))
        twin = copy.deepcopy(model)

        def planted(only: set[str] | None) -> float | None:
            chosen = perms if only is None else {k: p for k, p in perms.items() if k in only}
            twin.load_state_dict(permute_state(state, spec, chosen))
            return _differs(ref, _outputs(twin, x), rtol)

        if planted(None) is None:
            return
        for names in _units(spec):  # only on failure: which group is it
            derived = {g.name for g in spec.groups if g.derived and any(p in names for p, _ in g.parts)}
            bad = planted(set(names) | derived)
            if bad is not None:
                g = spec[names[0]]
                raise TraceError(
                    f"the derived permutation structure is wrong for group '{g.name}' (axes {list(g.axes[:4])}): "
                    f"permuting it changes the model's output by {bad:.2g} of its scale; the tracer misread an "
                    "operation on these units. Declare permutation_spec() on the model, or pass verify=False "
                    "to derive_spec to keep the spec unchecked")
        raise TraceError("the derived permutation structure is wrong: permuting all groups together changes the "
                         "output, though each alone does not; declare permutation_spec() on the model")
    finally:
        model.train(was_training)
