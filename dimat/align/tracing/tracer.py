"""The tracer: core bookkeeping, function handlers and module handlers in one ``TorchFunctionMode``."""
from __future__ import annotations

from .core import TracerCore
from .functions import FunctionHandlers
from .modules import ModuleHandlers


class Tracer(FunctionHandlers, ModuleHandlers, TracerCore):
    """Records one forward pass of a model as joins of axis variables (see :mod:`dimat.align.trace`)."""
