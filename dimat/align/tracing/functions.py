"""Handlers of torch functions that join axes in their own way (cat, matmul, attention, norms, indexing)."""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from .ops import _norm_dim, _tensors


class FunctionHandlers:
    """``_f_<name>(args, kwargs, out, where)``: one per torch function the tables do not cover."""

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
        dims = self.dims(x)
        pieces = _tensors(out)
        fused = self.fused_pieces(dims, dim, len(pieces), where)
        if fused is not None:  # timm's qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
            for t, d in zip(pieces, fused):
                self.set(t, d)
            return
        self.v.fix(dims[dim], f"the axis {where} takes apart")
        for t in pieces:
            self.set(t, [v for k, v in enumerate(dims) if k != dim])

    def fused_pieces(self, dims: list[int], dim: int, n: int, where: str) -> list[list[int]] | None:
        """Taking apart the outer axis of a factorised axis (a fused projection's q, k, v).

        When ``dims[dim]`` is the outer factor of ``whole = (n, rest)``, each piece gets its own
        copy of ``rest`` (and of its factors among the other axes), and ``whole`` becomes their
        concatenation: the pieces are different units, not one axis seen n times.
        """
        split = self.outer_of(dims[dim])
        if split is None or self.v.size[dims[dim]] != n:
            return None
        whole, inner = split
        inner_root = self.v.find(inner)
        result, parts = [], []
        for _ in range(n):
            copy: dict[int, int] = {}
            parts.append(self.copy_factors(inner_root, copy, where))
            result.append([copy.get(self.v.find(v), v) for k, v in enumerate(dims) if k != dim])
        self.concats.append((whole, tuple(parts), where))
        return result

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

    def _f_addmm(self, args, kwargs, out, where):
        """``beta * input + alpha * mat1 @ mat2`` (Hugging Face's ``Conv1D``: GPT-2's every projection)."""
        inp, a, b = args[0], args[1], args[2]
        ad, bd = self.dims(a), self.dims(b)
        self.join(ad[-1], bd[0], where)
        self._add_into([ad[0], bd[1]], inp, out, where)

    def _f_baddbmm(self, args, kwargs, out, where):
        inp, a, b = args[0], args[1], args[2]
        ad, bd = self.dims(a), self.dims(b)
        self.join(ad[-1], bd[-2], where)
        batch = self._batch(a, b, out.dim() - 2, where)
        self._add_into(batch + [ad[-2], bd[-1]], inp, out, where)

    def _add_into(self, dims, inp, out, where):
        """``out`` has ``dims``; ``inp`` is broadcast onto it and added."""
        if isinstance(inp, torch.Tensor):
            off = out.dim() - inp.dim()
            for k, var in enumerate(self.dims(inp)):
                if inp.shape[k] != 1 or out.shape[off + k] == 1:
                    self.join(dims[off + k], var, where)
        self.set(out, dims)

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
        if kwargs.get("enable_gqa") and q.dim() >= 3 and q.shape[-3] != k.shape[-3]:
            # grouped-query attention: query head h reads key/value head h // (Hq / Hkv), as if
            # each key/value head were repeated (transformers' repeat_kv): (Hkv, copies) merged
            self.join(kd[-3], vd[-3], where)
            copies = self.v.new(q.shape[-3] // k.shape[-3])
            self.join(qd[-3], self.merge([kd[-3], copies], where), where)
            batch = self._batch(q, q, out.dim() - 2, where)
            for t in (k, v):  # the batch axes before the heads
                for a, b in zip(batch[:-1], self.dims(t)[:-3]):
                    if self.v.size[b] > 1:
                        self.join(a, b, where)
        else:
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

    def _f_rms_norm(self, args, kwargs, out, where):
        x = args[0]
        shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
        w = kwargs.get("weight", args[2] if len(args) > 2 else None)
        self._norm_last(x, len(shape), [w], out, where)

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

    def _f_multi_head_attention_forward(self, args, kwargs, out, where):
        """``nn.MultiheadAttention`` (and so ``nn.TransformerEncoder``, torchvision's ViT).

        ``in_proj_weight`` stacks the query, key and value projections: its output axis is the
        concatenation of their units, each split into heads; the query and key units of a head
        are contracted together, and the output projection reads the value units.
        """
        a = inspect.signature(F.multi_head_attention_forward).bind(*args, **kwargs).arguments
        if a.get("use_separate_proj_weight") or a.get("bias_k") is not None or a.get("add_zero_attn") \
                or a.get("static_k") is not None or a.get("static_v") is not None:
            self.unknown.append(f"{where} with separate projection weights, bias_k/bias_v, add_zero_attn or "
                                "static keys")
            for t in _tensors(out):
                self.set(t, self.fresh(t, f"the result of {where}"))
            return
        q, k, v = a["query"], a["key"], a["value"]
        heads = int(a["num_heads"])
        w, b = a["in_proj_weight"], a.get("in_proj_bias")
        wd = self.dims(w)
        for t in (q, k, v):
            self.join(self.dims(t)[-1], wd[1], where)
        e = w.shape[0] // 3
        parts = [self.v.new(e) for _ in range(3)]
        (hq, dq), (hk, dk), (hv, dv) = (self.split(p, [heads, e // heads], where) for p in parts)
        self.join(hq, hk, where)
        self.join(hk, hv, where)
        self.join(dq, dk, where)
        self.concats.append((wd[0], tuple(parts), where))
        if isinstance(b, torch.Tensor):
            self.join(self.dims(b)[0], wd[0], where)
        self.projections[self.v.find(wd[0])] = self.stack[-1] if self.stack else ""
        od = self.dims(a["out_proj_weight"])
        self.join(od[1], parts[2], where)
        ob = a.get("out_proj_bias")
        if isinstance(ob, torch.Tensor):
            self.join(self.dims(ob)[0], od[0], where)
        result = out[0] if isinstance(out, (tuple, list)) else out
        qd = self.dims(q)
        self.set(result, qd[:-1] + [od[0]])
        for t in _tensors(out)[1:]:  # attention weights
            self.set(t, self.fresh(t, f"the attention weights of {where}"))
