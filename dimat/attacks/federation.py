"""Wiring attacks into a federation: which peers are malicious, what they do, what honest peers suffer.

Config (``cfg.attack``, see ``configs/attack/*.yaml``)::

    malicious: [0]          # peer ids; [] or a missing group = no attack
    trigger: badnets        # badnets | blended
    trigger_kwargs: {}      # e.g. {value: 3.0, size: 4} or {alpha: 0.2, seed: 0}
    target_class: 0
    poison_rate: 0.3        # share of the malicious peer's non-target samples poisoned
    scale: 1.0              # model replacement: send base + scale * (trained - base); 1 = off
    stealth: none           # clip: scale the sent update down to the honest peers' median update norm
    collude: false          # the malicious peers send one state, the mean of theirs (Sybils)
    seed: 0

A malicious peer poisons its own partition once, at build time (deterministic from the config, so
resumed runs see the same data), trains like everyone else and, with ``scale != 1``, scales the
delta of this round's local training before sending. ``stealth: clip`` is the attacker that stays
within the honest spread: its update (since the round began) is scaled down to the lower median norm of
the honest peers' updates this process hosts (in simulation: all of them, an attacker that knows
the honest spread exactly). ``collude`` makes every malicious peer send the same state. Every peer
is evaluated on the clean test set (``clean_acc``) and on the triggered non-target test inputs (``asr``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import torch


from dimat.attacks.metrics import attack_success_rate
from dimat.attacks.poison import poison_dataset, scale_update
from dimat.attacks.triggers import Trigger, build_trigger
from dimat.merge.basis import split_basis

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
    stealth: str = "none"
    collude: bool = False
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
        """Remember the round-start weights: the malicious peers' (the base of their update) and, for
        ``stealth: clip``, the honest peers' too (whose updates set the spread to hide in)."""
        if self.scale == 1.0 and self.stealth == "none":
            return
        self._base = {pid: p.state() for pid, p in peers.items() if self.is_malicious(pid) or self.stealth == "clip"}

    def outgoing(self, states: Mapping[int, StateDict]) -> dict[int, StateDict]:
        """What each local peer sends: the malicious peers' states scaled, clipped or shared as configured.

        Entries of a payload that are not model entries (the basis tag, a method's extras) pass unchanged.
        """
        out = dict(states)
        bad = [pid for pid in states if self.is_malicious(pid) and pid in self._base]
        factors = {pid: self.scale for pid in bad}
        if self.stealth == "clip":
            honest = [_update_norm(states[p], self._base[p]) for p in states if p in self._base and not self.is_malicious(p)]
            if honest:
                spread = float(torch.tensor(honest).median())
                for pid in bad:
                    norm = self.scale * _update_norm(states[pid], self._base[pid])
                    factors[pid] = self.scale * min(1.0, spread / max(norm, 1e-30))
        for pid in bad:
            if factors[pid] != 1.0:
                model = {k: v for k, v in states[pid].items() if k in self._base[pid]}
                out[pid] = {**states[pid], **scale_update(model, self._base[pid], factors[pid])}
        if self.collude:
            out.update(_shared_state({pid: out[pid] for pid in states if self.is_malicious(pid)}))
        return out

    def evaluate(self, model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
        """ASR of ``model`` on the triggered non-target test inputs."""
        return attack_success_rate(model, x_test, y_test, self.trigger, self.target_class)


def _update_norm(state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of ``state - base`` over the floating-point entries both hold."""
    sq = sum(float((state[k].double() - b.double()).pow(2).sum()) for k, b in base.items()
             if k in state and torch.is_floating_point(b))
    return sq ** 0.5


def _shared_state(states: Mapping[int, StateDict]) -> dict[int, StateDict]:
    """Colluders send one state: the mean of those in the lowest colluder's basis (others are left as they are)."""
    if len(states) < 2:
        return dict(states)
    first = min(states)
    _, basis = split_basis(states[first])
    group = [pid for pid in sorted(states) if split_basis(states[pid])[1] == basis]
    mean = {k: (torch.stack([states[p][k].double() for p in group]).mean(0).to(v.dtype)
                if torch.is_floating_point(v) else v.clone()) for k, v in states[first].items()}
    return {pid: {k: v.clone() for k, v in mean.items()} for pid in group}


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
                  settings.seed, settings.trigger, settings.stealth, settings.collude)
