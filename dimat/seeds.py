"""Every random stream of a run derives from the run's seed through one function.

Streams are named by keys (a peer id, a purpose, a step count), mixed by
:class:`numpy.random.SeedSequence`, so nearby run seeds never yield streams shifted by a few
steps (the failure of ``seed * k + id`` formulas) and two purposes never share a stream.
"""
from __future__ import annotations

import zlib

import numpy as np

#: the purposes that name streams (a string key is hashed, so any string works; these are the ones dimat uses)
INIT, TRAIN, ALIGN_SAMPLE, AGGREGATION, COMPRESSION, EVALUATION, ATTACK, PROXY, VAL_SPLIT, GRAPH = (
    "init", "train", "align-sample", "aggregation", "compression", "evaluation", "attack", "proxy", "val-split",
    "graph")


def _word(key: int | str) -> int:
    if isinstance(key, str):
        return zlib.crc32(key.encode())
    return int(key) % 2**63  # SeedSequence takes non-negative ints; a negative run seed stays distinct


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed for the stream of ``seed`` named by ``keys``.

    Args:
        seed: the run's seed (any int, negative included).
        keys: what the stream is for, e.g. ``(TRAIN, peer_id)``.

    Example:
        >>> derive_seed(0, TRAIN, 3) != derive_seed(0, TRAIN, 4) != derive_seed(1, TRAIN, 3)
        True
    """
    entropy = [_word(seed), 1 if int(seed) < 0 else 0, *(_word(k) for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


__all__ = ["derive_seed", "INIT", "TRAIN", "ALIGN_SAMPLE", "AGGREGATION", "COMPRESSION", "EVALUATION", "ATTACK",
           "PROXY", "VAL_SPLIT", "GRAPH"]
