"""Tiny constructors returning a `Topology` (BlueFog ``topology_util`` style), and the name registry.

Minimum sizes (smaller ``n`` raises ``ValueError``):

=================  =====  ==========================================================
topology           min n  why
=================  =====  ==========================================================
fully_connected    1      one peer is trivially "fully connected"
disconnected       1
ring               3      left and right neighbours must differ (the paper's 1/3)
torus              4      ``rows x cols`` with both >= 2; a prime ``n`` has no torus
exponential        2      peer i sends to i + 2^k (mod n) for every 2^k < n
star               2      peer 0 is the hub
bipartite          2      complete bipartite between halves [0, n//2) and [n//2, n)
erdos_renyi        2      resampled until connected
=================  =====  ==========================================================
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterable

import networkx as nx
import numpy as np

from dimat.files import BadFileError, describe
from dimat.topology.core import RULES, Topology, is_connected, mixing_matrix, validate


def _check_n(n: int, minimum: int, name: str, why: str = "") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"{name}: number of peers must be an integer, got {n!r}")
    if n < minimum:
        extra = f" ({why})" if why else ""
        raise ValueError(f"{name} topology needs at least {minimum} peers, got {n}{extra}")
    return int(n)


def _check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"unknown mixing rule {rule!r}; choose one of {', '.join(RULES)}")
    return rule


def _from_adjacency(adj: np.ndarray, name: str, rule: str) -> Topology:
    _check_rule(rule)
    return Topology(mixing_matrix(adj, rule), name=name, rule=rule)


def _undirected(n: int, edges: Iterable[tuple[int, int]]) -> np.ndarray:
    adj = np.zeros((n, n), dtype=bool)
    for i, j in edges:
        if i != j:
            adj[i, j] = adj[j, i] = True
    return adj


def fully_connected(n: int, rule: str = "uniform") -> Topology:
    """Every peer merges every other peer; uniform weights are exactly ``1/n``."""
    n = _check_n(n, 1, "fully_connected")
    adj = ~np.eye(n, dtype=bool)
    return _from_adjacency(adj, "fully_connected", rule)


def disconnected(n: int, rule: str = "uniform") -> Topology:
    """No links: ``W = I`` (isolated peers; the no-merging baseline)."""
    n = _check_n(n, 1, "disconnected")
    return _from_adjacency(np.zeros((n, n), dtype=bool), "disconnected", rule)


def ring(n: int, rule: str = "uniform") -> Topology:
    """Undirected ring ``i - 1, i, i + 1``; uniform weights 1/3 each (the DIMAT paper's ring)."""
    n = _check_n(n, 3, "ring", "left and right neighbours must be distinct")
    return _from_adjacency(_undirected(n, ((i, (i + 1) % n) for i in range(n))), "ring", rule)


def _near_square_rows(n: int) -> int | None:
    for rows in range(math.isqrt(n), 1, -1):
        if n % rows == 0:
            return rows
    return None


def torus(n: int, rows: int | None = None, rule: str = "uniform") -> Topology:
    """2-D torus (wrap-around grid) of ``rows x cols`` peers; peer ``r * cols + c`` sits at ``(r, c)``.

    ``rows`` defaults to the largest divisor of ``n`` not above ``sqrt(n)``. Both sides must be >= 2;
    a side of 2 wraps onto the same neighbour, so such peers have degree 3 (or 2 for 2x2), not 4.
    """
    n = _check_n(n, 4, "torus", "it is a rows x cols grid with rows, cols >= 2")
    if rows is None:
        rows = _near_square_rows(n)
        if rows is None:
            raise ValueError(f"torus topology needs n = rows x cols with rows, cols >= 2; {n} is prime")
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 2 or n % rows or n // rows < 2:
        raise ValueError(f"torus topology: rows={rows!r} must divide n={n} into rows x cols with both >= 2")
    cols = n // rows
    edges = []
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            edges.append((i, r * cols + (c + 1) % cols))
            edges.append((i, ((r + 1) % rows) * cols + c))
    return _from_adjacency(_undirected(n, edges), "torus", rule)


def exponential_offsets(n: int) -> list[int]:
    """The offsets ``2^k < n`` of the base-2 exponential graph."""
    return [1 << k for k in range(max(1, (n - 1).bit_length()))] if n > 1 else []


def exponential(n: int, rule: str = "uniform") -> Topology:
    """Directed base-2 exponential graph: peer ``i`` sends to ``i + 2^k (mod n)`` for each ``2^k < n``.

    So ``i`` receives from ``i - 2^k``. Every peer has in- and out-degree ``ceil(log2 n)``; the graph is
    regular, hence both rules give a doubly stochastic matrix.
    """
    n = _check_n(n, 2, "exponential")
    adj = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for off in exponential_offsets(n):
            adj[(i + off) % n, i] = True  # (i + off) receives from i
    return _from_adjacency(adj, "exponential", rule)


def star(n: int, rule: str = "uniform") -> Topology:
    """Peer 0 is the hub linked to every other peer; leaves only talk to the hub."""
    n = _check_n(n, 2, "star")
    return _from_adjacency(_undirected(n, ((0, i) for i in range(1, n))), "star", rule)


def bipartite(n: int, rule: str = "uniform") -> Topology:
    """Complete bipartite graph between peers ``[0, n//2)`` and ``[n//2, n)``."""
    n = _check_n(n, 2, "bipartite")
    h = n // 2
    return _from_adjacency(_undirected(n, ((i, j) for i in range(h) for j in range(h, n))), "bipartite", rule)


def erdos_renyi(n: int, p: float = 0.5, seed: int = 0, rule: str = "uniform", max_tries: int = 100) -> Topology:
    """Erdős–Rényi G(n, p), resampled until connected.

    Draw ``t`` uses seed ``(seed, t)``, so the result depends only on ``(n, p, seed)``. Raises
    ``ValueError`` after ``max_tries`` disconnected draws (``p`` too small for ``n``).
    """
    n = _check_n(n, 2, "erdos_renyi")
    if not (isinstance(p, (int, float, np.floating)) and 0.0 < float(p) <= 1.0):
        raise ValueError(f"erdos_renyi: edge probability p must be in (0, 1], got {p!r}")
    for t in range(max_tries):
        rng = np.random.default_rng([int(seed), t])
        upper = np.triu(rng.random((n, n)) < float(p), k=1)
        adj = upper | upper.T
        if is_connected(adj):
            return _from_adjacency(adj, "erdos_renyi", rule)
    raise ValueError(
        f"erdos_renyi: no connected graph with n={n}, p={p} in {max_tries} draws (seed={seed}); raise p"
    )


def from_edges(
    n: int, edges: Iterable[Iterable[int]], rule: str = "uniform", directed: bool = False
) -> Topology:
    """Graph from an explicit edge list of peer pairs ``(i, j)``.

    Undirected by default (``i`` and ``j`` merge each other). With ``directed=True``, ``(i, j)`` means
    ``i`` sends to ``j``. Self-loops are ignored (every peer keeps its own model anyway).
    """
    n = _check_n(n, 1, "from_edges")
    adj = np.zeros((n, n), dtype=bool)
    for e in edges:
        pair = tuple(e)
        if len(pair) != 2:
            raise ValueError(f"from_edges: each edge must be a pair (i, j), got {pair!r}")
        i, j = pair
        for v in (i, j):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < n:
                raise ValueError(f"from_edges: edge {pair!r} names peer {v!r}, outside 0..{n - 1}")
        if i == j:
            continue
        adj[j, i] = True
        if not directed:
            adj[i, j] = True
    return _from_adjacency(adj, "edges", rule)


def load_matrix(path: str | os.PathLike) -> np.ndarray:
    """Read a weight matrix from ``.npy`` (no pickles), ``.csv`` or whitespace/comma ``.txt``.

    Args:
        path: the file.

    Raises:
        FileNotFoundError: no such file.
        BadFileError: the file cannot be read as a matrix (truncated, corrupt, not numbers, a
            pickled object): one line ``<file>: <problem>``.
        ValueError: the suffix is none of the three.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weight-matrix file not found: {p}")
    suffix = p.suffix.lower()
    if suffix not in (".npy", ".csv", ".txt"):
        raise ValueError(f"weight-matrix file {p} must end in .npy, .csv or .txt")
    try:
        if suffix == ".npy":
            # a truncated file raises EOFError or ValueError, a corrupt header ValueError or
            # UnicodeDecodeError, an object array (pickle) ValueError: all of them name this file
            return np.load(p, allow_pickle=False)
        text = p.read_text()
        delimiter = "," if "," in text else None
        return np.loadtxt(p, delimiter=delimiter, dtype=np.float64, ndmin=2)
    except (EOFError, OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadFileError(p, f"cannot read a weight matrix from it, truncated or corrupt ({describe(exc)})") from None


def from_matrix(W: np.ndarray | str | os.PathLike, rule: str | None = None) -> Topology:
    """Topology from an explicit weight matrix (array or file path; see `load_matrix`).

    The matrix must be row-stochastic (checked by `validate`, which names the problem). With
    ``rule=None`` the weights are used as given; with a rule, only the matrix's support is kept and
    the weights are recomputed.
    """
    arr = load_matrix(W) if isinstance(W, (str, os.PathLike)) else W
    arr = validate(arr)
    if rule is not None:
        return _from_adjacency(arr > 0, "matrix", rule)
    return Topology(arr, name="matrix", rule=None)


_REGISTRY: dict[str, Callable[..., Topology]] = {
    "fully_connected": fully_connected,
    "ring": ring,
    "torus": torus,
    "exponential": exponential,
    "star": star,
    "bipartite": bipartite,
    "erdos_renyi": erdos_renyi,
    "disconnected": disconnected,
    "edges": from_edges,
}
_ALIASES = {"fc": "fully_connected", "full": "fully_connected", "complete": "fully_connected",
            "er": "erdos_renyi", "isolated": "disconnected", "exp": "exponential", "grid": "torus"}


def available_topologies() -> list[str]:
    """Names accepted by `build_topology` (besides the aliases and ``matrix``)."""
    return sorted([*_REGISTRY, "matrix"])


def build_topology(name: str, n: int | None = None, **kwargs) -> Topology:
    """Build a topology by name, as configs do: ``build_topology("ring", 5, rule="metropolis")``.

    ``edges`` takes ``edges=[[i, j], ...]``; ``matrix`` takes ``path=...`` (or ``W=...``) and checks
    that the file's size matches ``n`` when ``n`` is given. Unknown names, unknown keyword arguments
    and too few peers raise ``ValueError``.
    """
    key = str(name).lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key == "matrix":
        source = kwargs.pop("path", None)
        if source is None:
            source = kwargs.pop("W", None)
        if source is None:
            raise ValueError("matrix topology needs path=<.npy/.csv/.txt file> (or W=<matrix>)")
        topo = from_matrix(source, **kwargs)
        if n is not None and topo.n != n:
            raise ValueError(f"weight matrix is {topo.n}x{topo.n} but the run has {n} peers")
        return topo
    if key not in _REGISTRY:
        raise ValueError(f"unknown topology {name!r}; choose one of {', '.join(available_topologies())}")
    if n is None:
        raise ValueError(f"topology {key!r} needs the number of peers n")
    fn = _REGISTRY[key]
    try:
        return fn(n, **kwargs)
    except TypeError as exc:  # unexpected keyword from a config
        raise ValueError(f"bad arguments for topology {key!r}: {exc}") from None
