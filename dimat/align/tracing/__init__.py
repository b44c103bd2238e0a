"""The tracer behind :func:`dimat.align.trace.derive_spec`, one concept per module.

- ``variables``: axis variables (union-find) and :class:`TraceError`;
- ``ops``: the tables that classify torch functions and modules by name;
- ``core``: values, broadcasting, reshapes (factorisations), dispatch of a recorded call;
- ``functions``: handlers of functions with their own axis rules (cat, matmul, attention, norms);
- ``modules``: known leaf modules and the forward hooks that report them;
- ``resolve``: closure over reshapes and concatenations, then groups and hooks of the spec;
- ``verify``: the planted-permutation check every derived spec passes.
"""
from .variables import TraceError

__all__ = ["TraceError"]
