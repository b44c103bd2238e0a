"""Permutation alignment: make a neighbour's hidden units line up with ours before averaging."""
from .api import align, check_compatible, check_state_compatible, find_permutations, spec_for
from .batchnorm import has_batchnorm, reset_bn_stats
from .inputs import iter_inputs, reiterable_inputs
from .matching import match_activations, perms_from_stats, solve_assignment, weight_matching
from .permute import apply_permutation, invert, permute_state
from .spec import (PermutationGroup, PermutationSpec, SpecBuilder, block_permutation, bn_axes, complete, get_spec,
                   identity_permutations, random_permutations)
from .stats import CrossStats, collect_cross_stats
from .trace import TraceError, derive_spec

__all__ = [
    "align", "check_compatible", "check_state_compatible", "find_permutations", "spec_for", "has_batchnorm",
    "reset_bn_stats", "iter_inputs", "reiterable_inputs", "match_activations", "perms_from_stats",
    "solve_assignment", "weight_matching", "apply_permutation", "invert", "permute_state",
    "PermutationGroup", "PermutationSpec", "SpecBuilder", "block_permutation", "bn_axes", "complete", "get_spec",
    "identity_permutations", "random_permutations", "CrossStats", "collect_cross_stats", "TraceError", "derive_spec",
]
