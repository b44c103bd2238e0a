"""The learning rate of a round: constant, or a cosine decay over the run's rounds.

Per round rather than per step, so every peer of a round uses one rate whatever its partition size,
a drift correction can turn a round's displacement back into gradients with that rate, and a
resumed run picks the rate up from the round number alone.
"""
from __future__ import annotations

import math

#: ``train.lr_schedule`` values
SCHEDULES = ("constant", "cosine")


def round_lr(base_lr: float, schedule: str, round_idx: int, rounds: int) -> float:
    """The learning rate of round ``round_idx`` (1-based) of ``rounds``.

    Args:
        base_lr: ``train.lr``.
        schedule: ``constant`` or ``cosine`` (``base_lr * (1 + cos(pi * (r - 1) / rounds)) / 2``: the
            first round at ``base_lr``, the last one close to 0 but not at it).
        round_idx: the round; 0 (pre-training) uses ``base_lr``.
        rounds: the run's rounds.

    Example:
        >>> round_lr(0.01, "cosine", 1, 20), round(round_lr(0.01, "cosine", 11, 20), 6)
        (0.01, 0.005)
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"train.lr_schedule must be one of {', '.join(SCHEDULES)} (got {schedule!r})")
    if schedule == "constant" or round_idx <= 0 or rounds <= 0:
        return float(base_lr)
    return float(base_lr) * 0.5 * (1.0 + math.cos(math.pi * (round_idx - 1) / rounds))


__all__ = ["SCHEDULES", "round_lr"]
