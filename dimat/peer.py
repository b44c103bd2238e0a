"""One member of a federation: a model, its optimizer, its data and its random stream.

A :class:`Peer` knows nothing of transports: the round loop hands it what arrived and its row of the
topology's mixing weights, and it trains, merges (renormalising that row over the senders that
arrived, by the topology's rule) and evaluates. The same class therefore runs under
in-process simulation, gRPC and torchrun.

Batching is done directly on tensors with the peer's own ``torch.Generator`` rather than through a
``DataLoader``: it is faster for the small data sets peers hold, and the shuffling state is one
tensor that a checkpoint can save exactly (so a resumed run is bit-identical to an uninterrupted one).

After merged weights are loaded the optimizer state (SGD momentum, Adam moments) is **reset** by
default: DIMAT's reference implementation restarts the optimizer each round. With
``merge.keep_momentum`` it is kept, which frequent merging needs (a restart every few steps
throws momentum away); alignment permutes only the neighbours, so the own momentum stays in the
own unit order, and when the merged model is relabelled into another basis the momentum is
permuted with it (:meth:`Peer.permute_units`). Consensus SGD (``gossip``) always keeps it.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dimat.config import TrainConfig
from dimat.train.objective import LocalObjective
from dimat.merge.basis import BASIS_KEY, attach_basis, plan_rebase, split_basis
from dimat.topology.membership import renormalise

StateDict = dict[str, torch.Tensor]

MERGE_METHODS = ("dimat", "weight_matching", "average")


def as_tensors(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(inputs, labels)`` tensors from a TensorDataset, an ``(x, y)`` pair or a dataset of pairs."""
    if hasattr(data, "tensors"):
        x, y = data.tensors[0], data.tensors[1]
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    else:
        pairs = [data[i] for i in range(len(data))]
        x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        y = torch.as_tensor([int(p[1]) for p in pairs])
    return x.float() if not x.is_floating_point() else x, y.long()


def batch_slices(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each batch when ``n`` samples are cut into batches of ``batch_size``.

    The last, smaller batch is kept (every sample is seen), except that a last batch of a single
    sample joins the batch before it: BatchNorm cannot normalise one sample in training mode
    (``Expected more than 1 value per channel``). Other sizes are cut exactly as before.
    """
    bounds = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if batch_size > 1 and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def build_optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum (default), Adam or AdamW, from a :class:`TrainConfig`."""
    name = cfg.optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (expected sgd, adam or adamw)")


def _own_copy(obj: Any) -> Any:
    """A deep copy whose tensors own just their elements (``copy.deepcopy`` of a view copies the
    whole storage it views: a stacked executor's optimizer rows would copy every peer's)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _own_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_own_copy(v) for v in obj)
    return copy.deepcopy(obj)


class Peer:
    """A federation member: trains on its partition, evaluates, and merges neighbours into itself."""

    def __init__(
        self,
        peer_id: int,
        model: nn.Module,
        train_data: Any,
        val_data: Any | None = None,
        *,
        config: TrainConfig,
        seed: int = 0,
        device: str | torch.device = "cpu",
        merge_method: str = "dimat",
        bn_stats: str = "own",
        aggregator: Any | None = None,
        basis: int | None = None,
        consensus_basis: bool = True,
        proxy: Any | None = None,
        rebase: str = "after",
    ) -> None:
        self.id = int(peer_id)
        # which unit ordering the model is in (dimat.merge.basis): own id, or a shared one (shared init)
        self.basis = self.id if basis is None else int(basis)
        self.consensus_basis = bool(consensus_basis)
        self.rebase = rebase  # merge.rebase: when a peer joins a lower basis (dimat.merge.basis)
        self.config = config
        self.device = torch.device(device)
        self.model = model.to(self.device)
        if BASIS_KEY in self.model.state_dict():
            raise ValueError(f"the model has a state entry named '{BASIS_KEY}', which dimat reserves for basis tags")
        self.x, self.y = as_tensors(train_data)
        if len(self.y) == 0:
            raise ValueError(f"peer {peer_id} has no training data")
        self.val = as_tensors(val_data) if val_data is not None and len(val_data) > 0 else None
        self.merge_method = merge_method
        self.bn_stats = bn_stats  # dimat.merge.BN_STATS: what a merge does with BatchNorm statistics
        self.aggregator = aggregator
        self._params = [q for q in self.model.parameters() if q.requires_grad]
        self.optimizer = build_optimizer(self._params, self.config)
        self.objective = LocalObjective(self.y, absent_logit_scale=self.config.absent_logit_scale,
                                        prox_mu=self.config.prox_mu)
        self.seed = int(seed)  # the run's seed for this peer: every random stream of the peer derives from it
        self.generator = torch.Generator().manual_seed(int(seed))
        # A fixed sample of own data for alignment statistics and BN reset: deterministic and
        # independent of the training stream, so merging never perturbs the shuffling state.
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(int(seed) + 7919))
        self._align_idx = order[: self.config.align_batches * self.config.batch_size]
        # an explicit public proxy set (merge.proxy_samples) replaces own data in every merge-time computation
        self.proxy = as_tensors(proxy) if proxy is not None else None
        self._perm = torch.empty(0, dtype=torch.long)  # current epoch's order
        self._cursor = 0
        self.steps_done = 0

    # ----------------------------------------------------------------- training
    @property
    def num_samples(self) -> int:
        return len(self.y)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch (:func:`batch_slices`: every sample is seen each epoch, no 1-sample batch)."""
        return len(batch_slices(len(self.y), self.config.batch_size))

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cursor >= len(self._perm):
            self._perm = torch.randperm(len(self.y), generator=self.generator)
            self._cursor = 0
        end = self._cursor + self.config.batch_size
        if self.config.batch_size > 1 and len(self._perm) - end == 1:
            end += 1  # the epoch's last sample joins this batch (batch_slices)
        idx = self._perm[self._cursor : end]
        self._cursor += len(idx)
        return self.x[idx].to(self.device), self.y[idx].to(self.device)

    def train_steps(self, steps: int) -> dict[str, float]:
        """Run ``steps`` SGD steps, continuing the current epoch's order; returns mean loss and accuracy."""
        self.model.train()
        total_loss, correct, seen = 0.0, 0, 0
        for _ in range(int(steps)):
            xb, yb = self._next_batch()
            self.optimizer.zero_grad(set_to_none=True)
            out = self.model(xb)
            loss = self.objective(out, yb, self._params)
            loss.backward()
            self.optimizer.step()
            total_loss += loss.item() * len(yb)
            correct += int((out.argmax(1) == yb).sum())
            seen += len(yb)
        # the gradients are the step's scratch space: a peer between rounds holds none (N peers x model)
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += int(steps)
        return {"loss": total_loss / max(seen, 1), "acc": correct / max(seen, 1), "steps": int(steps)}

    def start_round(self) -> None:
        """Local training of a round begins (the proximal term's anchor is the model now)."""
        self.objective.start_round(self._params)

    def train(self, epochs: float | None = None, *, steps: int | None = None) -> dict[str, float]:
        """Start a round and train ``steps`` SGD steps, or ``epochs`` passes over the local partition.

        Fractions of an epoch round to whole batches.
        """
        if (epochs is None) == (steps is None):
            raise ValueError("give epochs or steps")
        self.start_round()
        return self.train_steps(round(epochs * self.steps_per_epoch) if steps is None else int(steps))

    # --------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, data: Any) -> dict[str, float]:
        """Accuracy and mean cross-entropy on ``data`` (a TensorDataset, ``(x, y)`` pair or dataset)."""
        x, y = as_tensors(data)
        self.model.eval()
        loss, correct = 0.0, 0
        bs = self.config.eval_batch_size
        for i in range(0, len(y), bs):
            xb, yb = x[i : i + bs].to(self.device), y[i : i + bs].to(self.device)
            out = self.model(xb)
            loss += float(F.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
        n = max(len(y), 1)
        return {"acc": correct / n, "loss": loss / n}

    def evaluate_val(self) -> dict[str, float] | None:
        """Evaluate on the peer's local validation split, if it has one."""
        return self.evaluate(self.val) if self.val is not None else None

    # ------------------------------------------------------------------ merging
    def state(self) -> StateDict:
        """A detached CPU copy of the model's state dict (safe to send and to keep)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def shared_state(self) -> StateDict:
        """What this peer sends: :meth:`state` plus its basis tag (:mod:`dimat.merge.basis`)."""
        return attach_basis(self.state(), self.basis)

    def alignment_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The data merging sees (activation statistics, BatchNorm reset, a defence's checks).

        The bounded own-data sample, or the public proxy set when one is configured.
        """
        if self.proxy is not None:
            x, y = self.proxy
            return [(x[a:b].to(self.device), y[a:b].to(self.device)) for a, b in batch_slices(len(y), self.config.batch_size)]
        return [
            (self.x[self._align_idx[a:b]].to(self.device), self.y[self._align_idx[a:b]].to(self.device))
            for a, b in batch_slices(len(self._align_idx), self.config.batch_size)
        ]

    def load_state(self, state: Mapping[str, torch.Tensor], reset_optimizer: bool = True) -> None:
        """Load weights (a basis tag in ``state`` is adopted); by default restart the optimizer.

        See the module docstring for why the optimizer restarts.
        """
        state, basis = split_basis(state)
        self.model.load_state_dict({k: v.to(self.device) for k, v in state.items()})
        if basis is not None:
            self.basis = basis
        if reset_optimizer:
            self.reset_optimizer()

    def reset_optimizer(self) -> None:
        """Forget momentum / moment estimates (learning rate and hyper-parameters are kept)."""
        self.optimizer.state.clear()

    def merge(
        self,
        neighbour_states: Mapping[int, Mapping[str, torch.Tensor]],
        weights: Mapping[int, float],
        *,
        method: str | None = None,
        bn_stats: str | None = None,
        reset_optimizer: bool = True,
        shared: Any | None = None,
    ) -> StateDict:
        """Align ``neighbour_states`` to this model, combine with ``weights`` and load the result.

        ``weights`` is this peer's raw row of the topology, ``{peer id: weight}`` with ``self.id``,
        possibly naming neighbours that did not arrive. It is renormalised here, once, by the
        topology's rule (`dimat.topology.membership.renormalise`) over self and the senders present
        in both, so a neighbour that missed the deadline simply does not count. A state may carry a
        basis tag (what :meth:`shared_state` sends); the merged basis is adopted. With no sender to
        merge, nothing changes (not even the optimizer) and own state is returned. Returns the
        merged state. ``shared`` (a :class:`dimat.federation.shared_merge.SharedMerges`) serves a
        plain average that other peers of the exchange share from one computation.
        """
        from dimat.merge import merge_states  # imported lazily: the merge engine is heavy

        method = method or self.merge_method
        bn_stats = self.bn_stats if bn_stats is None else bn_stats
        w = renormalise(weights, neighbour_states, self_id=self.id)
        senders = sorted(j for j in w if j != self.id)
        split = [split_basis(neighbour_states[j], label=f"peer {self.id}: state from peer {j}") for j in senders]
        if not split:
            return self.state()
        states = [s for s, _ in split]
        same, into, new_basis = None, None, self.basis
        batches = self.alignment_batches()
        if self.consensus_basis and method != "average" and self.rebase == "before":
            self._join_lowest_basis(states, [t for _, t in split], batches, method)
            keep = [k for k, (_, t) in enumerate(split) if t == self.basis]  # the others join later
            senders, states = [senders[k] for k in keep], [states[k] for k in keep]
            w = renormalise(weights, senders, self_id=self.id)
            if not senders:
                return self.state()
            same, new_basis = [True] * len(states), self.basis
        elif self.consensus_basis and method != "average":
            same, into, new_basis = plan_rebase(self.basis, [t for _, t in split])
        context = None
        if getattr(self.aggregator, "needs_context", False):
            from dimat.merge.aggregators import AggregationContext

            # a defence that looks at predictions (safety-mask refinement) gets own model and data
            context = AggregationContext(model=self.model, data=batches, device=self.device,
                                         seed=self.aggregation_seed())
        relabel: dict[str, torch.Tensor] = {}
        # rebase=before has relabelled the own model: it is no longer the state the others received
        if (shared is not None and context is None and self.rebase != "before"
                and shared.applies(self.aggregator, method, same, into)):
            merged = shared.merge(self.model, self.id, dict(zip(senders, states)), w, bn_stats=bn_stats, data=batches)
        else:
            merged = merge_states(
                self.model, states, [w.get(self.id, 0.0)] + [w[j] for j in senders], batches, method=method,
                bn_stats=bn_stats, aggregator=self.aggregator, context=context, same_basis=same, into=into,
                relabel=relabel,
            )
        self.load_state(merged, reset_optimizer=reset_optimizer)
        if relabel and not reset_optimizer:
            self._permute_optimizer_state(relabel)  # kept momentum follows its units into the new basis
        self.basis = new_basis
        return merged

    def _join_lowest_basis(self, states: list, tags: list, batches: list, method: str) -> None:
        """``merge.rebase=before``: relabel the own model into the lowest-tagged neighbour's basis.

        One matching (the neighbour's model onto own, on the data merging sees), applied inversely to
        the own model and its momentum: the function is unchanged. Every model thus enters the
        common basis through the permutation its own peer found, so merged models agree across
        peers; with ``after`` each peer re-matches every neighbour and the results disagree.
        """
        from dimat.align.api import find_permutations, spec_for
        from dimat.align.permute import invert
        from dimat.merge.api import METHODS as ALIGNMENT
        from dimat.merge.scratch import working_copy

        lower = [(t, k) for k, t in enumerate(tags) if t is not None and t < self.basis]
        if not lower:
            return
        tag, k = min(lower)
        spec, batches = spec_for(self.model, batches)
        other = working_copy(self.model, 0)  # the merge's pooled copy; free again once matching returns
        other.load_state_dict(states[k])
        found = find_permutations(self.model, [other], batches, ALIGNMENT[method], spec)[0]
        self.permute_units({g: invert(p) for g, p in found.items()})
        self.basis = tag

    def permute_units(self, perms: Mapping[str, torch.Tensor]) -> None:
        """Relabel this model's units by ``perms`` (per permutation group), optimizer state included.

        The function is unchanged, and so is the next optimizer step, up to the same permutation.
        """
        from dimat.align.permute import permute_state
        from dimat.align.spec import get_spec

        self.model.load_state_dict(permute_state(self.model.state_dict(), get_spec(self.model), perms))
        self._permute_optimizer_state(perms)

    def _permute_optimizer_state(self, perms: Mapping[str, torch.Tensor]) -> None:
        from dimat.align.permute import permute_state
        from dimat.align.spec import get_spec

        spec = get_spec(self.model)
        names = {id(q): n for n, q in self.model.named_parameters()}
        for q in self._params:
            buffers = self.optimizer.state.get(q)
            for key, buf in list((buffers or {}).items()):
                if isinstance(buf, torch.Tensor) and buf.shape == q.shape:  # momentum, Adam moments
                    name = names[id(q)]
                    buffers[key] = permute_state({name: buf}, spec, perms, partial=True)[name]

    def aggregation_seed(self) -> int:
        """The seed a randomised defence gets for this merge: from the run seed, id and steps done.

        Mixed by ``SeedSequence`` so runs with nearby seeds do not share streams shifted by a few steps.
        """
        entropy = [self.seed % 2**64, self.id, self.steps_done]  # SeedSequence takes non-negative ints
        return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])

    # -------------------------------------------------------------- checkpoints
    def checkpoint(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimizer, RNG and shuffling position."""
        return {
            "peer": self.id,
            "model": self.state(),
            "optimizer": _own_copy(self.optimizer.state_dict()),  # buffers are live tensors
            "generator": self.generator.get_state(),
            "perm": self._perm.clone(),
            "cursor": self._cursor,
            "steps_done": self.steps_done,
            "basis": self.basis,
        }

    def restore(self, ckpt: Mapping[str, Any]) -> None:
        """Inverse of :meth:`checkpoint`."""
        if int(ckpt["peer"]) != self.id:
            raise ValueError(f"checkpoint belongs to peer {ckpt['peer']}, not peer {self.id}")
        self.model.load_state_dict({k: v.to(self.device) for k, v in ckpt["model"].items()})
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.generator.set_state(ckpt["generator"])
        self._perm = ckpt["perm"].clone()
        self._cursor = int(ckpt["cursor"])
        self.steps_done = int(ckpt["steps_done"])
        self.basis = int(ckpt.get("basis", self.basis))
