"""Time-varying topologies: a `Schedule` gives the topology used in each round.

Every schedule is a pure function of the round index (and its seed), so a resumed run sees the same
graphs as an uninterrupted one.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from dimat.topology.core import RULES, Topology, mixing_matrix
from dimat.topology.graphs import build_topology, exponential_offsets


@runtime_checkable
class Schedule(Protocol):
    """Anything that gives the topology of round ``round_idx`` (0-based)."""

    def at(self, round_idx: int) -> Topology:
        ...


def _peer_ids(n: int, peers: Sequence[int] | None, what: str, minimum: int = 2) -> tuple[int, ...]:
    ids = tuple(range(n)) if peers is None else tuple(int(p) for p in peers)
    if len(ids) != n:
        raise ValueError(f"{what}: {len(ids)} peer ids given for n={n}")
    if n < minimum:
        raise ValueError(f"{what} schedule needs at least {minimum} peers, got {n}")
    return ids


def _check_round(round_idx: int) -> int:
    if isinstance(round_idx, bool) or not isinstance(round_idx, (int, np.integer)) or round_idx < 0:
        raise ValueError(f"round index must be a non-negative integer, got {round_idx!r}")
    return int(round_idx)


class StaticSchedule:
    """The same topology every round."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def at(self, round_idx: int) -> Topology:
        _check_round(round_idx)
        return self.topology

    def __repr__(self) -> str:
        return f"StaticSchedule({self.topology!r})"


class OnePeerExponential:
    """Each round every peer exchanges with exactly one peer (BlueFog's one-peer exponential graph).

    In round ``r`` with offset ``2^(r mod L)`` (``L = ceil(log2 n)``, the number of offsets ``2^k < n``),
    position ``i`` sends to ``i + offset`` and merges the model of ``i - offset``, each with weight 1/2.
    The matrix is a mix of the identity and a cyclic shift, so it is doubly stochastic; over ``L``
    consecutive rounds every offset of the static exponential graph is used once.
    """

    def __init__(self, n: int, peers: Sequence[int] | None = None) -> None:
        self.peers = _peer_ids(n, peers, "one_peer_exponential")
        self.n = n
        self.offsets = exponential_offsets(n)

    @property
    def period(self) -> int:
        return len(self.offsets)

    def offset(self, round_idx: int) -> int:
        return self.offsets[_check_round(round_idx) % self.period]

    def at(self, round_idx: int) -> Topology:
        off = self.offset(round_idx)
        adj = np.zeros((self.n, self.n), dtype=bool)
        for i in range(self.n):
            adj[(i + off) % self.n, i] = True
        return Topology(mixing_matrix(adj, "uniform"), name="one_peer_exponential", peers=self.peers,
                        rule="uniform")

    def __repr__(self) -> str:
        return f"OnePeerExponential(n={self.n})"


class RandomMatching:
    """Each round peers are paired by a random (near-)perfect matching; matched pairs average 1/2-1/2.

    With odd ``n`` one peer per round sits out (self weight 1). The matching of round ``r`` depends
    only on ``(seed, r)``, so it is reproducible and independent of the order rounds are asked for.
    """

    def __init__(self, n: int, seed: int = 0, peers: Sequence[int] | None = None, rule: str = "uniform") -> None:
        self.peers = _peer_ids(n, peers, "random_matching")
        self.n = n
        self.seed = int(seed)
        if rule not in RULES:
            raise ValueError(f"unknown mixing rule {rule!r}; choose one of {', '.join(RULES)}")
        self.rule = rule  # both rules give 1/2-1/2 on a matching; kept for membership changes

    def pairs(self, round_idx: int) -> list[tuple[int, int]]:
        """The matched pairs of round ``round_idx``, as peer ids."""
        rng = np.random.default_rng([self.seed, _check_round(round_idx)])
        order = rng.permutation(self.n)
        return [(self.peers[order[k]], self.peers[order[k + 1]]) for k in range(0, self.n - 1, 2)]

    def at(self, round_idx: int) -> Topology:
        index = {p: k for k, p in enumerate(self.peers)}
        adj = np.zeros((self.n, self.n), dtype=bool)
        for a, b in self.pairs(round_idx):
            adj[index[a], index[b]] = adj[index[b], index[a]] = True
        return Topology(mixing_matrix(adj, self.rule), name="random_matching", peers=self.peers, rule=self.rule)

    def __repr__(self) -> str:
        return f"RandomMatching(n={self.n}, seed={self.seed})"


_SCHEDULES = ("static", "one_peer_exponential", "random_matching")


def build_schedule(name: str, n: int, **kwargs) -> Schedule:
    """Build a schedule by name, as configs do.

    * ``one_peer_exponential`` (alias ``one_peer_exp``): no options.
    * ``random_matching`` (alias ``matching``): ``seed``.
    * ``static``: ``topology=<name>`` plus that topology's keyword arguments.
    * any topology name (``ring``, ``torus`` ...): the static schedule of that topology.
    """
    key = str(name).lower().replace("-", "_")
    key = {"one_peer_exp": "one_peer_exponential", "matching": "random_matching"}.get(key, key)
    try:
        if key == "one_peer_exponential":
            return OnePeerExponential(n, **kwargs)
        if key == "random_matching":
            return RandomMatching(n, **kwargs)
    except TypeError as exc:
        raise ValueError(f"bad arguments for schedule {key!r}: {exc}") from None
    if key == "static":
        topo_name = kwargs.pop("topology", None)
        if topo_name is None:
            raise ValueError("static schedule needs topology=<topology name>")
        return StaticSchedule(build_topology(topo_name, n, **kwargs))
    try:
        return StaticSchedule(build_topology(key, n, **kwargs))
    except ValueError as exc:
        if str(exc).startswith("unknown topology"):
            raise ValueError(
                f"unknown topology or schedule {name!r}; schedules: {', '.join(_SCHEDULES)}; {exc}"
            ) from None
        raise
