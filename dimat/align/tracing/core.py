"""The tracer's core: one axis variable per tensor axis, broadcasting, reshapes, and dispatch by op name."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .ops import (_ARG, _CREATE, _ELEMENTWISE, _EQUIVARIANT, _FIRST_ONLY, _INDEXED, _META, _MIX_FUNCS, _POOL_FUNCS,
                  _REDUCE, _RESHAPE, _REORDER, _TRI, _norm_dim, _op_name, _tensors)
from .variables import TraceError, _Vars


class _Node:
    __slots__ = ("kind", "label", "inputs", "outputs")

    def __init__(self, kind: str, label: str, inputs: list[int], outputs: list[int]) -> None:
        self.kind, self.label, self.inputs, self.outputs = kind, label, inputs, outputs


class TracerCore(TorchFunctionMode):
    """Axis variables for every tensor the model computes; joins them by the ops recorded."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.modules = dict(model.named_modules())
        self.v = _Vars()
        self.values: dict[int, tuple[torch.Tensor, list[int]]] = {}
        self.keep: list[torch.Tensor] = []
        self.param_keys: dict[int, list[str]] = defaultdict(list)
        for key, t in model.state_dict(keep_vars=True).items():
            if isinstance(t, torch.Tensor):
                self.param_keys[id(t)].append(key)
        self.axis_var: dict[tuple[str, int], int] = {}
        self.depth = 0
        self.stack: list[str] = []
        self.nodes: list[_Node] = []
        self.consumers: dict[int, list[_Node]] = defaultdict(list)
        self.module_values: list[tuple[str, int, bool]] = []  # (module, value id, shape-only): innermost first
        self.produced_by_module: set[int] = set()
        self.factors: list[tuple[int, int, int, str]] = []   # (whole, outer, inner, where)
        self.concats: list[tuple[int, tuple[int, ...], str]] = []  # (whole, parts, where)
        self.unknown: list[str] = []
        self.projections: dict[int, str] = {}  # fused in-projection axis -> its nn.MultiheadAttention
        self.deferred: list[tuple[str, list[int]]] = []  # unknown ops: (where, axis variables of their inputs)
        self.input_ids: set[int] = set()

    # ---- naming
    def where(self) -> str:
        name = self.stack[-1] if self.stack else ""
        mod = self.modules.get(name) if name else self.model
        return f"module '{name or '<root>'}' ({type(mod).__name__})"

    # ---- values
    def dims(self, t: torch.Tensor) -> list[int]:
        rec = self.values.get(id(t))
        if rec is not None and rec[0] is t:
            return rec[1]
        keys = self.param_keys.get(id(t))
        if keys:
            dims = []
            for axis, n in enumerate(t.shape):
                vs = [self.axis(k, axis, n) for k in keys]
                for other in vs[1:]:
                    self.v.union(vs[0], other, f"tied weights {keys}")
                dims.append(vs[0])
            self.set(t, dims)
            return dims
        dims = [self.v.new(n, None if n == 1 else f"a tensor made outside the traced inputs, used in {self.where()}")
                for n in t.shape]
        self.set(t, dims)
        return dims

    def axis(self, key: str, axis: int, n: int) -> int:
        if (key, axis) not in self.axis_var:
            self.axis_var[(key, axis)] = self.v.new(n)
        return self.axis_var[(key, axis)]

    def param_axis(self, t: torch.Tensor | None, axis: int) -> int | None:
        return None if t is None else self.dims(t)[axis]

    def set(self, t: torch.Tensor, dims: list[int]) -> None:
        if len(dims) != t.dim():
            raise TraceError(f"internal: {len(dims)} axis variables for a {t.dim()}-d tensor")
        self.values[id(t)] = (t, list(dims))
        self.keep.append(t)

    def fresh(self, t: torch.Tensor, reason: str | None) -> list[int]:
        return [self.v.new(n, reason if n > 1 else None) for n in t.shape]

    def join(self, a: int, b: int, where: str) -> None:
        self.v.union(a, b, where)

    def node(self, kind: str, label: str, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        n = _Node(kind, label, [id(t) for t in ins], [id(t) for t in outs])
        self.nodes.append(n)
        for i in n.inputs:
            self.consumers[i].append(n)

    # ---- broadcasting
    def broadcast(self, tensors: list[torch.Tensor], out: torch.Tensor, where: str) -> list[int]:
        nd = out.dim()
        result: list[int | None] = [None] * nd
        for t in tensors:
            dims = self.dims(t)
            off = nd - t.dim()
            for i, var in enumerate(dims):
                if t.shape[i] == 1 and out.shape[off + i] != 1:
                    continue
                j = off + i
                if result[j] is None:
                    result[j] = var
                else:
                    self.join(result[j], var, where)
        return [r if r is not None else self.v.new(out.shape[i]) for i, r in enumerate(result)]

    # ---- reshapes
    def split(self, var: int, sizes: list[int], where: str) -> list[int]:
        if len(sizes) == 1:
            return [var]
        root = self.v.find(var)
        for whole, outer, inner, _ in self.factors:
            if self.v.find(whole) == root and self.v.size[outer] == sizes[0]:
                return [outer, *self.split(inner, sizes[1:], where)]
        if self.v.is_fixed(var):
            return [self.v.new(s, "a fixed axis reshaped") for s in sizes]
        outer = self.v.new(sizes[0])
        inner = self.v.new(math.prod(sizes[1:]))
        self.factors.append((var, outer, inner, where))
        return [outer, *self.split(inner, sizes[1:], where)]

    def outer_of(self, var: int) -> tuple[int, int] | None:
        """``(whole, inner)`` of a factorisation whose outer factor is ``var``, if any."""
        r = self.v.find(var)
        for whole, outer, inner, _ in self.factors:
            if self.v.find(outer) == r:
                return whole, inner
        return None

    def copy_factors(self, root: int, copy: dict[int, int], where: str) -> int:
        """A fresh variable like ``root``, with fresh copies of its factorisation; ``copy`` maps old roots to new."""
        r = self.v.find(root)
        if r in copy:
            return copy[r]
        new = self.v.new(self.v.size[r], self.v.fixed.get(r))
        copy[r] = new
        for whole, outer, inner, _ in list(self.factors):
            if self.v.find(whole) == r:
                o = self.copy_factors(outer, copy, where)
                i = self.copy_factors(inner, copy, where)
                self.factors.append((new, o, i, where))
                break
        return new

    def merge(self, vars_: list[int], where: str) -> int:
        if len(vars_) == 1:
            return vars_[0]
        outer, inner = vars_[0], self.merge(vars_[1:], where)
        key = (self.v.find(outer), self.v.find(inner))
        for whole, o, i, _ in self.factors:
            if (self.v.find(o), self.v.find(i)) == key:
                return whole
        if self.v.is_fixed(outer) and self.v.is_fixed(inner):
            return self.v.new(self.v.size[outer] * self.v.size[inner], "a merge of fixed axes")
        whole = self.v.new(self.v.size[outer] * self.v.size[inner])
        self.factors.append((whole, outer, inner, where))
        return whole

    def reshape(self, x: torch.Tensor, out: torch.Tensor, where: str) -> list[int]:
        dims = self.dims(x)
        ishape, oshape = list(x.shape), list(out.shape)
        ii = [k for k, s in enumerate(ishape) if s != 1]
        oo = [k for k, s in enumerate(oshape) if s != 1]
        result: list[int | None] = [None] * len(oshape)
        i = j = 0
        while i < len(ii) and j < len(oo):
            gi, gj = [ii[i]], [oo[j]]
            pi, pj = ishape[ii[i]], oshape[oo[j]]
            i, j = i + 1, j + 1
            while pi != pj:
                if pi < pj:
                    gi.append(ii[i])
                    pi *= ishape[ii[i]]
                    i += 1
                else:
                    gj.append(oo[j])
                    pj *= oshape[oo[j]]
                    j += 1
            if len(gi) == 1:
                for k, var in zip(gj, self.split(dims[gi[0]], [oshape[k] for k in gj], where)):
                    result[k] = var
            elif len(gj) == 1:
                result[gj[0]] = self.merge([dims[k] for k in gi], where)
            else:
                for k in gi:
                    self.v.fix(dims[k], f"an axis regrouped by {where}")
                for k in gj:
                    result[k] = self.v.new(oshape[k], f"an axis regrouped by {where}")
        return [r if r is not None else self.v.new(oshape[k]) for k, r in enumerate(result)]

    # ---- recording a function call
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            self.record(func, args, kwargs, out)
        return out

    def record(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        name = _op_name(func)
        outs = _tensors(out)
        if name in _META or not outs:
            return
        where = f"op '{name}' in {self.where()}"
        ins = _tensors(args) + _tensors(kwargs)
        self.node("mix" if name in _MIX_FUNCS else "pass", where, ins, outs)
        handler = getattr(self, f"_f_{name}", None)
        if handler is not None:
            handler(args, kwargs, out, where)
        elif name.lstrip("_") in _POOL_FUNCS and isinstance(out, torch.Tensor):
            self._spatial(args[0], out, where)
        elif name in _ELEMENTWISE:
            self.set(out, self.broadcast(ins, out, where))
        elif name in _FIRST_ONLY:
            self.set(out, list(self.dims(args[0])))
        elif name in _EQUIVARIANT:
            self.set(out, list(self.dims(args[0])))
        elif name in _CREATE:
            for t in outs:
                self.set(t, self.fresh(t, f"a tensor made by {where}"))
        elif name in _REDUCE:
            self._reduce(args, kwargs, out, where)
        elif name in _INDEXED:
            self._maxmin(args, kwargs, out, where)
        elif name in _ARG:
            x = args[0]
            for var in self.dims(x):
                self.v.fix(var, f"the axis {where} works along")
            for t in outs:
                self.set(t, self.fresh(t, f"the result of {where}"))
        elif name in _TRI:
            x = args[0]
            d = self.dims(x)
            for var in d[-2:]:
                self.v.fix(var, f"the axes {where} works on")
            self.set(out, list(d))
        elif name in _RESHAPE:
            self.set(out, self.reshape(args[0], out, where))
        elif name in _REORDER:
            self._reorder(name, args, kwargs, out, where)
        else:
            # an op on index or mask tensors only (torch.all over a mask, gather of position ids)
            # cannot move units: it is an error only if one of its inputs' axes may be permuted,
            # which is known after the closure (resolve.check_deferred)
            self.deferred.append((where, [var for t in ins for var in self.dims(t)]))
            for t in outs:
                self.set(t, self.fresh(t, f"the result of {where}"))

    # ---- specific functions
    def _reduce(self, args, kwargs, out, where):
        x = args[0]
        dims = self.dims(x)
        dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], bool) else None)
        if isinstance(out, torch.Tensor) and out.dim() == 0 or dim is None:
            self.set(out, self.fresh(out, None))
            return
        red = {_norm_dim(d, x.dim()) for d in ((dim,) if isinstance(dim, int) else dim)}
        keep = [v for k, v in enumerate(dims) if k not in red]
        if out.dim() == x.dim():  # keepdim
            keep = [self.v.new(1) if k in red else v for k, v in enumerate(dims)]
        self.set(out, keep)

    def _maxmin(self, args, kwargs, out, where):
        ts = [a for a in args if isinstance(a, torch.Tensor)]
        if len(ts) == 2:  # elementwise max/min of two tensors
            self.set(out, self.broadcast(ts, out, where))
            return
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        x = args[0]
        if dim is None:
            self.set(out, self.fresh(out, None))
            return
        d = _norm_dim(int(dim), x.dim())
        self.v.fix(self.dims(x)[d], f"the axis {where} takes indices along")
        keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        rest = [self.v.new(1) if (k == d) else v for k, v in enumerate(self.dims(x)) if keepdim or k != d]
        for t in _tensors(out):
            self.set(t, list(rest))

    def _reorder(self, name, args, kwargs, out, where):
        x = args[0]
        dims = self.dims(x)
        n = x.dim()
        if name in ("transpose", "swapaxes", "swapdims"):
            a = _norm_dim(int(kwargs.get("dim0", args[1] if len(args) > 1 else 0)), n)
            b = _norm_dim(int(kwargs.get("dim1", args[2] if len(args) > 2 else 1)), n)
            new = list(dims)
            new[a], new[b] = new[b], new[a]
        elif name == "T":
            new = list(reversed(dims))
        elif name in ("t", "mT"):
            new = list(dims)
            if n >= 2:
                new[-1], new[-2] = new[-2], new[-1]
        elif name == "permute":
            order = kwargs.get("dims", args[1:] if len(args) > 1 else ())
            if len(order) == 1 and isinstance(order[0], (tuple, list, torch.Size)):
                order = order[0]
            new = [dims[_norm_dim(int(k), n)] for k in order]
        else:  # movedim
            src = kwargs.get("source", args[1] if len(args) > 1 else None)
            dst = kwargs.get("destination", args[2] if len(args) > 2 else None)
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            src = [_norm_dim(s, n) for s in src]
            dst = [_norm_dim(s, n) for s in dst]
            rest = iter([dims[k] for k in range(n) if k not in src])
            placed = dict(zip(dst, [dims[s] for s in src]))
            new = [placed[k] if k in placed else next(rest) for k in range(n)]
        self.set(out, new)
