"""Wiring attacks into a federation: which peers are malicious, what they do, what honest peers suffer.

Config (``cfg.attack``, see ``configs/attack/*.yaml``)::

    malicious: [0]          # peer ids; [] or a missing group = no attack
    trigger: badnets        # badnets | blended
    trigger_kwargs: {}      # e.g. {value: 3.0, size: 4} or {alpha: 0.2, seed: 0}
    target_class: 0
    poison_rate: 0.3        # share of the malicious peer's non-target samples poisoned
    scale: 1.0              # model replacement: send base + scale * (trained - base); 1 = off
    seed: 0

A malicious peer poisons its own partition once, at build time (deterministic from the config, so
resumed runs see the same data), trains like everyone else and, with ``scale != 1``, scales the
delta of this round's local training before sending. Every peer is evaluated on the clean test
set (``clean_acc``) and on the triggered non-target test inputs (``asr``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from dimat.confutil import plain as _plain

from dimat.attacks.metrics import attack_success_rate
from dimat.attacks.poison import poison_dataset, scale_update
from dimat.attacks.triggers import Trigger, build_trigger

StateDict = dict[str, torch.Tensor]


@dataclass
class Attack:
    """A configured attack on a federation of ``num_peers`` peers."""

    malicious: list[int]
    trigger: Trigger
    target_class: int
    poison_rate: float
    scale: float = 1.0
    seed: int = 0
    trigger_name: str = "badnets"
    _base: dict[int, StateDict] = field(default_factory=dict, repr=False)

    def is_malicious(self, peer_id: int) -> bool:
        return int(peer_id) in self.malicious

    def poison_peers(self, peers: Mapping[int, Any]) -> dict[int, int]:
        """Poison the training tensors (``peer.x``, ``peer.y``) of the malicious peers hosted here.

        Returns ``{peer_id: number of poisoned samples}``.
        """
        counts = {}
        for pid, peer in peers.items():
            if self.is_malicious(pid):
                peer.x, peer.y, idx = poison_dataset(
                    peer.x, peer.y, self.trigger, self.target_class, self.poison_rate, seed=self.seed + 7 * int(pid)
                )
                counts[int(pid)] = len(idx)
        return counts

    def before_training(self, peers: Mapping[int, Any]) -> None:
        """Remember the malicious peers' pre-training weights (the base for model replacement)."""
        if self.scale == 1.0:
            return
        self._base = {pid: p.state() for pid, p in peers.items() if self.is_malicious(pid)}

    def outgoing(self, states: Mapping[int, StateDict]) -> dict[int, StateDict]:
        """What each local peer sends: malicious peers' states scaled for model replacement."""
        out = dict(states)
        if self.scale == 1.0:
            return out
        for pid, st in states.items():
            if self.is_malicious(pid) and pid in self._base:
                out[pid] = scale_update(st, self._base[pid], self.scale)
        return out

    def evaluate(self, model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
        """ASR of ``model`` on the triggered non-target test inputs."""
        return attack_success_rate(model, x_test, y_test, self.trigger, self.target_class)


def build_attack(cfg: Any, num_peers: int, num_classes: int) -> Attack | None:
    """The :class:`Attack` described by ``cfg.attack``, or None when there is none (or no malicious peer)."""
    node = cfg.get("attack", None) if hasattr(cfg, "get") else getattr(cfg, "attack", None)
    a = _plain(node)
    malicious = [int(i) for i in (a.get("malicious") or [])]
    if not malicious:
        return None
    bad = [i for i in malicious if not 0 <= i < num_peers]
    if bad:
        raise ValueError(f"attack.malicious ids {bad} out of range for {num_peers} peers")
    target = int(a.get("target_class", 0))
    if not 0 <= target < num_classes:
        raise ValueError(f"attack.target_class {target} out of range for {num_classes} classes")
    rate = float(a.get("poison_rate", 0.3))
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"attack.poison_rate must be in [0, 1], got {rate}")
    scale = float(a.get("scale", 1.0))
    if not scale > 0:
        raise ValueError(f"attack.scale must be > 0, got {scale}")
    kind = str(a.get("trigger", "badnets"))
    trigger = build_trigger(kind, **(a.get("trigger_kwargs") or {}))
    return Attack(sorted(set(malicious)), trigger, target, rate, scale, int(a.get("seed", 0)), kind)
