"""Vectorised execution: many same-architecture peers trained and evaluated as one stacked computation.

Per-peer execution pays Python and kernel-dispatch overhead for every small step of every peer; at
a thousand peers with a few dozen samples each that overhead is the round. Here the peers'
parameters live in one stacked tensor per parameter name (``[N, *shape]``), each peer's model
parameters are views of its row (so they are held once, and everything that works on a peer's
model, merging, checkpoints, evaluation, sees the stacked values), and one step of every peer is
``torch.func.vmap`` of ``functional_call`` over the stack. Each peer keeps what makes it itself:

* its data order: every batch comes from ``Peer._next_batch`` (its own generator and cursor);
* its optimizer state: SGD momentum is a stacked buffer whose rows are the peers' own
  ``optimizer.state`` entries (views; a peer whose optimizer was reset, permuted or restored is
  re-read before the next step); the update is torch's SGD arithmetic, in torch's order;
* its BatchNorm statistics: buffers stay per peer and are stacked for the duration of a call.

Peers whose current batch sizes differ (the last batch of an epoch) step in separate groups. The
results equal the per-peer path within float tolerance (a grouped convolution sums in another
order); ``tests/test_stacked.py`` checks that for every built-in model, with and without BatchNorm.

Covered: training with SGD (momentum, Nesterov, weight decay) and the plain cross-entropy
objective, and evaluation on a common test set. Not covered (those peers, or those steps, take the
per-peer path): Adam/AdamW (per-peer step counts), FedRS/FedProx objectives, alignment
statistics and the BatchNorm reset inside a merge.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from dimat.typing import StateDict


def _architecture(model: nn.Module) -> tuple:
    state = tuple((k, tuple(v.shape), v.dtype, str(v.device)) for k, v in model.state_dict().items())
    return type(model), repr(model), state


def stackable(peer: Any) -> str | None:
    """Why ``peer`` cannot be trained stacked (None: it can)."""
    cfg = peer.config
    if cfg.optimizer.lower() != "sgd":
        return f"optimizer {cfg.optimizer} (per-peer step counts)"
    if cfg.absent_logit_scale < 1.0 or cfg.prox_mu > 0:
        return "a FedRS/FedProx objective"
    if any(q.requires_grad is False for q in peer.model.parameters()):
        return "frozen parameters"
    if peer.before_step is not None:
        return "a method's per-step gradient correction"
    return None


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, leaf = name.split(".")
    mod = model
    for p in path:
        mod = getattr(mod, p)
    return mod, leaf


class StackedPeers:
    """Peers of one architecture whose parameters are rows of stacked tensors (see the module docstring)."""

    def __init__(self, peers: Sequence[Any], chunk: int | None = None) -> None:
        if not peers:
            raise ValueError("StackedPeers needs at least one peer")
        ref = peers[0]
        arch = _architecture(ref.model)
        for p in peers:
            why = stackable(p)
            if why is not None:
                raise ValueError(f"peer {p.id} cannot be stacked: {why}")
            if _architecture(p.model) != arch or p.device != ref.device or p.config != ref.config:
                raise ValueError(f"peer {p.id} differs from peer {ref.id} in architecture, device or training config")
        self.peers = list(peers)
        #: peers per stacked call: a call holds every one of its peers' activations for the backward
        self.chunk = max(1, int(chunk)) if chunk else len(self.peers)
        self.index = {p.id: i for i, p in enumerate(self.peers)}
        self.config = ref.config
        self.names = [n for n, _ in ref.model.named_parameters()]
        self.buffer_names = [n for n, _ in ref.model.named_buffers()]
        # a stateless skeleton: functional_call supplies every parameter and buffer
        self.skeleton = copy.deepcopy(ref.model).to("meta")
        with torch.no_grad():
            self.params = {n: torch.stack([dict(p.model.named_parameters())[n].detach() for p in self.peers])
                           for n in self.names}
        self.momentum = {n: torch.zeros_like(t) for n, t in self.params.items()} if self.config.momentum else {}
        for i, p in enumerate(self.peers):
            self._bind(p, i)

    # ------------------------------------------------------------------ storage
    def _bind(self, peer: Any, i: int) -> None:
        """Make ``peer``'s parameters views of row ``i`` (its optimizer is rebuilt on them)."""
        from dimat.peer import build_optimizer

        for n in self.names:
            mod, leaf = _owner(peer.model, n)
            mod._parameters[leaf] = nn.Parameter(self.params[n][i], requires_grad=True)
        peer._params = [q for q in peer.model.parameters() if q.requires_grad]
        old = peer.optimizer.state_dict()
        peer.optimizer = build_optimizer(peer._params, peer.config)
        if old.get("state"):
            peer.optimizer.load_state_dict(old)  # momentum of a restored peer: read at the next step

    def _sync_in(self, rows: list[int]) -> None:
        """Before a call: re-read whatever per-peer code changed (replaced parameters, optimizer state)."""
        for i in rows:
            peer = self.peers[i]
            named = dict(peer.model.named_parameters())
            if any(named[n].data_ptr() != self.params[n][i].data_ptr() for n in self.names):
                with torch.no_grad():
                    for n in self.names:
                        self.params[n][i].copy_(named[n].detach())
                self._bind(peer, i)
                named = dict(peer.model.named_parameters())
            if not self.momentum:
                continue
            for n in self.names:
                q = named[n]
                buf = peer.optimizer.state.get(q, {}).get("momentum_buffer")
                row = self.momentum[n][i]
                if buf is None:
                    row.zero_()  # a fresh SGD's first step: buf = grad, which 0 * momentum + grad equals
                elif buf.data_ptr() != row.data_ptr():
                    row.copy_(buf)
                peer.optimizer.state[q] = {"momentum_buffer": row}

    def _buffers(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return {n: torch.stack([dict(self.peers[i].model.named_buffers())[n] for i in rows]) for n in self.buffer_names}

    def _buffers_out(self, rows: list[int], stacked: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, i in enumerate(rows):
                own = dict(self.peers[i].model.named_buffers())
                for n in self.buffer_names:
                    own[n].copy_(stacked[n][k])

    def _forward(self, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor], x: torch.Tensor,
                 shared_input: bool = False) -> torch.Tensor:
        def one(p: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], xx: torch.Tensor) -> torch.Tensor:
            return functional_call(self.skeleton, (p, b), (xx,))

        return vmap(one, in_dims=(0, 0, None if shared_input else 0))(dict(params), dict(buffers), x)

    # ----------------------------------------------------------------- training
    def train_steps(self, steps: Mapping[int, int]) -> dict[int, dict[str, float]]:
        """``steps[peer id]`` SGD steps for each listed peer, all peers' step ``s`` as one computation."""
        rows = [self.index[pid] for pid in steps]
        self._sync_in(rows)
        todo = {self.index[pid]: int(k) for pid, k in steps.items()}
        stats = {i: [0.0, 0, 0] for i in todo}  # loss x samples, correct, samples
        self.skeleton.train()
        buffers = self._buffers(rows)
        pos = {i: k for k, i in enumerate(rows)}
        for s in range(max(todo.values(), default=0)):
            batches: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
            for i, k in todo.items():
                if s < k:
                    xb, yb = self.peers[i]._next_batch()
                    batches.setdefault(len(yb), []).append((i, xb, yb))
            for group in batches.values():
                for c in range(0, len(group), self.chunk):
                    self._step(group[c : c + self.chunk], buffers, pos, stats)
        self._buffers_out(rows, buffers)
        out = {}
        for i, k in todo.items():
            peer = self.peers[i]
            peer.steps_done += k
            loss, correct, seen = stats[i]
            out[peer.id] = {"loss": loss / max(seen, 1), "acc": correct / max(seen, 1), "steps": k}
        return out

    def _step(self, group: list[tuple[int, torch.Tensor, torch.Tensor]], buffers: dict[str, torch.Tensor],
              pos: Mapping[int, int], stats: dict[int, list]) -> None:
        rows = [i for i, _, _ in group]
        whole = len(rows) == len(pos) and all(pos[i] == k for k, i in enumerate(rows))
        sel = None if whole else torch.tensor(rows)
        bsel = None if whole else torch.tensor([pos[i] for i in rows])
        x = torch.stack([xb for _, xb, _ in group])
        y = torch.stack([yb for _, _, yb in group])
        leaves = {n: (t if sel is None else t[sel]).detach().requires_grad_() for n, t in self.params.items()}
        buf = buffers if bsel is None else {n: t[bsel] for n, t in buffers.items()}
        out = self._forward(leaves, buf, x)
        g, b, c = out.shape
        per = F.cross_entropy(out.reshape(g * b, c), y.reshape(-1), reduction="none").view(g, b).mean(1)
        grads = torch.autograd.grad(per.sum(), list(leaves.values()))
        if bsel is not None:
            with torch.no_grad():
                for n, t in buf.items():  # the group's BatchNorm statistics back into the call's stack
                    buffers[n][bsel] = t
        with torch.no_grad():
            correct = (out.argmax(-1) == y).sum(1)
            for k, i in enumerate(rows):
                st = stats[i]
                st[0] += float(per[k]) * b
                st[1] += int(correct[k])
                st[2] += b
            self._sgd(sel, dict(zip(leaves, grads)))

    @torch.no_grad()
    def _sgd(self, sel: torch.Tensor | None, grads: Mapping[str, torch.Tensor]) -> None:
        """torch.optim.SGD's arithmetic (foreach order, dampening 0) on the stacked rows ``sel``."""
        cfg = self.config
        nesterov = cfg.nesterov and cfg.momentum > 0
        for n, grad in grads.items():
            p = self.params[n] if sel is None else self.params[n][sel]
            d = grad if cfg.weight_decay == 0 else grad.add(p, alpha=cfg.weight_decay)
            if cfg.momentum:
                m = self.momentum[n] if sel is None else self.momentum[n][sel]
                m.mul_(cfg.momentum).add_(d)
                d = d.add(m, alpha=cfg.momentum) if nesterov else m
                if sel is not None:
                    self.momentum[n][sel] = m
            # every peer of a round shares the round's rate (train.lr_schedule): the first one's is theirs
            p.add_(d, alpha=-self.peers[0].lr)
            if sel is not None:
                self.params[n][sel] = p

    # --------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, peer_ids: Sequence[int], data: tuple[torch.Tensor, torch.Tensor]) -> dict[int, dict[str, float]]:
        """Accuracy and mean cross-entropy of each listed peer on the same ``data`` (``Peer.evaluate``)."""
        x, y = data
        rows = [self.index[pid] for pid in peer_ids]
        self._sync_in(rows)
        self.skeleton.eval()
        out: dict[int, dict[str, float]] = {}
        bs = self.config.eval_batch_size
        device = self.peers[0].device
        for c0 in range(0, len(rows), self.chunk):
            part = rows[c0 : c0 + self.chunk]
            sel = torch.tensor(part)
            params = {n: t[sel] for n, t in self.params.items()}
            buffers = self._buffers(part)
            loss = torch.zeros(len(part), dtype=torch.float64)
            correct = torch.zeros(len(part), dtype=torch.long)
            for i in range(0, len(y), bs):
                xb, yb = x[i : i + bs].to(device), y[i : i + bs].to(device)
                logits = self._forward(params, buffers, xb, shared_input=True)
                g, b, c = logits.shape
                loss += F.cross_entropy(logits.reshape(g * b, c), yb.repeat(g), reduction="none").view(g, b).sum(1).double().cpu()
                correct += (logits.argmax(-1) == yb).sum(1).cpu()
            n = max(len(y), 1)
            for k, i in enumerate(part):
                out[self.peers[i].id] = {"acc": int(correct[k]) / n, "loss": float(loss[k]) / n}
        return out


def stack_peers(peers: Mapping[int, Any], chunk: int | None = None) -> StackedPeers | None:
    """A :class:`StackedPeers` for ``peers`` if they can all be stacked together, else None."""
    group = list(peers.values())
    if len(group) < 2 or any(stackable(p) is not None for p in group):
        return None
    try:
        return StackedPeers(group, chunk)
    except ValueError:
        return None


__all__ = ["StackedPeers", "stack_peers", "stackable"]
