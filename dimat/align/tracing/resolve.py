"""From joined axis variables to a PermutationSpec: closure over reshapes and concatenations, groups, hooks."""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import TYPE_CHECKING

from ..structure import IN_PROJ, PermutationGroup, PermutationSpec
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


def _slice_hooks(tr: Tracer, r: int, concat: dict, names: dict) -> list[tuple[str, int, tuple[int, ...], int]]:
    """Hooks for units that are a slice of a module's output (a fused projection's q, k or v)."""
    v = tr.v
    for w, (parts, _) in concat.items():
        if r in parts:
            offset = sum(v.size[p] for p in parts[:parts.index(r)])
            found = [(h, d, pool, offset) for h, d, pool in hook_points(tr, w)]
            if not found and w in tr.projections:  # computed inside nn.MultiheadAttention: recomputed there
                found = [(f"{tr.projections[w]}{IN_PROJ}", -1, (), offset)]
            return found
    return []


def _live(tr: Tracer, roots: set[int], factor: dict, concat: dict) -> set[int]:
    """Roots that a permutation may move: groups, and the factors and pieces of their axes."""
    out, todo = set(), list(roots)
    while todo:
        r = todo.pop()
        if r in out or r in tr.v.fixed:
            continue
        out.add(r)
        if r in factor:
            todo += [factor[r][0], factor[r][1]]
        if r in concat:
            todo += concat[r][0]
    return out


def build_spec(tr: Tracer) -> PermutationSpec:
    """The groups of the closed variables: every class naming weight axes, with its hooks and structure."""
    v = tr.v
    axes: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for (key, axis), var in tr.axis_var.items():
        r = v.find(var)
        if v.size[r] > 1 and r not in v.fixed:
            axes[r].append((key, axis))
    factor = {v.find(w): (v.find(o), v.find(i), where) for w, o, i, where in tr.factors}
    concat = {v.find(w): ([v.find(p) for p in parts], where) for w, parts, where in tr.concats}
    outer_of = defaultdict(set)  # head variable -> the wholes it is the outer factor of
    for w, (o, _, _) in factor.items():
        outer_of[o].add(w)
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
    for w, (parts, _) in concat.items():  # a slice of a fused axis is named after it
        if w in axes:
            offset = 0
            for p in parts:
                if names.get(p, "").startswith("units"):
                    names[p] = f"{names[w]}[{offset}:{offset + v.size[p]}]"
                offset += v.size[p]

    def head_var(r: int) -> int | None:
        """The head axis of a headed whole ``r``: its outer factor, when that is no plain group."""
        if r not in factor:
            return None
        o, i, _ = factor[r]
        if o in axes and len(outer_of[o]) < 2 and i in v.fixed:
            return None  # channels flattened with fixed positions (a Conv into a Linear)
        return o

    heads_tables = {head_var(r) for r in roots if head_var(r) is not None and head_var(r) in axes}
    groups, derived = [], []
    for r in roots:
        if r in heads_tables:  # a per-head table (a relative position bias): moves with the heads
            derived.append(PermutationGroup(names[r], v.size[r], tuple(axes[r]), heads_of=f"heads@{r}"))
            continue
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
        heads, head_group, inner_free = 1, None, True
        if r in factor:
            o, i, where = factor[r]
            if head_var(r) is None:
                raise TraceError(
                    f"{where} flattens the units of '{names[o]}' together with {v.size[i]} positions "
                    f"({v.fixed[i]}) into the input of '{names[r]}' (e.g. a Conv's channels into a Linear): "
                    "not supported; pool the positions first, or declare permutation_spec() on the model")
            if axes.get(i):
                raise TraceError(
                    f"{where} splits the units of '{names[r]}' into {v.size[o]} blocks of {v.size[i]}, and the "
                    f"position inside a block carries weights of its own ({axes[i][:2]}): not supported; "
                    "declare permutation_spec() on the model")
            if o in factor and o not in v.fixed:  # grouped-query attention: (kv heads, copies) of each
                o2, copies, _ = factor[o]
                src = next((s for s in roots if s in factor and factor[s][0] == o2 and factor[s][1] == i), None)
                if src is None or o2 in v.fixed:
                    raise TraceError(f"{where}: query heads grouped as {v.size[o2]} key/value head(s) x "
                                     f"{v.size[copies]} copies, and no key/value projection is split into those "
                                     f"{v.size[o2]} heads (multi-query attention, a single key/value head, is not "
                                     "supported): declare permutation_spec() on the model")
                derived.append(PermutationGroup(names[r], v.size[r], tuple(axes.get(r, ())), repeat_of=names[src],
                                                repeats=v.size[copies], repeat_block=v.size[i]))
                continue
            if o in v.fixed:
                raise TraceError(f"{where} splits the units of '{names[r]}' into {v.size[o]} heads, but "
                                 f"{v.fixed[o]} stops the permutation of heads: not supported")
            heads, head_group, inner_free = v.size[o], f"heads@{o}", i not in v.fixed
        hooks = [(h, d, pool, None) for h, d, pool in hook_points(tr, r)] or _slice_hooks(tr, r, concat, names)
        # a group no module output carries can still be weight-matched; activation matching names it
        groups.append(PermutationGroup(names[r], v.size[r], tuple(axes.get(r, ())), tuple(h[0] for h in hooks),
                                       tuple(h[1] for h in hooks), heads=heads, head_group=head_group,
                                       hook_pool=tuple(h[2] for h in hooks), hook_offsets=tuple(h[3] for h in hooks),
                                       inner_free=inner_free))
    hg_names: dict[str, str] = {}
    out = []
    for g in groups:
        if g.head_group is not None:
            hg = hg_names.setdefault(g.head_group, f"heads:{g.name}")
            g = dataclasses.replace(g, head_group=hg)
        out.append(g)
    derived = [dataclasses.replace(g, heads_of=hg_names[g.heads_of]) if g.heads_of else g for g in derived]
    live = _live(tr, set(roots), factor, concat)
    bad = [where for where, vars_ in tr.deferred if any(v.find(x) in live for x in vars_)]
    if bad:
        raise unknown_ops(tr, bad)
    return PermutationSpec(tuple(out + derived))


def unknown_ops(tr: Tracer, wheres: list[str]) -> TraceError:
    """One error naming the operations (and their modules) that the tracer cannot see through."""
    seen = list(dict.fromkeys(wheres))
    more = f" (and {len(seen) - 3} more)" if len(seen) > 3 else ""
    return TraceError(f"cannot derive the permutation structure of {type(tr.model).__name__}: "
                      f"{'; '.join(seen[:3])}{more} is not something the tracer can see through; "
                      "declare permutation_spec() on the model, or write that step with supported layers")
