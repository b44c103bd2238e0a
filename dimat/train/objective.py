"""The local objective: cross-entropy, optionally with the label-skew remedies.

* **Restricted softmax** (FedRS, Li & Zhan 2021): the logits of classes absent from the peer's own
  data are multiplied by ``absent_logit_scale`` before the softmax. At 1 nothing changes; at 0 the
  absent classes' logits are a constant 0, so local training no longer pushes down the classes only
  the neighbours know (their head rows get no gradient); in between, their gradient is scaled by it.
* **Proximal term** (FedProx, Li et al. 2020): ``prox_mu / 2 * ||theta - theta_anchor||^2`` with the
  anchor the model at the start of the round's local training (the merged model).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


class LocalObjective:
    """Loss of one batch for a peer whose own labels are ``labels``."""

    def __init__(self, labels: torch.Tensor, *, absent_logit_scale: float, prox_mu: float) -> None:
        if not 0.0 <= absent_logit_scale <= 1.0:
            raise ValueError(f"absent_logit_scale must be in [0, 1] (got {absent_logit_scale})")
        if prox_mu < 0:
            raise ValueError(f"prox_mu must be non-negative (got {prox_mu})")
        self.labels = labels
        self.absent_logit_scale = float(absent_logit_scale)
        self.prox_mu = float(prox_mu)
        self._scale: torch.Tensor | None = None
        self._anchor: list[torch.Tensor] | None = None

    def logit_scale(self, num_classes: int, device: torch.device) -> torch.Tensor:
        """Per-class factor on the logits: 1 for classes in own data, ``absent_logit_scale`` for the rest."""
        if self._scale is None or self._scale.numel() != num_classes or self._scale.device != device:
            present = torch.bincount(self.labels, minlength=num_classes)[:num_classes] > 0
            self._scale = torch.where(present, 1.0, self.absent_logit_scale).to(device)
        return self._scale

    def restrict(self, logits: torch.Tensor) -> torch.Tensor:
        if self.absent_logit_scale >= 1.0:
            return logits
        return logits * self.logit_scale(logits.shape[1], logits.device).to(logits.dtype)

    def start_round(self, params: Sequence[torch.Tensor]) -> None:
        """Fix the proximal anchor: the parameters as local training of a round begins."""
        self._anchor = [p.detach().clone() for p in params] if self.prox_mu > 0 else None

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
        loss = F.cross_entropy(self.restrict(logits), targets)
        if self._anchor is not None:
            loss = loss + 0.5 * self.prox_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, self._anchor))
        return loss
