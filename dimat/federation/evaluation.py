"""The evaluation policy: which rounds evaluate, which peers, on how much of the test set.

Evaluating every peer on the whole global test set every round costs ``N x test size`` forward
passes a round, which at a few dozen peers already outweighs the round's training (the training
set is split among the peers, the test set is not). The policy (``eval:``) trims that:

* ``every``: only rounds divisible by it evaluate (and always the last);
* ``peers``: a seeded sample of that many peers, drawn afresh each round from the run's seed and
  the round number, so every process of a multi-process run picks the same sample without talking;
  ``auto`` (the default) takes as many as keep evaluation's forward passes (test samples x peers)
  within ``share`` of the round's training passes (training samples x 3: a forward and a backward
  that costs about two), so a round's time stays training's, and at least ``min_peers`` (5), so
  a small federation keeps its whole per-round curve. With 64 IID peers on MNIST-1D (3,600
  training samples a round, 1,000 test samples) that is 5 (the share alone would allow 2); with
  1,000 peers of 40 samples each, 27;
* ``test_samples``: a fixed seeded subsample of the test set, the same every round, so the curve
  compares like with like.

The last round of the run always evaluates every peer on the whole test set, so a run's final
figures never depend on the policy. Every record and round result says what was used
(``eval``: ``all`` / ``sample`` / ``none``, ``test_samples``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from dimat.config import EvalSettings
from dimat.seeds import EVALUATION, derive_seed

#: what a round's evaluation covered
ALL, SAMPLE, NONE = "all", "sample", "none"


@dataclass(frozen=True)
class EvalPlan:
    """One round's evaluation: the peers that evaluate and the test rows they evaluate on."""

    kind: str
    #: federation-wide ids of the peers that evaluate this round
    peers: frozenset[int]
    #: test rows used (None: the whole test set)
    test_rows: torch.Tensor | None
    test_samples: int

    def evaluates(self, peer_id: int) -> bool:
        return peer_id in self.peers


def sample_size(policy: EvalSettings, num_peers: int, test_samples: int, train_samples: float) -> int:
    """How many peers evaluate in a sampled round (``train_samples``: the round's, federation-wide)."""
    if policy.peers is None:
        return num_peers
    if policy.peers == "auto":
        k = int(policy.share * 3 * train_samples // max(test_samples, 1))
        return max(1, min(num_peers, max(k, policy.min_peers)))
    return min(num_peers, int(policy.peers))


def plan_round(policy: EvalSettings, round_idx: int, *, final: bool, num_peers: int, test_size: int,
               seed: int, train_samples: float = 0.0) -> EvalPlan:
    """The evaluation of round ``round_idx`` (``final``: the run's last round, always complete).

    ``train_samples`` is the number of samples the round trains on over the whole federation
    (what ``peers: auto`` weighs evaluation against).
    """
    everyone = frozenset(range(num_peers))
    if final:
        return EvalPlan(ALL, everyone, None, test_size)
    if round_idx % policy.every != 0:
        return EvalPlan(NONE, frozenset(), None, 0)
    rows = None
    if policy.test_samples is not None and policy.test_samples < test_size:
        # one subsample for the whole run (from the run seed only): rounds stay comparable
        order = torch.randperm(test_size, generator=torch.Generator().manual_seed(derive_seed(seed, EVALUATION, "test-rows")))
        rows = order[: policy.test_samples].sort().values
    n_test = test_size if rows is None else len(rows)
    peers = everyone
    k = sample_size(policy, num_peers, n_test, train_samples)
    if k < num_peers:
        # seeded by (run seed, round): the same sample in every process, a different one each round
        rng = np.random.default_rng(derive_seed(seed, EVALUATION, int(round_idx)))
        peers = frozenset(int(i) for i in rng.choice(num_peers, size=k, replace=False))
    kind = ALL if len(peers) == num_peers and rows is None else SAMPLE
    return EvalPlan(kind, peers, rows, n_test)


__all__ = ["ALL", "SAMPLE", "NONE", "EvalPlan", "plan_round", "sample_size"]


def same_models(models: Mapping[int, torch.nn.Module]) -> dict[int, int]:
    """``{peer: the first peer (in the given order) whose model equals this one's exactly}``.

    Every tensor of the state (weights and BatchNorm buffers) equal: the model computes the same
    function, so a test set scored once serves each of them. After a plain average over the whole
    graph every peer holds the same model, so a round evaluates one where it evaluated N (the last
    round, every peer on the whole test set, most of all). Peers are grouped by a cheap fingerprint
    first, then compared tensor by tensor, so distinct models cost one fingerprint each.

    Example:
        >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        >>> b.load_state_dict(a.state_dict())
        <All keys matched successfully>
        >>> same_models({0: a, 1: b, 2: torch.nn.Linear(2, 1)})
        {0: 0, 1: 0, 2: 2}
    """
    groups: dict[tuple, list[tuple[int, list[torch.Tensor]]]] = {}
    out: dict[int, int] = {}
    for pid, model in models.items():
        tensors = [t.detach() for t in model.state_dict().values()]
        floats = [t for t in tensors if torch.is_floating_point(t)]
        key = (len(tensors), *(float(t.double().sum()) for t in floats[:1] + floats[-1:]))
        for rep, rep_tensors in groups.setdefault(key, []):
            if len(rep_tensors) == len(tensors) and all(
                    a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(tensors, rep_tensors)):
                out[pid] = rep
                break
        else:
            groups[key].append((pid, tensors))
            out[pid] = pid
    return out
