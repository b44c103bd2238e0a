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

from typing import Any

import torch
from torch import nn

from .structure import PermutationSpec
from .tracing.modules import install_hooks
from .tracing.ops import _tensors
from .tracing.resolve import build_spec, close, unknown_ops
from .tracing.tracer import Tracer
from .tracing.variables import TraceError
from .tracing.verify import verify_spec


@torch.no_grad()
def derive_spec(model: nn.Module, example_input: Any, *, verify: bool = True) -> PermutationSpec:
    """The permutation structure of ``model``, found by running it once on ``example_input``.

    Args:
        model: any ``nn.Module``; its ``forward`` is run (in eval mode) under the tracer.
        example_input: a tensor (a batch; two samples are enough), or an ``(input, label)`` pair.
        verify: plant a random permutation of every group on the example input and check the
            output unchanged (two more forward passes); a mismatch raises naming the group.

    Raises:
        TraceError: (a ValueError) naming the first operations it cannot see through, or the
            group a planted permutation showed to be wrong.
    """
    if isinstance(example_input, (tuple, list)) and example_input and isinstance(example_input[0], torch.Tensor):
        example_input = example_input[0]
    if not isinstance(example_input, torch.Tensor):
        raise TraceError(f"derive_spec needs an example input tensor, got {type(example_input).__name__}")
    tr = Tracer(model)
    x = example_input[:2] if example_input.dim() > 0 and example_input.shape[0] > 2 else example_input
    x = x.to(next(model.parameters()).device) if any(True for _ in model.parameters()) else x
    tr.set(x, [tr.v.new(n, "the model input" if n > 1 else None) for n in x.shape])
    tr.input_ids.add(id(x))
    was_training = model.training
    model.eval()
    handles = install_hooks(tr, model)
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
        raise unknown_ops(tr, tr.unknown)
    close(tr)
    spec = build_spec(tr)
    if verify:
        verify_spec(model, spec, x)
    return spec


__all__ = ["TraceError", "derive_spec"]