"""Data poisoning and model replacement, the two levers of a malicious peer."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from dimat.attacks.triggers import Trigger

from dimat.typing import StateDict


def poison_dataset(
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Trigger,
    target_class: int,
    rate: float,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Stamp ``trigger`` into a share ``rate`` of the non-target samples and relabel them ``target_class``.

    Exactly ``round(rate * n_non_target)`` samples, drawn without replacement with ``seed``, are
    poisoned. Returns new ``(x, y, poisoned_idx)`` (sorted indices into ``x``); inputs are untouched.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y disagree on the number of samples: {x.shape[0]} vs {y.shape[0]}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"poison rate must be in [0, 1], got {rate}")
    if target_class < 0:
        raise ValueError(f"target_class must be >= 0, got {target_class}")
    candidates = torch.nonzero(y != target_class, as_tuple=False).flatten().cpu().numpy()
    n_poison = int(round(rate * len(candidates)))
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(candidates, size=n_poison, replace=False)) if n_poison else np.empty(0, dtype=np.int64)
    x_out, y_out = x.clone(), y.clone()
    if n_poison:
        t = torch.as_tensor(idx, dtype=torch.long, device=x.device)
        x_out[t] = trigger(x[t])
        y_out[t] = target_class
    return x_out, y_out, idx.astype(np.int64)


def scale_update(own_state: Mapping[str, torch.Tensor], base_state: Mapping[str, torch.Tensor], factor: float) -> StateDict:
    """Model replacement (Bagdasaryan et al.): send ``base + factor * (own - base)``.

    ``base_state`` is the model before this round's local training (what neighbours will average
    with), so a factor near the inverse of the attacker's mixing weight makes its model survive the
    merge. Integer buffers are sent unchanged.
    """
    if set(own_state) != set(base_state):
        missing = sorted(set(own_state) ^ set(base_state))
        raise ValueError(f"own and base states have different keys: {missing[:5]}")
    out: StateDict = {}
    for k, v in own_state.items():
        b = base_state[k]
        if v.shape != b.shape:
            raise ValueError(f"shape mismatch for {k!r}: {tuple(v.shape)} vs {tuple(b.shape)}")
        if torch.is_floating_point(v):
            out[k] = b.to(v.dtype) + factor * (v - b.to(v.dtype))
        else:
            out[k] = v.clone()
    return out
