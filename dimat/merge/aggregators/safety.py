"""Safety-aware masking: leave out of the merge the neighbour parameters that look like a backdoor.

In the spirit of Defense-Aware Merging (DAM, Yang et al., ICLR 2025): a backdoor implanted by one
participant lives in a small set of parameters that that participant alone moves, often strongly
and against what the others do. Per entry and coordinate, with own's zero delta as a trusted vote,
a neighbour's delta ``delta_jc`` is masked (left out, the remaining weights renormalised) when it is

- *extreme*: robust z-score ``|delta_jc - med_c| / (1.4826 * MAD_c)`` above ``z_max``, where the
  median and MAD are taken over ``{0, delta_1c, ..., delta_kc}`` and the scale is floored at
  ``scale_floor`` times the entry's typical neighbour delta ``1.4826 * median_jc |delta_jc|`` (so
  coordinates where a few votes happen to agree closely do not turn honest noise into huge z-scores);
- *sign-disagreeing*: opposite in sign to the consensus ``sign(med_c)`` while also at least
  ``sign_z`` robust units away from it (mild disagreement is normal between honest peers);
- *isolated*: the only neighbour that moves the coordinate: ``|delta_jc|`` exceeds ``iso_ratio``
  times every other neighbour's ``|delta_lc|`` and ``iso_z`` robust units (needs >= 2 neighbours).

Optional refinement (``refine=True`` and an :class:`AggregationContext` with model and data), as
DAM does with its masks: soft masks ``s = sigmoid(logit)`` initialised from the heuristic mask are
optimised to minimise the prediction entropy of the merged model on the peer's own unlabelled data
plus ``adv_weight`` times the KL divergence between its predictions on clean inputs and on inputs
carrying a synthesised universal adversarial perturbation (a stand-in for an unknown trigger: a
backdoored merge reacts strongly to a small input pattern), plus ``keep_weight`` times the squared
distance to the heuristic mask; the refined mask is ``s > 0.5``.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch.func import functional_call

from dimat.align.batchnorm import from_second_moments

from .base import (
    AggregationContext,
    BaseAggregator,
    first_inputs,
    masked_weighted_mean,
)
from .robust import weighted_median

_MAD_TO_STD = 1.4826


class SafetyMaskAggregator(BaseAggregator):
    """Mask isolated, sign-disagreeing or extreme neighbour deltas, then average what is left.

    ``criteria`` selects which of ``"extreme"``, ``"sign"``, ``"isolated"`` are used. After a call,
    ``last_masked_share[j]`` is the share of neighbour j's aggregated coordinates that were masked.
    """

    name = "safety_mask"

    def __init__(
        self,
        z_max: float = 3.5,
        sign_z: float = 2.5,
        iso_ratio: float = 4.0,
        iso_z: float = 2.0,
        scale_floor: float = 1.0,
        criteria: tuple[str, ...] | list[str] = ("extreme", "sign", "isolated"),
        refine: bool = False,
        refine_steps: int = 20,
        refine_lr: float = 0.5,
        adv_eps: float = 1.0,
        adv_steps: int = 3,
        adv_weight: float = 1.0,
        keep_weight: float = 1.0,
        max_samples: int = 256,
    ) -> None:
        unknown = set(criteria) - {"extreme", "sign", "isolated"}
        if unknown:
            raise ValueError(f"unknown safety-mask criteria {sorted(unknown)}; use extreme, sign, isolated")
        for name, v in (("z_max", z_max), ("sign_z", sign_z), ("iso_ratio", iso_ratio), ("iso_z", iso_z)):
            if not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        if scale_floor < 0:
            raise ValueError(f"scale_floor must be >= 0, got {scale_floor}")
        self.z_max = z_max
        self.sign_z = sign_z
        self.iso_ratio = iso_ratio
        self.iso_z = iso_z
        self.scale_floor = scale_floor
        self.criteria = tuple(criteria)
        self.refine = refine
        self.refine_steps = refine_steps
        self.refine_lr = refine_lr
        self.adv_eps = adv_eps
        self.adv_steps = adv_steps
        self.adv_weight = adv_weight
        self.keep_weight = keep_weight
        self.max_samples = max_samples
        self.last_masked_share: list[float] = []

    @property
    def needs_context(self) -> bool:  # type: ignore[override]
        return self.refine

    # --- heuristic mask -----------------------------------------------------------------------
    def heuristic_keep(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Boolean ``(1 + k, *shape)``: True where a row's delta enters the merge (row 0 always)."""
        nb = deltas[1:]
        med = weighted_median(deltas, weights)
        dev = (deltas - med.unsqueeze(0)).abs()
        scale = _MAD_TO_STD * weighted_median(dev, weights)
        # a tensor-level floor: with 3-6 votes a coordinate's MAD is often near zero, which would
        # turn ordinary honest spread into huge z-scores
        floor = self.scale_floor * _MAD_TO_STD * nb.abs().flatten().median()
        tiny = torch.finfo(deltas.dtype).tiny
        scale = torch.maximum(scale, floor).clamp_min(tiny)
        z = dev[1:] / scale
        bad = torch.zeros_like(nb, dtype=torch.bool)
        if "extreme" in self.criteria:
            bad |= z > self.z_max
        if "sign" in self.criteria:
            cons = torch.sign(med)
            bad |= (torch.sign(nb) == -cons) & (cons != 0) & (z > self.sign_z)
        if "isolated" in self.criteria and nb.shape[0] >= 2:
            mag = nb.abs()
            top2 = mag.topk(2, dim=0).values
            is_top = mag == top2[0:1]
            others_max = torch.where(is_top, top2[1:2].expand_as(mag), top2[0:1].expand_as(mag))
            bad |= (mag > self.iso_ratio * others_max) & (mag > self.iso_z * scale)
        keep = torch.ones_like(deltas, dtype=torch.bool)
        keep[1:] = ~bad
        return keep

    def aggregate_deltas(
        self,
        deltas: dict[str, torch.Tensor],
        weights: torch.Tensor,
        own: Mapping[str, torch.Tensor],
        context: AggregationContext | None,
    ) -> dict[str, torch.Tensor]:
        keeps = {k: self.heuristic_keep(d, weights) for k, d in deltas.items()}
        if self.refine:
            if context is None or context.model is None or context.data is None:
                raise ValueError("safety_mask with refine=True needs an AggregationContext with model and data")
            keeps = self._refine(deltas, weights, own, keeps, context)
        k = weights.shape[0] - 1
        masked = torch.zeros(k, dtype=torch.float64)
        total = 0
        for key, keep in keeps.items():
            masked += (~keep[1:]).reshape(k, -1).sum(dim=1).double().cpu()
            total += keep[0].numel()
        self.last_masked_share = (masked / max(total, 1)).tolist()
        return {key: masked_weighted_mean(d, weights, keeps[key]) for key, d in deltas.items()}

    # --- DAM-style refinement -------------------------------------------------------------------
    def _refine(
        self,
        deltas: dict[str, torch.Tensor],
        weights: torch.Tensor,
        own: Mapping[str, torch.Tensor],
        keeps: dict[str, torch.Tensor],
        context: AggregationContext,
    ) -> dict[str, torch.Tensor]:
        model = context.model
        assert model is not None and context.data is not None
        device = torch.device(context.device)
        gen = torch.Generator(device="cpu").manual_seed(context.seed)
        x = first_inputs(context.data, self.max_samples).to(device=device, dtype=torch.float32)
        param_names = {n for n, _ in model.named_parameters()}
        learn = [k for k in deltas if k in param_names]
        if not learn:
            return keeps
        w = weights.to(device=device, dtype=torch.float32)
        d_dev = {k: deltas[k].to(device=device, dtype=torch.float32) for k in deltas}
        own_dev = {k: v.detach().to(device) for k, v in own.items()}
        # logit +-2 starts the soft mask at 0.88 / 0.12, close to the heuristic but still movable
        init = {k: keeps[k][1:].to(device=device, dtype=torch.float32) for k in learn}
        logits = {k: (init[k] * 4.0 - 2.0).requires_grad_(True) for k in learn}
        opt = torch.optim.Adam(list(logits.values()), lr=self.refine_lr)
        fixed = {k: masked_weighted_mean(d_dev[k], w, keeps[k].to(device)) + own_dev[k].float() for k in deltas if k not in logits}

        def merged_state() -> dict[str, torch.Tensor]:
            state: dict[str, torch.Tensor] = {}
            for k, v in own_dev.items():
                if k in logits:
                    s = torch.cat([torch.ones_like(logits[k][:1]), torch.sigmoid(logits[k])])
                    wv = w.view(-1, *([1] * (s.ndim - 1)))
                    state[k] = v.float() + (wv * s * d_dev[k]).sum(0) / (wv * s).sum(0)
                elif k in fixed:
                    state[k] = fixed[k].to(v.dtype)
                else:
                    state[k] = v
            # with merge.bn_stats=mixture the statistics arrive as second moments: run the model on variances
            return from_second_moments(state, context.moments) if context.moments else state

        was_training = model.training
        model.eval()
        try:
            for _ in range(self.refine_steps):
                state = merged_state()
                # synthesise a universal perturbation the current merge is most sensitive to
                u = ((torch.rand(x.shape[1:], generator=gen) * 2 - 1) * self.adv_eps * 0.1).to(device)
                with torch.no_grad():
                    p_clean = F.softmax(functional_call(model, {k: t.detach() for k, t in state.items()}, (x,)), dim=1)
                for _ in range(self.adv_steps):
                    u.requires_grad_(True)
                    logp_adv = F.log_softmax(functional_call(model, {k: t.detach() for k, t in state.items()}, (x + u,)), dim=1)
                    kl = F.kl_div(logp_adv, p_clean, reduction="batchmean")
                    (g,) = torch.autograd.grad(kl, u)
                    u = (u.detach() + self.adv_eps * 0.5 * g.sign()).clamp(-self.adv_eps, self.adv_eps)
                u = u.detach()
                out_clean = functional_call(model, state, (x,))
                logp = F.log_softmax(out_clean, dim=1)
                entropy = -(logp.exp() * logp).sum(dim=1).mean()
                logp_adv = F.log_softmax(functional_call(model, state, (x + u,)), dim=1)
                kl = F.kl_div(logp_adv, logp.exp(), reduction="batchmean")
                reg = sum(((torch.sigmoid(logits[k]) - init[k]) ** 2).mean() for k in learn) / len(learn)
                loss = entropy + self.adv_weight * kl + self.keep_weight * reg
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            model.train(was_training)
        out = dict(keeps)
        for k in learn:
            keep = torch.ones_like(keeps[k])
            keep[1:] = (logits[k].detach() > 0).to(keeps[k].device)
            out[k] = keep
        return out


__all__ = ["SafetyMaskAggregator"]
