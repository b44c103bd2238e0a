"""Deriving a model's permutation structure by running it once: ``derive_spec(model, example_input)``.

The model runs on the example input under a ``TorchFunctionMode`` and forward hooks, so Python
control flow (shape checks, loops, optional branches) is simply executed; every torch function and
every known leaf module it calls is recorded. Each axis of each tensor gets a variable; the
recorded operations join variables in a union-find (PLeaS's idea, over ``torch.fx`` there):

- a Linear/Conv joins its input's feature axis with its weight's input axis, and its output axis
  is its weight's output axis (and bias); BatchNorm/LayerNorm/GroupNorm join their parameters and
  running statistics with the axis they normalise; elementwise ops (activations, residual ``+``,
  gating ``*``) join the axes they broadcast together;
- ``torch.cat`` makes a *derived* variable whose units are its inputs' side by side;
- a reshape that splits one axis into (heads, head_dim) gives that axis a *factorisation*:
  attention then joins the head axes of query, key and value (batched matmul) and the head_dim of
  query and key (their contraction). An axis with a factorisation whose factors carry no weights
  of their own becomes a *headed* group: whole heads move together, with free order inside.
- a variable that reaches the model input or output, an axis indexed, sliced or sorted, or a
  tensor made inside ``forward`` is *fixed*: its permutation must stop there.

Classes of variables that name weight or buffer axes become the groups of the spec; the module
outputs carrying a group's units that feed a weighted layer (through shape-only operations) become
its hooks for activation matching. An operation the tracer does not know raises one
:class:`TraceError` naming the operation and the module it ran in.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .structure import PermutationGroup, PermutationSpec


class TraceError(ValueError):
    """The tracer met something it cannot see through (the message names the node)."""


# ----------------------------------------------------------------------------- union-find
class _Vars:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: dict[int, str] = {}

    def new(self, size: int, fixed: str | None = None) -> int:
        v = len(self.parent)
        self.parent.append(v)
        self.size.append(int(size))
        if fixed is None and int(size) <= 1:
            fixed = "a single unit"
        if fixed is not None:
            self.fixed[v] = fixed
        return v

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: int, b: int, where: str) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self.size[ra] != self.size[rb]:
            raise TraceError(f"{where}: joins axes of sizes {self.size[ra]} and {self.size[rb]}")
        self.parent[rb] = ra
        if rb in self.fixed and ra not in self.fixed:
            self.fixed[ra] = self.fixed[rb]
        return True

    def fix(self, v: int, reason: str) -> bool:
        r = self.find(v)
        if r in self.fixed:
            return False
        self.fixed[r] = reason
        return True

    def is_fixed(self, v: int) -> bool:
        return self.find(v) in self.fixed


# ------------------------------------------------------------------------ op classification
_ELEMENTWISE = {
    "relu", "gelu", "silu", "sigmoid", "tanh", "dropout", "elu", "selu", "celu", "leaky_relu", "softplus",
    "mish", "hardswish", "hardsigmoid", "hardtanh", "relu6", "neg", "abs", "exp", "log", "sqrt", "rsqrt",
    "square", "clone", "contiguous", "float", "double", "half", "bfloat16", "detach", "long", "int", "bool",
    "zeros_like", "ones_like", "empty_like", "sin", "cos", "erf", "clamp", "clamp_min", "clamp_max", "pow",
    "reciprocal", "sign", "add", "sub", "rsub", "mul", "div", "true_divide", "truediv", "rtruediv",
    "floordiv", "maximum", "minimum", "where", "masked_fill", "pos", "invert", "logical_not", "eq", "ne",
    "lt", "le", "gt", "ge", "and", "or", "xor", "logical_and", "logical_or", "alpha_dropout", "nan_to_num",
    "addcmul", "addcdiv", "lerp", "sigmoid_", "tanh_", "relu_", "log_sigmoid", "logsigmoid", "softsign",
    "tanhshrink", "glu_", "requires_grad_", "exp2", "expm1", "log1p", "trunc", "round", "floor", "ceil",
}
_FIRST_ONLY = {"to", "type_as", "type", "cuda", "cpu"}          # later tensor arguments give only a dtype/device
_EQUIVARIANT = {"softmax", "log_softmax", "softmin"}         # permuting the axis permutes the result
_REDUCE = {"mean", "sum", "amax", "amin", "std", "var", "norm", "logsumexp", "prod", "nansum", "nanmean"}
_INDEXED = {"max", "min"}                                     # with a dim: values and indices
_ARG = {"argmax", "argmin", "argsort", "sort", "topk", "cumsum", "cumprod", "flip", "roll", "diff"}
_TRI = {"triu", "tril"}
_RESHAPE = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze"}
_REORDER = {"transpose", "swapaxes", "swapdims", "permute", "t", "movedim", "moveaxis", "mT", "T"}
_CREATE = {"zeros", "ones", "empty", "full", "arange", "linspace", "rand", "randn", "randint", "tensor",
           "as_tensor", "eye", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "randperm",
           "ones_like_", "scalar_tensor"}
_META = {"size", "dim", "numel", "shape", "dtype", "device", "__len__", "is_floating_point", "item", "tolist",
         "is_contiguous", "stride", "data_ptr", "element_size", "requires_grad", "__bool__", "__float__",
         "__int__", "__index__", "__format__", "__repr__", "__hash__", "ndim", "is_cuda", "get_device",
         "nelement", "__reduce_ex__", "storage_offset", "layout", "names", "_version", "grad_fn", "is_leaf",
         "data", "untyped_storage", "__array__", "numpy", "grad"}

_ACT_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
                nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.ReLU6, nn.PReLU,
                nn.Softsign, nn.Tanhshrink, nn.LogSigmoid)
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LEAVES = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.Flatten, nn.Softmax, nn.LogSoftmax,
           *_CONV, *_CONVT, *_BN, *_ACT_MODULES, *_PASS_MODULES, *_POOL_MODULES)
_POOL_FUNCS = {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
               "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
               "adaptive_max_pool2d", "adaptive_max_pool3d", "interpolate", "upsample", "lp_pool1d", "lp_pool2d"}
_MIX_FUNCS = {"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "matmul", "mm",
              "bmm", "scaled_dot_product_attention", "embedding", "baddbmm", "addmm"}


def _op_name(func: Callable) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name == "__get__":  # a property such as Tensor.shape / Tensor.mT
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith("r") and name[1:] in ("add", "sub", "mul", "truediv", "floordiv", "matmul", "pow",
                                                 "and", "or", "xor"):
            name = name[1:] if name != "rsub" else "rsub"
        elif name.startswith("i") and name[1:] in ("add", "sub", "mul", "truediv", "floordiv", "and", "or",
                                                   "xor", "pow"):
            name = name[1:]
    if name.endswith("_") and not name.startswith("_") and name[:-1] in (_ELEMENTWISE | _REORDER | _RESHAPE):
        name = name[:-1]
    return name


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _norm_dim(d: int, n: int) -> int:
    return d + n if d < 0 else d


# --------------------------------------------------------------------------------- tracer
class _Node:
    __slots__ = ("kind", "label", "inputs", "outputs")

    def __init__(self, kind: str, label: str, inputs: list[int], outputs: list[int]) -> None:
        self.kind, self.label, self.inputs, self.outputs = kind, label, inputs, outputs


class _Tracer(TorchFunctionMode):
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
            self.unknown.append(where)
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

    def _f_cat(self, args, kwargs, out, where):
        tensors = [t for t in (args[0] if args else kwargs["tensors"]) if t.numel() or t.dim() > 1]
        dim = _norm_dim(int(kwargs.get("dim", args[1] if len(args) > 1 else 0)), out.dim())
        result = list(self.dims(tensors[0]))
        for t in tensors[1:]:
            for k, var in enumerate(self.dims(t)):
                if k != dim:
                    self.join(result[k], var, where)
        parts = tuple(self.dims(t)[dim] for t in tensors)
        whole = self.v.new(out.shape[dim])
        self.concats.append((whole, parts, where))
        result[dim] = whole
        self.set(out, result)

    _f_concat = _f_cat
    _f_concatenate = _f_cat

    def _f_stack(self, args, kwargs, out, where):
        tensors = list(args[0] if args else kwargs["tensors"])
        dim = _norm_dim(int(kwargs.get("dim", args[1] if len(args) > 1 else 0)), out.dim())
        result = list(self.dims(tensors[0]))
        for t in tensors[1:]:
            for a, b in zip(result, self.dims(t)):
                self.join(a, b, where)
        result.insert(dim, self.v.new(out.shape[dim], f"the axis made by {where}"))
        self.set(out, result)

    def _split_like(self, args, kwargs, out, where, default_dim=0):
        x = args[0]
        dim = kwargs.get("dim", args[2] if len(args) > 2 else default_dim)
        dim = _norm_dim(int(dim), x.dim())
        pieces = _tensors(out)
        dims = self.dims(x)
        parts = []
        for t in pieces:
            d = list(dims)
            d[dim] = self.v.new(t.shape[dim])
            parts.append(d[dim])
            self.set(t, d)
        self.concats.append((dims[dim], tuple(parts), where))

    def _f_chunk(self, args, kwargs, out, where):
        self._split_like(args, kwargs, out, where)

    def _f_split(self, args, kwargs, out, where):
        self._split_like(args, kwargs, out, where)

    def _f_unbind(self, args, kwargs, out, where):
        x = args[0]
        dim = _norm_dim(int(kwargs.get("dim", args[1] if len(args) > 1 else 0)), x.dim())
        self.v.fix(self.dims(x)[dim], f"the axis {where} takes apart")
        for t in _tensors(out):
            self.set(t, [v for k, v in enumerate(self.dims(x)) if k != dim])

    def _f_expand(self, args, kwargs, out, where):
        x = args[0]
        dims = self.dims(x)
        off = out.dim() - x.dim()
        result = [self.v.new(n) for n in out.shape]
        for k, var in enumerate(dims):
            if x.shape[k] == out.shape[off + k]:
                result[off + k] = var
        self.set(out, result)

    def _f_expand_as(self, args, kwargs, out, where):
        self._f_expand(args, kwargs, out, where)

    def _f_getitem(self, args, kwargs, out, where):
        x, index = args[0], args[1]
        dims = self.dims(x)
        if not isinstance(index, tuple):
            index = (index,)
        if any(isinstance(i, torch.Tensor) or isinstance(i, (list, bool)) for i in index):
            self.unknown.append(f"{where} (indexing with a tensor or list)")
            self.set(out, self.fresh(out, f"the result of {where}"))
            return
        n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
        expanded: list[Any] = []
        for i in index:
            if i is Ellipsis:
                expanded += [slice(None)] * (x.dim() - n_real)
            else:
                expanded.append(i)
        expanded += [slice(None)] * (x.dim() - sum(1 for i in expanded if i is not None))
        result: list[int] = []
        k = 0
        for i in expanded:
            if i is None:
                result.append(self.v.new(1))
                continue
            var = dims[k]
            if isinstance(i, int):
                self.v.fix(var, f"an axis indexed by {where}")
            elif isinstance(i, slice):
                if i == slice(None) or range(*i.indices(x.shape[k])) == range(x.shape[k]):
                    result.append(var)
                else:
                    self.v.fix(var, f"an axis sliced by {where}")
                    result.append(self.v.new(out.shape[len(result)], f"an axis sliced by {where}"))
            k += 1
        self.set(out, result)

    def _f_linear(self, args, kwargs, out, where):
        x = args[0]
        w = kwargs.get("weight", args[1] if len(args) > 1 else None)
        b = kwargs.get("bias", args[2] if len(args) > 2 else None)
        self._linear(x, w, b, out, where)

    def _linear(self, x, w, b, out, where):
        xd, wd = self.dims(x), self.dims(w)
        self.join(xd[-1], wd[1], where)
        if b is not None:
            self.join(self.dims(b)[0], wd[0], where)
        self.set(out, xd[:-1] + [wd[0]])

    def _f_matmul(self, args, kwargs, out, where):
        a, b = args[0], args[1]
        ad, bd = self.dims(a), self.dims(b)
        if a.dim() == 1 and b.dim() == 1:
            self.join(ad[0], bd[0], where)
            self.set(out, [])
            return
        if b.dim() == 1:
            self.join(ad[-1], bd[0], where)
            self.set(out, ad[:-1])
            return
        if a.dim() == 1:
            self.join(ad[0], bd[-2], where)
            self.set(out, bd[:-2] + [bd[-1]])
            return
        self.join(ad[-1], bd[-2], where)
        batch = self._batch(a, b, out.dim() - 2, where)
        self.set(out, batch + [ad[-2], bd[-1]])

    _f_mm = _f_matmul
    _f_bmm = _f_matmul

    def _batch(self, a, b, nb, where, c=None):
        result: list[int | None] = [None] * nb
        for t in (a, b, c):
            if t is None:
                continue
            d = self.dims(t)[:-2]
            off = nb - len(d)
            for k, var in enumerate(d):
                if t.shape[k] == 1:
                    continue
                if result[off + k] is None:
                    result[off + k] = var
                else:
                    self.join(result[off + k], var, where)
        return [r if r is not None else self.v.new(1) for r in result]

    def _f_scaled_dot_product_attention(self, args, kwargs, out, where):
        q, k, v = args[0], args[1], args[2]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        qd, kd, vd = self.dims(q), self.dims(k), self.dims(v)
        self.join(qd[-1], kd[-1], where)
        self.join(kd[-2], vd[-2], where)
        batch = self._batch(q, k, out.dim() - 2, where, v)
        if isinstance(mask, torch.Tensor):
            md = self.dims(mask)
            target = batch + [qd[-2], kd[-2]]
            off = len(target) - mask.dim()
            for i, var in enumerate(md):
                if mask.shape[i] != 1:
                    self.join(target[off + i], var, where)
        self.set(out, batch + [qd[-2], vd[-1]])

    def _f_softmax(self, args, kwargs, out, where):
        self.set(out, list(self.dims(args[0])))

    def _f_embedding(self, args, kwargs, out, where):
        idx, w = args[0], args[1]
        wd = self.dims(w)
        self.v.fix(wd[0], f"the rows of an embedding, indexed by the input ({where})")
        self.set(out, list(self.dims(idx)) + [wd[1]])

    def _f_layer_norm(self, args, kwargs, out, where):
        x = args[0]
        shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
        w = kwargs.get("weight", args[2] if len(args) > 2 else None)
        b = kwargs.get("bias", args[3] if len(args) > 3 else None)
        self._norm_last(x, len(shape), [w, b], out, where)

    def _norm_last(self, x, k, params, out, where):
        xd = self.dims(x)
        for p in params:
            if p is not None:
                for a, var in zip(xd[-k:], self.dims(p)):
                    self.join(a, var, where)
        self.set(out, list(xd))

    def _f_pad(self, args, kwargs, out, where):
        x = args[0]
        pad = list(args[1] if len(args) > 1 else kwargs["pad"])
        dims = list(self.dims(x))
        for k in range(len(pad) // 2):
            d = x.dim() - 1 - k
            if pad[2 * k] or pad[2 * k + 1]:
                self.v.fix(dims[d], f"an axis padded by {where}")
                dims[d] = self.v.new(out.shape[d], f"an axis padded by {where}")
        self.set(out, dims)

    def _spatial(self, x, out, where):
        d = self.dims(x)
        self.set(out, d[:2] + [self.v.new(n, f"a spatial axis resized by {where}") for n in out.shape[2:]])

    def _f_interpolate(self, args, kwargs, out, where):
        self._spatial(args[0], out, where)

    # ---- modules
    def module_call(self, name: str, m: nn.Module, args: tuple, out: Any) -> None:
        where = f"module '{name}' ({type(m).__name__})"
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
            self.unknown.append(f"{where} called on something other than one tensor")
            return
        kind = "mix" if isinstance(m, (nn.Linear, nn.Embedding, *_CONV, *_CONVT)) else \
            "unit" if isinstance(m, (*_ACT_MODULES, *_BN, nn.LayerNorm, nn.GroupNorm)) else "pass"
        self.node(kind, where, [x], [out])
        if out is x:
            return
        xd = self.dims(x)
        if isinstance(m, nn.Linear):
            self._linear(x, m.weight, m.bias, out, where)
        elif isinstance(m, _CONV):
            wd = self.dims(m.weight)
            for var in wd[2:]:
                self.v.fix(var, f"a kernel axis of {where}")
            if m.groups == 1:
                self.join(xd[1], wd[1], where)
            elif m.groups == m.in_channels == m.out_channels:
                self.join(xd[1], wd[0], where)
            else:
                self.unknown.append(f"{where} with groups={m.groups}")
            if m.bias is not None:
                self.join(self.dims(m.bias)[0], wd[0], where)
            self.set(out, [xd[0], wd[0]] + [self.v.new(n, f"a spatial axis of {where}") for n in out.shape[2:]])
        elif isinstance(m, _CONVT):
            wd = self.dims(m.weight)
            for var in wd[2:]:
                self.v.fix(var, f"a kernel axis of {where}")
            if m.groups != 1:
                self.unknown.append(f"{where} with groups={m.groups}")
            self.join(xd[1], wd[0], where)
            if m.bias is not None:
                self.join(self.dims(m.bias)[0], wd[1], where)
            self.set(out, [xd[0], wd[1]] + [self.v.new(n, f"a spatial axis of {where}") for n in out.shape[2:]])
        elif isinstance(m, _BN):
            for p in (m.weight, m.bias, m.running_mean, m.running_var):
                if p is not None:
                    self.join(xd[1], self.dims(p)[0], where)
            self.set(out, list(xd))
        elif isinstance(m, nn.LayerNorm):
            self._norm_last(x, len(m.normalized_shape), [m.weight, m.bias], out, where)
        elif isinstance(m, nn.GroupNorm):
            if m.num_groups not in (1, m.num_channels):
                self.unknown.append(f"{where} with {m.num_groups} groups of channels (only 1 or one per channel)")
            for p in (m.weight, m.bias):
                if p is not None:
                    self.join(xd[1], self.dims(p)[0], where)
            self.set(out, list(xd))
        elif isinstance(m, nn.Embedding):
            wd = self.dims(m.weight)
            self.v.fix(wd[0], f"the rows of {where}, indexed by the input")
            self.set(out, list(xd) + [wd[1]])
        elif isinstance(m, (*_ACT_MODULES, *_PASS_MODULES, nn.Softmax, nn.LogSoftmax)):
            if isinstance(m, nn.PReLU) and m.num_parameters > 1:
                self.join(xd[1], self.dims(m.weight)[0], where)
            self.set(out, list(xd) if out.shape == x.shape else self.fresh(out, f"the result of {where}"))
        elif isinstance(m, _POOL_MODULES):
            self._spatial(x, out, where)
        elif isinstance(m, nn.Flatten):
            self.set(out, self.reshape(x, out, where))


def _install_hooks(tracer: _Tracer, model: nn.Module) -> list:
    handles = []
    for name, m in model.named_modules():
        leaf = isinstance(m, _LEAVES)

        def pre(_m, _args, name=name, leaf=leaf):
            tracer.stack.append(name)
            if leaf:
                tracer.depth += 1

        def post(_m, args, out, name=name, leaf=leaf):
            if leaf:
                tracer.depth -= 1
                if tracer.depth == 0:
                    with torch._C.DisableTorchFunction():
                        tracer.module_call(name, _m, args, out)
            tracer.stack.pop()
            if tracer.depth == 0 and isinstance(out, torch.Tensor) and name and id(out) not in tracer.produced_by_module:
                if id(out) not in tracer.input_ids:
                    tracer.produced_by_module.add(id(out))
                    # a pooled / flattened copy is observed where it was computed, not again here
                    shape_only = isinstance(_m, (*_PASS_MODULES, *_POOL_MODULES, nn.Flatten))
                    tracer.module_values.append((name, id(out), shape_only))
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    return handles


# ------------------------------------------------------------------------------ resolving
def _close(tr: _Tracer) -> None:
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


def _hooks(tr: _Tracer, root: int) -> list[tuple[str, int]]:
    """Module outputs carrying ``root`` that reach a weighted layer through shape-only ops."""
    v = tr.v
    found, fallback = [], []
    for name, vid, shape_only in tr.module_values:
        t, dims = tr.values.get(vid, (None, []))
        if t is None:
            continue
        hit = [k for k, d in enumerate(dims) if v.find(d) == root]
        if not hit:
            continue
        fallback.append((name, hit[0]))
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
            found.append((name, hit[0]))
    return found or fallback


def _build_spec(tr: _Tracer) -> PermutationSpec:
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
        hooks = _hooks(tr, r)
        if not hooks:
            raise TraceError(f"no module output carries the units of '{names[r]}' (axes {axes[r][:3]}); "
                             "compute them inside a module so activation matching can observe them")
        groups.append(PermutationGroup(names[r], v.size[r], tuple(axes.get(r, ())), tuple(h for h, _ in hooks),
                                       tuple(d for _, d in hooks), heads=heads, head_group=head_group))
    hg_names: dict[str, str] = {}
    out = []
    for g in groups:
        if g.head_group is not None:
            hg = hg_names.setdefault(g.head_group, f"heads:{g.name}")
            g = PermutationGroup(g.name, g.size, g.axes, g.hooks, g.hook_dims, g.heads, hg)
        out.append(g)
    return PermutationSpec(tuple(out + derived))


@torch.no_grad()
def derive_spec(model: nn.Module, example_input: Any) -> PermutationSpec:
    """The permutation structure of ``model``, found by running it once on ``example_input``.

    ``example_input`` is a tensor (a batch; two samples are enough), or an ``(input, label)`` pair.
    Raises :class:`TraceError` (a ValueError) naming the first operations it cannot see through.
    """
    if isinstance(example_input, (tuple, list)) and example_input and isinstance(example_input[0], torch.Tensor):
        example_input = example_input[0]
    if not isinstance(example_input, torch.Tensor):
        raise TraceError(f"derive_spec needs an example input tensor, got {type(example_input).__name__}")
    tr = _Tracer(model)
    x = example_input[:2] if example_input.dim() > 0 and example_input.shape[0] > 2 else example_input
    x = x.to(next(model.parameters()).device) if any(True for _ in model.parameters()) else x
    tr.set(x, [tr.v.new(n, "the model input" if n > 1 else None) for n in x.shape])
    tr.input_ids.add(id(x))
    was_training = model.training
    model.eval()
    handles = _install_hooks(tr, model)
    try:
        with tr:
            out = model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for t in _tensors(out):
        for var in tr.dims(t):
            tr.v.fix(var, "the model output")
    if tr.unknown:
        seen = list(dict.fromkeys(tr.unknown))
        more = f" (and {len(seen) - 3} more)" if len(seen) > 3 else ""
        raise TraceError(f"cannot derive the permutation structure of {type(model).__name__}: "
                         f"{'; '.join(seen[:3])}{more} is not something the tracer can see through; "
                         "declare permutation_spec() on the model, or write that step with supported layers")
    _close(tr)
    return _build_spec(tr)


__all__ = ["TraceError", "derive_spec"]
