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
from typing import TYPE_CHECKING, Any, Mapping

import torch


from dimat.attacks.metrics import attack_success_rate
from dimat.attacks.poison import poison_dataset, scale_update
from dimat.attacks.triggers import Trigger, build_trigger
from dimat.merge.basis import attach_basis, split_basis

if TYPE_CHECKING:
    from dimat.config import AttackSettings

from dimat.typing import StateDict
from dimat.seeds import ATTACK, derive_seed


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
                    peer.x, peer.y, self.trigger, self.target_class, self.poison_rate, seed=derive_seed(self.seed, ATTACK, int(pid))
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
                model, basis = split_basis(st)  # the tag travels unchanged
                scaled = scale_update(model, self._base[pid], self.scale)
                out[pid] = scaled if basis is None else attach_basis(scaled, basis)
        return out

    def evaluate(self, model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
        """ASR of ``model`` on the triggered non-target test inputs."""
        return attack_success_rate(model, x_test, y_test, self.trigger, self.target_class)


def build_attack(settings: "AttackSettings", num_peers: int, num_classes: int) -> Attack | None:
    """The :class:`Attack` described by ``settings`` (``RunConfig.attack``), or None without a malicious peer.

    A plain mapping becomes settings with ``AttackSettings.from_mapping`` (every key given: the
    defaults live in ``configs/attack``).
    """
    if not settings.malicious:
        return None
    bad = [i for i in settings.malicious if not 0 <= i < num_peers]
    if bad:
        raise ValueError(f"attack.malicious ids {bad} out of range for {num_peers} peers")
    if not 0 <= settings.target_class < num_classes:
        raise ValueError(f"attack.target_class {settings.target_class} out of range for {num_classes} classes")
    trigger = build_trigger(settings.trigger, **settings.trigger_kwargs)
    return Attack(list(settings.malicious), trigger, settings.target_class, settings.poison_rate, settings.scale,
                  settings.seed, settings.trigger)
