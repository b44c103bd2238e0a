"""From joined axis variables to a PermutationSpec: closure over reshapes and concatenations, groups, hooks."""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import TYPE_CHECKING

from ..structure import PermutationGroup, PermutationSpec
from .variables import TraceError

if TYPE_CHECKING:
    from .tracer import Tracer


def close(tr: Tracer) -> None:
    """Congruence closure over factorisations and concatenations, then fixedness both ways."""
    v = tr.v
    changed = True
    while changed:
        changed = False
        by_whole: dict[int, tuple[int, int, str]] = {}
        by_parts: dict[tuple[int, int], int] = {}
        for whole, outer, inner, where in tr.factors:
            r = v.find(whole)
            if r in by_whole:
                o2, i2, w2 = by_whole[r]
                if v.size[outer] != v.size[o2]:
                    raise TraceError(f"{where} splits an axis into {v.size[outer]} blocks, {w2} into {v.size[o2]}")
                changed |= v.union(outer, o2, where)
                changed |= v.union(inner, i2, where)
            else:
                by_whole[r] = (outer, inner, where)
            key = (v.find(outer), v.find(inner))
            if key in by_parts:
                changed |= v.union(by_parts[key], whole, where)
            else:
                by_parts[key] = whole
            if v.is_fixed(whole):
                changed |= v.fix(outer, v.fixed[v.find(whole)])
                changed |= v.fix(inner, v.fixed[v.find(whole)])
            elif v.is_fixed(outer) and v.is_fixed(inner):
                changed |= v.fix(whole, v.fixed[v.find(outer)])
        cat_whole: dict[int, tuple[tuple[int, ...], str]] = {}
        cat_parts: dict[tuple[int, ...], int] = {}
        for whole, parts, where in tr.concats:
            r = v.find(whole)
            if r in cat_whole:
                p2, w2 = cat_whole[r]
                if [v.size[p] for p in parts] != [v.size[p] for p in p2]:
                    raise TraceError(f"{where} and {w2} put together the same axis from pieces of different sizes")
                for a, b in zip(parts, p2):
                    changed |= v.union(a, b, where)
            else:
                cat_whole[r] = (parts, where)
            key = tuple(v.find(p) for p in parts)
            if key in cat_parts:
                changed |= v.union(cat_parts[key], whole, where)
            else:
                cat_parts[key] = whole
            if v.is_fixed(whole):
                for p in parts:
                    changed |= v.fix(p, v.fixed[v.find(whole)])
            elif all(v.is_fixed(p) for p in parts):  # single units are fixed from birth
                changed |= v.fix(whole, v.fixed[v.find(parts[0])])


def hook_points(tr: Tracer, root: int) -> list[tuple[str, int, tuple[int, ...]]]:
    """Module outputs carrying ``root`` that reach a weighted layer through shape-only ops.

    Each is ``(module, unit axis, pooled axes)``: the pooled axes are other axes of that output
    that may be permuted themselves (MLP-Mixer's token-mixing hidden units sit beside the
    channels). Their order differs between two models, so they cannot serve as aligned samples;
    activation matching averages over them (a mean is blind to their order).
    """
    v = tr.v
    found, fallback = [], []
    for name, vid, shape_only in tr.module_values:
        t, dims = tr.values.get(vid, (None, []))
        if t is None:
            continue
        hit = [k for k, d in enumerate(dims) if v.find(d) == root]
        if not hit:
            continue
        pooled = tuple(k for k, d in enumerate(dims) if k != hit[0] and v.size[d] > 1 and not v.is_fixed(d))
        fallback.append((name, hit[0], pooled))
        seen, todo, mixes = {vid}, [vid], False
        while todo and not mixes:
            cur = todo.pop()
            for n in tr.consumers.get(cur, []):
                if n.kind == "mix":
                    mixes = True
                    break
                if n.kind == "pass":
                    for o in n.outputs:
                        if o not in seen:
                            seen.add(o)
                            todo.append(o)
        if mixes and not shape_only:
            found.append((name, hit[0], pooled))
    return found or fallback


def build_spec(tr: Tracer) -> PermutationSpec:
    v = tr.v
    axes: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for (key, axis), var in tr.axis_var.items():
        r = v.find(var)
        if v.size[r] > 1 and r not in v.fixed:
            axes[r].append((key, axis))
    factor = {v.find(w): (v.find(o), v.find(i), where) for w, o, i, where in tr.factors}
    concat = {v.find(w): ([v.find(p) for p in parts], where) for w, parts, where in tr.concats}
    roots: list[int] = []  # in order of first appearance
    for r in axes:
        if r in concat and r not in roots:
            for p in concat[r][0]:
                if p not in v.fixed and p not in roots and v.size[p] > 1:
                    roots.append(p)
        if r not in roots:
            roots.append(r)
    names: dict[int, str] = {}
    for r in roots:
        first = axes[r][0] if axes.get(r) else None
        names[r] = f"{first[0]}:{first[1]}" if first else f"units{len(names)}"
    groups, derived = [], []
    for r in roots:
        if r in concat and r in axes:
            parts, where = concat[r]
            spec_parts = []
            for p in parts:
                if p in v.fixed or v.size[p] == 1:
                    spec_parts.append((None, v.size[p]))
                elif p in concat:
                    raise TraceError(f"{where}: a concatenation of concatenations is not supported")
                else:
                    spec_parts.append((names[p], v.size[p]))
            derived.append(PermutationGroup(names[r], v.size[r], tuple(axes[r]), parts=tuple(spec_parts)))
            continue
        heads, head_group = 1, None
        if r in factor:
            o, i, where = factor[r]
            if axes.get(o) or axes.get(i):
                raise TraceError(
                    f"{where} reshapes permuted units together with another axis that carries weights "
                    f"(e.g. channels flattened with positions into a Linear): not supported")
            if o in v.fixed or i in v.fixed:
                which = o if o in v.fixed else i
                raise TraceError(f"{where} splits units into {v.size[o]} heads, but {v.fixed[which]} "
                                 "stops the permutation of heads or of units inside a head: not supported")
            heads, head_group = v.size[o], f"heads@{o}"
        hooks = hook_points(tr, r)
        if not hooks:
            raise TraceError(f"no module output carries the units of '{names[r]}' (axes {axes[r][:3]}); "
                             "compute them inside a module so activation matching can observe them")
        groups.append(PermutationGroup(names[r], v.size[r], tuple(axes.get(r, ())), tuple(h for h, _, _ in hooks),
                                       tuple(d for _, d, _ in hooks), heads=heads, head_group=head_group,
                                       hook_pool=tuple(p for _, _, p in hooks)))
    hg_names: dict[str, str] = {}
    out = []
    for g in groups:
        if g.head_group is not None:
            hg = hg_names.setdefault(g.head_group, f"heads:{g.name}")
            g = dataclasses.replace(g, head_group=hg)
        out.append(g)
    return PermutationSpec(tuple(out + derived))
