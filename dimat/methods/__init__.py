"""Methods: what makes one decentralized algorithm differ from another, one module each.

:class:`Method` (``base``) is the interface the round loop calls; ``aligned`` holds the align-then-
average merge the built-ins share; ``registry`` names them and loads a user's (``merge=custom``).
"""
from .base import EXTRA_PREFIX, Method, split_extras
from .aligned import AlignedAverage
from .average import Average
from .centralized import Centralized
from .dimat import Dimat
from .gossip import Gossip
from .isolated import Isolated
from .scaffold import Scaffold
from .weight_matching import WeightMatching
from .registry import available_methods, build_method, method_class, register_method

__all__ = ["EXTRA_PREFIX", "AlignedAverage", "Average", "Centralized", "Dimat", "Gossip", "Isolated", "Method", "Scaffold",
           "WeightMatching", "available_methods", "build_method", "method_class", "register_method", "split_extras"]
