"""Public alignment entry point: ``dimat.align.align``."""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from torch import nn

from .inputs import first_input, reiterable_inputs
from .matching import match_activations, weight_matching
from .permute import permute_state
from .spec import PermutationSpec, get_spec

METHODS = ("activation", "weight")


def check_compatible(reference: nn.Module, others: Sequence[nn.Module]) -> None:
    """ValueError naming the first key, shape or dtype where a model differs from the reference."""
    ref = reference.state_dict()
    for k, m in enumerate(others):
        if not isinstance(m, nn.Module):
            raise ValueError(f"model {k} is a {type(m).__name__}, not a torch.nn.Module")
        check_state_compatible(ref, m.state_dict(), label=f"model {k} ({type(m).__name__})")


def check_state_compatible(ref: dict, other: dict, label: str = "state") -> None:
    missing = [key for key in ref if key not in other]
    extra = [key for key in other if key not in ref]
    if missing or extra:
        raise ValueError(f"{label} does not match the reference architecture: "
                         f"missing {missing[:5]}, unexpected {extra[:5]}")
    for key, t in ref.items():
        o = other[key]
        if not isinstance(o, torch.Tensor):
            raise ValueError(f"{label}: '{key}' is a {type(o).__name__}, not a tensor")
        if o.shape != t.shape:
            raise ValueError(f"{label}: '{key}' has shape {tuple(o.shape)}, the reference has {tuple(t.shape)}")
        if o.dtype != t.dtype:
            raise ValueError(f"{label}: '{key}' has dtype {o.dtype}, the reference has {t.dtype}")


def spec_for(model: nn.Module, data: Iterable | None, max_batches: int | None = None,
             ) -> tuple[PermutationSpec, Iterable | None]:
    """``(spec, data)``: the declared spec, or one traced on the first batch of ``data``.

    For a model without ``permutation_spec()``, ``data`` is made re-iterable first (a one-shot
    iterator is not spent by the trace) and returned for the caller to use.
    """
    if getattr(model, "permutation_spec", None) is not None or getattr(model, "_dimat_derived_spec", None) is not None:
        return get_spec(model), data
    if data is not None:
        data = reiterable_inputs(data, max_batches)
    return get_spec(model, first_input(data)), data


def find_permutations(reference: nn.Module, others: Sequence[nn.Module], data: Iterable | None,
                      method: str = "activation", spec: PermutationSpec | None = None,
                      max_batches: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Per other model, ``{group: perm}`` mapping it into ``reference``'s basis."""
    if method not in METHODS:
        raise ValueError(f"unknown alignment method '{method}'; choose one of {METHODS}")
    if spec is None:
        spec, data = spec_for(reference, data, max_batches)
    spec.validate(reference.state_dict(), dict(reference.named_modules()))
    check_compatible(reference, others)
    if not others:
        return []
    if method == "activation":
        data = reiterable_inputs(data, max_batches)
        return match_activations(reference, list(others), data, spec, max_batches)
    ref_state = reference.state_dict()
    return [weight_matching(ref_state, m.state_dict(), spec) for m in others]


def align(reference: nn.Module, others: Sequence[nn.Module], data: Iterable | None = None,
          method: str = "activation", max_batches: int | None = None) -> list[nn.Module]:
    """Copies of ``others`` permuted into ``reference``'s basis; nothing passed in is modified.

    ``method="activation"`` matches units by activation correlation on ``data`` (an iterable of
    input tensors or (input, label) pairs); ``method="weight"`` needs no data. A model without
    ``permutation_spec()`` gets one derived by tracing it on the first batch of ``data``.
    """
    spec, data = spec_for(reference, data, max_batches)
    perms = find_permutations(reference, others, data, method, spec, max_batches)
    out = []
    for m, p in zip(others, perms):
        new = copy.deepcopy(m)
        new.load_state_dict(permute_state(m.state_dict(), spec, p))
        out.append(new)
    return out
