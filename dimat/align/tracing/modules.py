"""Known leaf modules (Linear, Conv, norms, activations, pools): their axes, and the hooks that report them."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .ops import _ACT_MODULES, _BN, _CONV, _CONVT, _LEAVES, _PASS_MODULES, _POOL_MODULES

if TYPE_CHECKING:
    from .tracer import Tracer


class ModuleHandlers:
    """``module_call``: what a known leaf module does to the axes of its input."""

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


_LEAF_SET = frozenset(_LEAVES)


def is_leaf(m: nn.Module) -> bool:
    """A known module whose ``forward`` is that class's own.

    A subclass that overrides ``forward`` (timm's ``LayerNorm2d`` is an ``nn.LayerNorm`` that
    normalises dim 1) is traced through instead: classifying it by ``isinstance`` would read its
    parameters on the wrong axis.
    """
    for cls in type(m).__mro__:
        if cls in _LEAF_SET:
            return type(m).forward is cls.forward
    return False


def install_hooks(tracer: "Tracer", model: nn.Module) -> list:
    """Forward hooks that keep the module stack and hand each outermost known leaf to ``module_call``."""
    handles = []
    for name, m in model.named_modules():
        leaf = is_leaf(m)

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
