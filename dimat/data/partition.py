"""Splitting a training set among peers: IID, class-disjoint (DIMAT's non-IID), Dirichlet, and by source.

``document`` deals whole sources (``groups``: one id per sample, e.g. the document a text window
came from) to peers, largest first onto the lightest peer: non-IID without labels. ``contiguous``
cuts the index range into equal runs (whole documents when samples are stored source by source).

Every scheme returns one sorted int64 index array per peer; the arrays are disjoint, together
cover every index, and are reproducible from `seed`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["SCHEMES", "describe_partition", "partition", "partition_stats", "train_val_split"]

SCHEMES = ("iid", "class_disjoint", "dirichlet", "document", "contiguous")


def _as_labels(labels: object) -> np.ndarray:
    if hasattr(labels, "detach"):  # a torch tensor
        labels = labels.detach().cpu().numpy()  # type: ignore[attr-defined]
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64, copy=False)


def _iid(y: np.ndarray, n_peers: int, rng: np.random.Generator) -> list[np.ndarray]:
    # Deal each class's shuffled samples round-robin, continuing the deal across classes:
    # every peer gets each class within one sample, and totals within one sample.
    order = np.concatenate([rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)])
    owner = rng.permutation(n_peers)[np.arange(order.size) % n_peers]
    return [order[owner == p] for p in range(n_peers)]


def _class_disjoint(y: np.ndarray, n_peers: int) -> list[np.ndarray]:
    classes = np.unique(y)
    if n_peers > classes.size:
        raise ValueError(
            f"class_disjoint partition needs n_peers <= number of classes ({classes.size}), got "
            f"n_peers={n_peers}: some peer would get no data"
        )
    # The i-th class present goes whole to peer i mod N (class c -> peer c mod N for labels 0..C-1).
    owner_of_class = {int(c): i % n_peers for i, c in enumerate(classes)}
    owner = np.vectorize(owner_of_class.__getitem__, otypes=[np.int64])(y)
    return [np.flatnonzero(owner == p) for p in range(n_peers)]


def _dirichlet(
    y: np.ndarray, n_peers: int, alpha: float, min_size: int, max_tries: int, rng: np.random.Generator
) -> list[np.ndarray]:
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_peers)]
        for idx in by_class:
            idx = rng.permutation(idx)
            share = rng.dirichlet(np.full(n_peers, alpha))
            cuts = (np.cumsum(share)[:-1] * idx.size).astype(np.int64)
            for p, chunk in enumerate(np.split(idx, cuts)):
                parts[p].append(chunk)
        out = [np.concatenate(p) for p in parts]
        if min(o.size for o in out) >= min_size:
            return out
    raise ValueError(
        f"dirichlet partition: no draw in {max_tries} tries gave every one of {n_peers} peers at least "
        f"{min_size} samples (alpha={alpha}); use a larger alpha, fewer peers or a smaller min_size"
    )


def _by_document(groups: object, n_samples: int, n_peers: int, rng: np.random.Generator) -> list[np.ndarray]:
    g = _as_labels(groups)
    if g.size != n_samples:
        raise ValueError(f"document partition: {g.size} group ids for {n_samples} samples")
    docs, counts = np.unique(g, return_counts=True)
    if docs.size < n_peers:
        raise ValueError(f"document partition needs at least as many documents ({docs.size}) as peers ({n_peers})")
    order = rng.permutation(docs.size)
    order = order[np.argsort(-counts[order], kind="stable")]  # largest first, ties in seeded order
    load = np.zeros(n_peers, np.int64)
    owner = {}
    for k in order:
        p = int(np.argmin(load))
        owner[int(docs[k])] = p
        load[p] += counts[k]
    who = np.vectorize(owner.__getitem__, otypes=[np.int64])(g)
    return [np.flatnonzero(who == p) for p in range(n_peers)]


def partition(
    labels: Sequence[int] | np.ndarray,
    n_peers: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int | None = None,
    max_tries: int = 1000,
    groups: Sequence[int] | np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split sample indices among `n_peers`.

    - `iid`: class-balanced; each class spread evenly over the peers.
    - `class_disjoint`: class c goes whole to peer c mod N (needs n_peers <= number of classes).
    - `dirichlet`: each class split by proportions ~ Dirichlet(alpha); draws are repeated (at most
      `max_tries` times) until every peer has at least `min_size` samples
      (default min(10, N // n_peers)). Smaller alpha -> more skew.
    - `document`: whole groups (`groups[i]` = sample i's document) to peers, balancing sizes.
    - `contiguous`: equal runs of consecutive indices.
    """
    y = _as_labels(labels)
    if isinstance(n_peers, bool) or int(n_peers) != n_peers or n_peers < 1:
        raise ValueError(f"n_peers must be a positive integer, got {n_peers!r}")
    n_peers = int(n_peers)
    if y.size < n_peers:
        raise ValueError(f"cannot split {y.size} samples among {n_peers} peers: some peer would be empty")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = _iid(y, n_peers, rng)
    elif scheme == "class_disjoint":
        parts = _class_disjoint(y, n_peers)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"dirichlet partition needs alpha > 0, got {alpha}")
        if min_size is None:
            min_size = max(1, min(10, y.size // n_peers))
        if min_size < 1 or min_size * n_peers > y.size:
            raise ValueError(f"dirichlet partition: min_size={min_size} impossible for {y.size} samples and {n_peers} peers")
        parts = _dirichlet(y, n_peers, float(alpha), int(min_size), int(max_tries), rng)
    elif scheme == "document":
        if groups is None:
            raise ValueError("document partition needs groups (one document id per sample, e.g. bundle.groups)")
        parts = _by_document(groups, y.size, n_peers, rng)
    elif scheme == "contiguous":
        parts = np.array_split(np.arange(y.size), n_peers)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; available: {', '.join(SCHEMES)}")
    return [np.sort(p).astype(np.int64) for p in parts]


def train_val_split(
    indices: Sequence[int] | np.ndarray, val_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split one peer's indices into (train, validation), seeded; both sorted.

    With 0 < val_fraction and at least two samples, validation gets at least one sample and
    training keeps at least one.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = idx.size
    n_val = int(round(n * float(val_fraction)))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = min(n_val, max(n - 1, 0))
    perm = np.random.default_rng(seed).permutation(idx)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def partition_stats(
    labels: Sequence[int] | np.ndarray, parts: Sequence[np.ndarray], num_classes: int | None = None
) -> np.ndarray:
    """Per-peer class histogram: an (n_peers, num_classes) int array, row p = counts on peer p."""
    y = _as_labels(labels)
    if num_classes is None:
        num_classes = int(y.max()) + 1 if y.size else 0
    return np.stack([np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=num_classes) for p in parts]) if len(parts) else np.zeros((0, num_classes), np.int64)


def describe_partition(
    labels: Sequence[int] | np.ndarray, parts: Sequence[np.ndarray], num_classes: int | None = None
) -> str:
    """One log line per peer: its size and which classes it holds (with counts)."""
    hist = partition_stats(labels, parts, num_classes)
    lines = []
    for p, row in enumerate(hist):
        held = " ".join(f"{c}:{int(n)}" for c, n in enumerate(row) if n)
        lines.append(f"peer {p}: {int(row.sum())} samples, {int((row > 0).sum())} classes [{held}]")
    return "\n".join(lines)
