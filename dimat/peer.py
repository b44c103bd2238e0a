"""One member of a federation: a model, its optimizer, its data and its random stream.

A :class:`Peer` is a trainer: model, optimizer, data, steps, evaluation, checkpoint. It knows
nothing of transports or of the algorithm: how it merges is its method's (:mod:`dimat.methods`),
which may also correct its steps (:attr:`Peer.before_step`). The same class therefore runs under
in-process simulation, gRPC and torchrun, for every method.

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
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dimat.align.permute import permute_state
from dimat.align.spec import get_spec
from dimat.config import TrainConfig
from dimat.merge.basis import BASIS_KEY, attach_basis, split_basis
from dimat.seeds import ALIGN_SAMPLE, TRAIN, derive_seed
from dimat.train.objective import LocalObjective
from dimat.typing import StateDict


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
    """A federation member: trains on its partition, evaluates, loads and relabels its model."""

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
        proxy: Any | None = None,
    ) -> None:
        """
        Args:
            peer_id: this peer's id in the federation.
            model: its model (moved to ``device``).
            train_data, val_data: its partition and local validation split (``(x, y)`` or a dataset).
            config: how it trains (:class:`dimat.config.TrainConfig`).
            seed: the run's seed; every random stream of the peer derives from it and the id
                (:func:`dimat.seeds.derive_seed`).
            device: where it trains.
            proxy: an explicit public proxy set (``merge.proxy_samples``) that replaces own data in
                every merge-time computation.
        """
        self.id = int(peer_id)
        #: which unit ordering the model is in (dimat.merge.basis): its own id, or a shared one (set by
        #: the builder for a shared init); adopted from a loaded state that carries a tag
        self.basis = self.id
        self.config = config
        self.device = torch.device(device)
        self.model = model.to(self.device)
        if BASIS_KEY in self.model.state_dict():
            raise ValueError(f"the model has a state entry named '{BASIS_KEY}', which dimat reserves for basis tags")
        self.x, self.y = as_tensors(train_data)
        if len(self.y) == 0:
            raise ValueError(f"peer {peer_id} has no training data")
        self.val = as_tensors(val_data) if val_data is not None and len(val_data) > 0 else None
        self._params = [q for q in self.model.parameters() if q.requires_grad]
        self.optimizer = build_optimizer(self._params, self.config)
        self.objective = LocalObjective(self.y, absent_logit_scale=self.config.absent_logit_scale,
                                        prox_mu=self.config.prox_mu)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(derive_seed(seed, TRAIN, self.id))
        # A fixed sample of own data for alignment statistics and BN reset: deterministic and
        # independent of the training stream, so merging never perturbs the shuffling state.
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(derive_seed(seed, ALIGN_SAMPLE, self.id)))
        self._align_idx = order[: self.config.align_batches * self.config.batch_size]
        self.proxy = as_tensors(proxy) if proxy is not None else None
        #: a method's gradient correction (``Method.before_step``), called after backward, before the step
        self.before_step: Callable[["Peer"], None] | None = None
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
            if self.before_step is not None:
                self.before_step(self)
            self.optimizer.step()
            total_loss += loss.item() * len(yb)
            correct += int((out.argmax(1) == yb).sum())
            seen += len(yb)
        # the gradients are the step's scratch space: a peer between rounds holds none (N peers x model)
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += int(steps)
        return {"loss": total_loss / max(seen, 1), "acc": correct / max(seen, 1), "steps": int(steps)}

    def set_lr(self, lr: float) -> None:
        """Use learning rate ``lr`` from the next step on (a round's rate, ``dimat.train.schedule``)."""
        for group in self.optimizer.param_groups:
            group["lr"] = float(lr)

    @property
    def lr(self) -> float:
        """The learning rate the next step uses."""
        return float(self.optimizer.param_groups[0]["lr"])

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
        """The model's state plus its basis tag (:mod:`dimat.merge.basis`): what a method sends by default."""
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

    def permute_units(self, perms: Mapping[str, torch.Tensor]) -> None:
        """Relabel this model's units by ``perms`` (per permutation group), optimizer state included.

        The function is unchanged, and so is the next optimizer step, up to the same permutation.
        """
        self.model.load_state_dict(permute_state(self.model.state_dict(), get_spec(self.model), perms))
        self.permute_optimizer_state(perms)

    def permute_optimizer_state(self, perms: Mapping[str, torch.Tensor]) -> None:
        """Relabel the optimizer's per-parameter buffers (momentum, Adam moments) by ``perms``."""
        spec = get_spec(self.model)
        names = {id(q): n for n, q in self.model.named_parameters()}
        for q in self._params:
            buffers = self.optimizer.state.get(q)
            for key, buf in list((buffers or {}).items()):
                if isinstance(buf, torch.Tensor) and buf.shape == q.shape:  # momentum, Adam moments
                    name = names[id(q)]
                    buffers[key] = permute_state({name: buf}, spec, perms, partial=True)[name]

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
