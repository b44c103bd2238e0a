"""The `Topology` value, mixing-weight rules and the checks on a mixing matrix.

Convention used everywhere in dimat: ``W[i, j]`` is the weight peer ``i`` gives to peer ``j``'s model
when it merges, so row ``i`` is what peer ``i`` computes and every row sums to 1. ``W[i, j] > 0``
(``j != i``) means ``j`` is an *in-neighbour* of ``i``: ``j`` sends its model to ``i``.
``adjacency[i, j]`` carries the same meaning without weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import networkx as nx
import numpy as np

RULES = ("uniform", "metropolis")

# Rows read from text files are rarely exact (0.3333 for 1/3); accept that much drift, then rescale.
ROW_SUM_ATOL = 1e-6


def _as_square(W: np.ndarray | Sequence[Sequence[float]], what: str = "weight matrix") -> np.ndarray:
    try:
        arr = np.asarray(W, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not numeric: {exc}") from None
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty square 2-D matrix, got shape {arr.shape}")
    return arr


def validate(W: np.ndarray | Sequence[Sequence[float]], atol: float = ROW_SUM_ATOL) -> np.ndarray:
    """Check that ``W`` is a mixing matrix and return it as float64.

    Raises ``ValueError`` naming the problem: wrong shape, NaN/inf, negative entries, or rows that do
    not sum to 1 (within ``atol``).
    """
    arr = _as_square(W)
    bad = ~np.isfinite(arr)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"weight matrix has {int(bad.sum())} NaN/inf entries (first at [{i}, {j}])")
    neg = arr < 0
    if neg.any():
        i, j = np.argwhere(neg)[0]
        raise ValueError(
            f"weight matrix has {int(neg.sum())} negative entries (first W[{i}, {j}] = {arr[i, j]:g})"
        )
    sums = arr.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1.0) > atol)
    if off.size:
        shown = ", ".join(f"row {r} sums to {sums[r]:.6g}" for r in off[:5])
        more = f" (and {off.size - 5} more)" if off.size > 5 else ""
        raise ValueError(f"weight matrix is not row-stochastic: {shown}{more}")
    return arr


def is_row_stochastic(W: np.ndarray, atol: float = 1e-9) -> bool:
    """Non-negative, finite, and every row sums to 1."""
    try:
        validate(W, atol=atol)
    except ValueError:
        return False
    return True


def is_doubly_stochastic(W: np.ndarray, atol: float = 1e-9) -> bool:
    """Row-stochastic and every column sums to 1 (so plain averaging preserves the global mean)."""
    if not is_row_stochastic(W, atol=atol):
        return False
    return bool(np.allclose(np.asarray(W, dtype=np.float64).sum(axis=0), 1.0, atol=atol, rtol=0.0))


def _support(x: "Topology | np.ndarray") -> np.ndarray:
    """Off-diagonal boolean support (who receives from whom) of a topology, W or adjacency."""
    if isinstance(x, Topology):
        return x.adjacency
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {arr.shape}")
    adj = arr != 0 if arr.dtype == bool else arr > 0
    adj = adj.copy()
    np.fill_diagonal(adj, False)
    return adj


def is_connected(x: "Topology | np.ndarray") -> bool:
    """Whether the communication graph is *strongly* connected.

    Accepts a `Topology`, a weight matrix or an adjacency matrix. Strong connectivity (every peer's
    model eventually reaches every other peer) is what gossip consensus needs; for undirected graphs
    it is ordinary connectivity. A single peer counts as connected.
    """
    adj = _support(x)
    if adj.shape[0] == 1:
        return True
    return nx.is_strongly_connected(nx.from_numpy_array(adj.astype(np.int8), create_using=nx.DiGraph))


def spectral_gap(W: "np.ndarray | Topology") -> float:
    """``1 - |lambda_2|``: one minus the second-largest eigenvalue *modulus* of ``W``.

    Eigenvalues are sorted by modulus; ``lambda_1 = 1`` for a stochastic matrix. The gap governs how
    fast repeated mixing reaches consensus (error shrinks roughly like ``|lambda_2|**t``): 1 for
    exact averaging in one step (fully connected, uniform), 0 when consensus never happens
    (disconnected graph, or a periodic one such as a bipartite swap). A single peer has gap 1.
    """
    arr = _as_square(W.W if isinstance(W, Topology) else W)
    if arr.shape[0] == 1:
        return 1.0
    mods = np.sort(np.abs(np.linalg.eigvals(arr)))[::-1]
    return float(max(0.0, 1.0 - mods[1]))


def mixing_matrix(adjacency: np.ndarray, rule: str = "uniform") -> np.ndarray:
    """Mixing weights for a graph. ``adjacency[i, j]`` true means ``i`` receives from ``j``.

    * ``uniform``: each peer gives equal weight to its closed in-neighbourhood,
      ``W[i, j] = 1 / (1 + d_i)`` (``d_i`` = in-degree). On a ring that is the DIMAT paper's 1/3.
      Doubly stochastic only for regular graphs.
    * ``metropolis`` (Metropolis–Hastings): ``W[i, j] = 1 / (1 + max(d_i, d_j))`` for ``j`` in
      ``i``'s in-neighbourhood, self weight the rest. Symmetric, hence doubly stochastic, for any
      undirected graph; for a directed graph it is row-stochastic and doubly stochastic when the
      graph is regular (e.g. the exponential graph).
    """
    if rule not in RULES:
        raise ValueError(f"unknown mixing rule {rule!r}; choose one of {', '.join(RULES)}")
    adj = _support(np.asarray(adjacency))
    n = adj.shape[0]
    deg = adj.sum(axis=1)
    W = np.zeros((n, n), dtype=np.float64)
    if rule == "uniform":
        W[adj] = np.broadcast_to((1.0 / (1.0 + deg))[:, None], (n, n))[adj]
    else:
        pair = 1.0 / (1.0 + np.maximum(deg[:, None], deg[None, :]))
        W[adj] = pair[adj]
    np.fill_diagonal(W, 1.0 - W.sum(axis=1))
    return W


@dataclass(frozen=True, eq=False)
class Topology:
    """A weighted communication graph over a set of peer ids.

    ``W`` is indexed by *position*: row/column ``k`` belongs to peer ``peers[k]``. Constructors use
    ``peers = (0, ..., n-1)``; after membership changes (`without_peers`, `with_peer`) ids stay
    stable and ``peers`` is a subset/superset of the original ids. All methods taking a peer take
    its *id*; `index_of` maps an id to its row.

    ``rule`` is the weighting rule that produced ``W`` (``None`` for explicit weights); membership
    changes reuse it.
    """

    W: np.ndarray
    name: str = "custom"
    peers: tuple[int, ...] = field(default=())
    rule: str | None = None

    def __post_init__(self) -> None:
        W = validate(self.W).copy()
        W /= W.sum(axis=1, keepdims=True)  # remove tolerated drift so rows sum to 1 exactly-ish
        W.flags.writeable = False
        object.__setattr__(self, "W", W)
        peers = tuple(range(W.shape[0])) if not self.peers else tuple(int(p) for p in self.peers)
        if len(peers) != W.shape[0]:
            raise ValueError(f"{len(peers)} peer ids given for a {W.shape[0]}x{W.shape[0]} weight matrix")
        if len(set(peers)) != len(peers):
            raise ValueError(f"peer ids must be unique, got {peers}")
        if any(p < 0 for p in peers):
            raise ValueError(f"peer ids must be non-negative, got {peers}")
        object.__setattr__(self, "peers", peers)
        object.__setattr__(self, "_index", {p: k for k, p in enumerate(peers)})
        if self.rule is not None and self.rule not in RULES:
            raise ValueError(f"unknown mixing rule {self.rule!r}; choose one of {', '.join(RULES)}")

    @property
    def n(self) -> int:
        """Number of peers."""
        return len(self.peers)

    @property
    def adjacency(self) -> np.ndarray:
        """Boolean ``n x n`` matrix (by position): ``[i, j]`` true when ``i`` receives from ``j != i``."""
        return _support(self.W)

    @property
    def directed(self) -> bool:
        """Whether some link carries models one way only."""
        adj = self.adjacency
        return not bool((adj == adj.T).all())

    def index_of(self, peer: int) -> int:
        """Row/column of ``W`` that belongs to peer id ``peer``."""
        try:
            return self._index[int(peer)]  # type: ignore[attr-defined]
        except KeyError:
            raise ValueError(f"peer {peer} is not in topology {self.name!r} (peers {list(self.peers)})") from None

    def in_neighbours(self, i: int) -> list[int]:
        """Peers (ids, ``!= i``) whose models ``i`` merges: ``W[i, j] > 0``."""
        k = self.index_of(i)
        return [self.peers[j] for j in np.flatnonzero(self.W[k] > 0) if j != k]

    def out_neighbours(self, i: int) -> list[int]:
        """Peers (ids, ``!= i``) that merge ``i``'s model, i.e. to whom ``i`` sends: ``W[j, i] > 0``."""
        k = self.index_of(i)
        return [self.peers[j] for j in np.flatnonzero(self.W[:, k] > 0) if j != k]

    def weights_for(self, i: int) -> dict[int, float]:
        """``{peer id: weight}`` that ``i`` uses to merge, itself included (even at weight 0)."""
        k = self.index_of(i)
        out = {i: float(self.W[k, k])}
        for j in np.flatnonzero(self.W[k] > 0):
            if j != k:
                out[self.peers[j]] = float(self.W[k, j])
        return out

    def degree(self, i: int) -> int:
        """In-degree of peer ``i``."""
        return len(self.in_neighbours(i))

    def relabel(self, peers: Iterable[int]) -> "Topology":
        """Same weights, different peer ids (position ``k`` becomes ``peers[k]``)."""
        return Topology(self.W, name=self.name, peers=tuple(peers), rule=self.rule)

    def to_networkx(self) -> nx.DiGraph:
        """Directed graph on peer ids, edge ``j -> i`` with attribute ``weight = W[i, j]``."""
        g = nx.DiGraph()
        g.add_nodes_from(self.peers)
        for i, j in np.argwhere(self.adjacency):
            g.add_edge(self.peers[j], self.peers[i], weight=float(self.W[i, j]))
        return g

    def __repr__(self) -> str:
        return f"Topology(name={self.name!r}, n={self.n}, rule={self.rule!r}, peers={list(self.peers)})"
