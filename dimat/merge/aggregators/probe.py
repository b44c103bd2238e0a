"""Probe trust: leave out a neighbour whose model one small input pattern sends to one class, round after round.

Why probing and not distances: under label skew honest neighbours differ as much from each other
in weight space as an attacker does (docs/safety.md measures Multi-Krum, the median and the
safety mask there), so any rule that compares neighbours' weights either keeps the backdoor or
drops the honest peers. A backdoor is defined by the function, not the weights: one small input
pattern (the trigger) sends most inputs to the attacker's target class. So each neighbour's model
(already aligned; its function does not depend on the unit order) is probed on the receiving
peer's own inputs:

1. find one universal perturbation ``delta`` (the same for every input, L2 norm at most
   ``budget`` times the inputs' mean L2 norm; ``steps`` of projected gradient descent on the log
   probability of the model's own clean prediction) that changes as many predictions as it can;
2. the *targeted flip rate*: the share of inputs that ``delta`` moves into the one class most
   perturbed inputs land in, from another class. A backdoored model scores near 1 with its target;
   honest models under label skew are brittle too, but they send foreign inputs to their own
   classes already (those do not count), their flips scatter and the class changes between merges.
3. history, per sender, in the peer's memory (checkpointed with it): an exponential moving
   average of the rate and of the one-hot target class; ``suspicion = rate * consistency``
   (the largest share of the target average). A sender whose suspicion exceeds ``threshold`` is
   left out of this merge (the others' weights renormalised, own always kept); it comes back
   when its suspicion decays below the threshold.

The combination of what is kept is the plain weighted mean, so on honest inputs that pass the
probe the result is exactly the mean. Cost: ``steps`` forward and backward passes of
``max_samples`` inputs per neighbour and merge.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call

from dimat.align.batchnorm import from_second_moments

from .base import AggregationContext, BaseAggregator, StateDict, first_inputs
from .mean import weighted_average


def targeted_flip_rate(model: torch.nn.Module, state: Mapping[str, torch.Tensor], x: torch.Tensor, *,
                       budget: float, steps: int) -> tuple[float, int]:
    """``(rate, target)``: how well one perturbation of L2 norm ``budget`` sends ``x`` to one class.

    Args:
        model: the architecture (run with ``state`` through ``torch.func.functional_call``, in eval mode).
        state: the model state to probe (running BatchNorm statistics as variances).
        x: a batch of inputs.
        budget: the perturbation's L2 norm bound, in the units of ``x``.
        steps: projected gradient steps.

    Example:
        >>> rate, target = targeted_flip_rate(model, model.state_dict(), x, budget=3.0, steps=20)
    """
    with torch.no_grad():
        clean = functional_call(model, state, (x,)).argmax(1)
    delta = torch.zeros_like(x[:1])
    step = 2.5 * budget / max(steps, 1)  # the usual PGD-L2 step: reaches the boundary in under half the steps
    for _ in range(steps):
        delta.requires_grad_(True)
        logp = F.log_softmax(functional_call(model, state, (x + delta,)), dim=1)
        loss = logp.gather(1, clean[:, None]).mean()  # lower: fewer inputs keep their clean prediction
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = delta - step * grad / grad.norm().clamp_min(1e-12)
            delta = delta * torch.clamp(budget / delta.norm().clamp_min(1e-12), max=1.0)
    with torch.no_grad():
        perturbed = functional_call(model, state, (x + delta.detach(),)).argmax(1)
    target = int(torch.bincount(perturbed).argmax())
    # moved there by the perturbation, out of all inputs: a model that already sends most foreign
    # inputs to its own classes (label skew) and flips among them scores low, a trigger does not
    rate = float(((clean != target) & (perturbed == target)).float().mean())
    return rate, target


class ProbeTrustAggregator(BaseAggregator):
    """Weighted mean over the neighbours whose probed history does not look like a backdoor.

    Args:
        budget: the probe's L2 bound as a share of the inputs' mean L2 norm.
        steps: projected gradient steps per probe.
        max_samples: own inputs the probe uses.
        decay: weight of the past in the per-sender moving averages (0: no history).
        threshold: suspicion above which a sender is left out.

    After a call, ``last_suspicion[j]`` is ``others[j]``'s suspicion and ``last_excluded`` the
    indices into ``others`` that were left out.
    """

    name = "probe_trust"
    needs_context = True
    needs_own_basis = False  # it probes each neighbour's function, which no unit order changes

    def __init__(self, budget: float = 0.5, steps: int = 20, max_samples: int = 128, decay: float = 0.5,
                 threshold: float = 0.8) -> None:
        if not budget > 0:
            raise ValueError(f"budget must be > 0, got {budget}")
        if steps < 1 or max_samples < 1:
            raise ValueError(f"steps and max_samples must be >= 1, got {steps} and {max_samples}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.budget, self.steps, self.max_samples = budget, steps, max_samples
        self.decay, self.threshold = decay, threshold
        self.last_suspicion: list[float] = []
        self.last_excluded: list[int] = []

    def aggregate_states(self, own: Mapping[str, torch.Tensor], others: Sequence[Mapping[str, torch.Tensor]],
                         weights: torch.Tensor, context: AggregationContext | None) -> StateDict:
        if context is None or context.model is None or context.data is None:
            raise ValueError("probe_trust needs an AggregationContext with the peer's model and data")
        senders = context.senders or tuple(range(len(others)))
        if len(senders) != len(others):
            raise ValueError(f"probe_trust: {len(senders)} sender ids for {len(others)} neighbour states")
        memory = context.memory if context.memory is not None else {}
        model, device = context.model, torch.device(context.device)
        x = first_inputs(context.data, self.max_samples).to(device=device, dtype=torch.float32)
        bound = self.budget * float(x.reshape(len(x), -1).norm(dim=1).mean())
        was_training = model.training
        model.eval()
        try:
            suspicion = []
            for sender, state in zip(senders, others):
                runnable = {k: v.to(device) for k, v in from_second_moments(state, context.moments).items()}
                rate, target = targeted_flip_rate(model, runnable, x, budget=bound, steps=self.steps)
                suspicion.append(self._remember(memory, int(sender), rate, target))
        finally:
            model.train(was_training)
        keep = torch.tensor([1.0] + [float(s <= self.threshold) for s in suspicion], dtype=torch.float64)
        self.last_suspicion = suspicion
        self.last_excluded = [j for j, s in enumerate(suspicion) if s > self.threshold]
        w = weights * keep
        return weighted_average(own, others, (w / w.sum()).tolist())

    def _remember(self, memory: dict[str, torch.Tensor], sender: int, rate: float, target: int) -> float:
        """Fold one probe into ``sender``'s moving averages; return its suspicion."""
        onehot = torch.zeros(max(target + 1, 1))
        onehot[target] = 1.0
        rate_key, target_key = f"rate@{sender}", f"target@{sender}"
        if rate_key in memory:
            past = memory[target_key]
            n = max(len(past), len(onehot))
            past, onehot = F.pad(past, (0, n - len(past))), F.pad(onehot, (0, n - len(onehot)))
            memory[rate_key] = self.decay * memory[rate_key] + (1 - self.decay) * rate
            memory[target_key] = self.decay * past + (1 - self.decay) * onehot
        else:
            memory[rate_key] = torch.tensor(rate)
            memory[target_key] = onehot
        return float(memory[rate_key] * memory[target_key].max())


__all__ = ["ProbeTrustAggregator", "targeted_flip_rate"]
