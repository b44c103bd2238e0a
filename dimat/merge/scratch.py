"""Working copies of a model for a merge, reused from merge to merge instead of deep-copied.

A merge needs a few throw-away models of the peer's architecture (one per neighbour to collect
activation statistics, one for the BatchNorm reset). ``copy.deepcopy`` of an ``nn.Module`` walks
every submodule in Python and cost about a third of a 1,000-peer DIMAT round; the copies are always
loaded with a full state right after, so a pool of models per architecture, loaded with the
reference's state and mode, gives the same model without the walk. Merges run one at a time in a
process, so ``slot`` k is free again once the merge that used it returns.

The pool's key is the module's type, its ``repr`` (layer hyper-parameters such as strides) and its
state's names, shapes, dtypes and devices. A model whose forward depends on a plain Python attribute
that neither shows in its repr nor in its state would be told apart by its type only; such models
can opt out with ``working_copy_safe = False`` (then every copy is a deep copy).
"""
from __future__ import annotations

import copy
import threading
import weakref

from torch import nn

_POOLS: dict[tuple, list[nn.Module]] = {}
_LOCK = threading.Lock()
#: at most this many architectures are pooled (a process rarely merges more than one)
MAX_POOLS = 8


_KEYS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _key(model: nn.Module) -> tuple:
    """The architecture's identity (computed once per model: a peer merges with the same model every round)."""
    key = _KEYS.get(model)
    if key is None:
        state = tuple((k, tuple(v.shape), v.dtype, str(v.device)) for k, v in model.state_dict().items())
        key = _KEYS[model] = (type(model), repr(model), state)
    return key


def working_copy(reference: nn.Module, slot: int) -> nn.Module:
    """A model of ``reference``'s architecture in its train/eval mode, reused for later merges.

    Its state is left as the last user left it: the caller loads a full state into it (strict
    ``load_state_dict``, every parameter and buffer), which makes it equal to a deep copy so loaded.
    """
    if not getattr(reference, "working_copy_safe", True):
        return copy.deepcopy(reference)
    key = _key(reference)
    with _LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            if len(_POOLS) >= MAX_POOLS:
                _POOLS.pop(next(iter(_POOLS)))
            pool = _POOLS[key] = []
        while len(pool) <= slot:
            pool.append(copy.deepcopy(reference))
        model = pool[slot]
    model.train(reference.training)
    return model


__all__ = ["working_copy"]
