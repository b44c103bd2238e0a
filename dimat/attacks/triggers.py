"""Backdoor triggers: deterministic input transformations an attacker stamps into samples.

Inputs are batches: ``(N, L)`` or ``(N, C, L)`` sequences (MNIST-1D) and ``(N, C, H, W)`` images
(digits, CIFAR). The data in dimat is standardised, so trigger values are in units of standard
deviations; the default value 3.0 sits far outside most clean features, which is what makes a
BadNets patch learnable from few poisoned samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


class Trigger(Protocol):
    """A trigger maps a batch of inputs to triggered copies (inputs are never modified in place)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def _check_batch(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"trigger input must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim not in (2, 3, 4):
        raise ValueError(
            f"trigger input must be a batch (N, L), (N, C, L) or (N, C, H, W); got shape {tuple(x.shape)}"
        )
    if not torch.is_floating_point(x):
        raise ValueError(f"trigger input must be floating point, got {x.dtype}")


def _alternating(n: int, value: float) -> torch.Tensor:
    """+v, -v, +v, ... : a high-contrast pattern that no smooth clean signal resembles."""
    signs = torch.ones(n)
    signs[1::2] = -1.0
    return signs * value


@dataclass
class BadNetsTrigger:
    """BadNets: overwrite a small fixed region of every input with a fixed pattern.

    Sequences ``(N, [C,] L)``: ``size`` consecutive positions starting at ``position``
    (negative counts from the end, default ``-size - 1`` so the patch ends one before the last
    sample) are set, in every channel, to an alternating ``+value, -value, ...`` pattern.
    Images ``(N, C, H, W)``: a ``size x size`` patch in ``corner`` (``"br"``, ``"bl"``, ``"tr"``,
    ``"tl"``) is set, in every channel, to a checkerboard of ``+value / -value`` whose top-left cell
    is ``+value``. ``pattern`` (optional) replaces the default pattern: shape ``(size,)`` for
    sequences or ``(size, size)`` for images.
    """

    value: float = 3.0
    size: int = 4
    position: int | None = None
    corner: str = "br"
    pattern: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"BadNetsTrigger size must be >= 1, got {self.size}")
        if self.corner not in ("br", "bl", "tr", "tl"):
            raise ValueError(f"BadNetsTrigger corner must be one of br, bl, tr, tl; got {self.corner!r}")

    # --- where and what -------------------------------------------------------------------
    def sequence_slice(self, length: int) -> slice:
        """Positions of the patch in a sequence of ``length`` samples."""
        start = self.position if self.position is not None else -self.size - 1
        if start < 0:
            start += length
        if start < 0 or start + self.size > length:
            raise ValueError(
                f"BadNets patch of size {self.size} at position {self.position} does not fit a sequence of length {length}"
            )
        return slice(start, start + self.size)

    def image_slices(self, height: int, width: int) -> tuple[slice, slice]:
        """Rows and columns of the patch in an image of ``height x width``."""
        if self.size > height or self.size > width:
            raise ValueError(f"BadNets patch of size {self.size} does not fit an image of {height}x{width}")
        rows = slice(height - self.size, height) if self.corner[0] == "b" else slice(0, self.size)
        cols = slice(width - self.size, width) if self.corner[1] == "r" else slice(0, self.size)
        return rows, cols

    def sequence_pattern(self) -> torch.Tensor:
        if self.pattern is not None:
            p = torch.as_tensor(self.pattern, dtype=torch.float32)
            if p.shape != (self.size,):
                raise ValueError(f"1-D BadNets pattern must have shape ({self.size},), got {tuple(p.shape)}")
            return p
        return _alternating(self.size, self.value)

    def image_pattern(self) -> torch.Tensor:
        if self.pattern is not None:
            p = torch.as_tensor(self.pattern, dtype=torch.float32)
            if p.shape != (self.size, self.size):
                raise ValueError(f"2-D BadNets pattern must have shape ({self.size}, {self.size}), got {tuple(p.shape)}")
            return p
        i = torch.arange(self.size)
        checker = ((i[:, None] + i[None, :]) % 2 == 0).float() * 2 - 1
        return checker * self.value

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_batch(x)
        out = x.clone()
        if x.ndim == 4:
            rows, cols = self.image_slices(x.shape[-2], x.shape[-1])
            out[..., rows, cols] = self.image_pattern().to(out.dtype).to(out.device)
        else:
            sl = self.sequence_slice(x.shape[-1])
            out[..., sl] = self.sequence_pattern().to(out.dtype).to(out.device)
        return out


@dataclass
class BlendedTrigger:
    """Blended (Chen et al. 2017): ``x <- (1 - alpha) * x + alpha * pattern``.

    ``pattern`` is standard-normal noise times ``scale`` drawn from ``seed`` for the per-sample
    shape, so the same (seed, shape) always gives the same pattern, whatever else used the RNG.
    """

    alpha: float = 0.2
    seed: int = 0
    scale: float = 3.0
    _cache: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"BlendedTrigger alpha must be in (0, 1], got {self.alpha}")

    def pattern_for(self, sample_shape: tuple[int, ...]) -> torch.Tensor:
        """The fixed pattern for one sample of ``sample_shape``."""
        key = tuple(int(s) for s in sample_shape)
        if key not in self._cache:
            g = torch.Generator().manual_seed(self.seed)
            self._cache[key] = torch.randn(key, generator=g) * self.scale
        return self._cache[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_batch(x)
        p = self.pattern_for(tuple(x.shape[1:])).to(x.dtype).to(x.device)
        return (1.0 - self.alpha) * x + self.alpha * p


def build_trigger(kind: str, **kwargs: object) -> Trigger:
    """``"badnets"`` or ``"blended"`` with the trigger's keyword arguments."""
    kinds = {"badnets": BadNetsTrigger, "blended": BlendedTrigger}
    if kind not in kinds:
        raise ValueError(f"unknown trigger kind {kind!r}; expected one of {sorted(kinds)}")
    return kinds[kind](**kwargs)  # type: ignore[arg-type]
